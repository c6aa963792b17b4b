"""Model modules, as source text, that a Ray cluster test writes into the driver's folder only
(so that the workers can import them only if the job ships them): an MLP, and a paced block
whose 'kernels' sleep (trials long enough to lose a node during)."""

MODEL = '''
import torch
from torch import nn

from dynaflow.runtime import BatchLayout, Case, Workload


def make_case(w: Workload) -> Case:
    """A two-layer MLP on rows: any split of the rows is valid."""
    torch.manual_seed(w.seed)
    rows = w.num_decode or 8
    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32)).eval()
    return Case(model=model, inputs=(torch.randn(rows, 32),), layout=BatchLayout.uniform(rows, 1), name="cluster_mlp")
'''


PACED = '''
import time

import torch
import torch.fx
from torch import nn

from dynaflow.runtime import BatchLayout, Case, Workload


def pace(x):
    """A 'kernel' that sleeps 2 ms per row: trials long enough to lose a node during."""
    time.sleep(0.002 * x.shape[0])
    return x


torch.fx.wrap("pace")


class Paced(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return x + pace(self.down(torch.relu(pace(self.up(x)))))


def make_case(w: Workload) -> Case:
    torch.manual_seed(w.seed)
    rows = w.num_decode or 8
    return Case(model=Paced().eval(), inputs=(torch.randn(rows, 16),), layout=BatchLayout.uniform(rows, 1), name="paced")
'''
