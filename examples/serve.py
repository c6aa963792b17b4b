"""A toy server running the whole loop: serve while recording the batch shapes it meets, tune
those shapes, serve again with the tuned map. A Hugging Face Llama (random weights, built from
its config: nothing is downloaded) generates for a batch of requests with a static KV cache.

    python examples/serve.py                    # llama-small sizes, float32, cpu, ~3 minutes
    python examples/serve.py --policy dbo       # a ten-line dual-batch-overlap policy instead of tuning
    python examples/serve.py --granularity op   # tune and serve inside the decoder layers (torch.compile backend)
    python examples/serve.py --device cuda --model llama3-8b --dtype bfloat16 --layers 4

It prints the tuning's coverage of the recorded shapes, the share of layer calls the tuned map
answered with a tuned schedule (exact or nearest bucket, not the sequential fallback), and
tokens/s with and without the schedules, measured interleaved, with their spread. On a 2-core
CPU the tuner finds sequential best for every bucket, so both rows match: that is the point of
storing "sequential is best" rather than a schedule that only looked faster.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from dynaflow.runtime import PRESETS, Schedule, ScheduleMap, StreamSpec, apply_schedules, cache_kwargs, remove_schedules
from dynaflow.runtime.hf import compile_with_schedules


def dbo(layout):
    """Dual-batch overlap: two nano-batches on two streams, only for batches of 8+ requests."""
    if layout.num_requests < 8:
        return Schedule()
    half = layout.num_requests // 2
    return Schedule(split_sizes=(half, layout.num_requests - half), streams=(StreamSpec(), StreamSpec()), label="dbo")


def hf_model(preset: str, layers: int, device, dtype):
    """An HF Llama with the preset's layer sizes, so the preset's tuned schedules fit its layers."""
    p = PRESETS[preset]
    cfg = LlamaConfig(vocab_size=4096, hidden_size=p.hidden, intermediate_size=p.intermediate, num_hidden_layers=layers,
                      num_attention_heads=p.num_heads, num_key_value_heads=p.num_kv_heads, head_dim=p.head_dim,
                      max_position_embeddings=4096)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval(), cfg


def generate(model, cfg, ids, new_tokens: int, device) -> float:
    """Prefill + greedy decode with a static KV cache; returns generated tokens per second."""
    cache = StaticCache(config=cfg, max_cache_len=ids.shape[1] + new_tokens + 1)
    cache.early_initialization(ids.shape[0], cfg.num_key_value_heads, cfg.head_dim, model.dtype,
                               device)  # a server allocates its KV cache up front
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True).logits
            ids = logits[:, -1:].argmax(-1)
    sync()
    return ids.shape[0] * new_tokens / (time.perf_counter() - t0)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):10.1f} tokens/s  (min {min(values):.1f}, max {max(values):.1f})"


class Served:
    """The model as served: at layer granularity (decoder layers wrapped in place) or at op
    granularity (compiled with the schedule backend)."""

    def __init__(self, model, granularity: str) -> None:
        self.model, self.granularity = model, granularity

    def __call__(self, chooser):
        if self.granularity == "op":
            return compile_with_schedules(self.model, chooser)
        return apply_schedules(self.model, chooser)

    def done(self) -> None:  # at op granularity too: a compiled model that fell back wrapped its layers
        remove_schedules(self.model)


def run(args) -> dict:
    """The loop; returns what it printed, for tests."""
    from dynaflow.tuner.cli import main as tuner

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model, cfg = hf_model(args.model, args.layers, device, dtype)
    ids = torch.randint(0, cfg.vocab_size, (args.requests, args.prompt), device=device)
    store = Path(args.store)
    stats: dict = {}
    # the records' model: the preset (layer granularity runs its tuned splits on whole decoder
    # layers) or the HF architecture itself, cut into ops as the backend cuts it
    tuned = args.model if args.granularity == "layer" else f"hf:llama:{args.model}:{args.layers}"
    served = Served(model, args.granularity)

    if args.policy == "store":
        # 1. serve, recording the shapes the layers (or the compiled graphs) are called with
        recording = ScheduleMap.load(store, model=tuned, dtype=args.dtype, device=args.device)
        generate(served(recording), cfg, ids, args.new_tokens, device)
        served.done()
        shapes = recording.shapes.save(store / "shapes" / f"{tuned.replace(':', '-')}_{args.dtype}.json")
        print(f"1. served {recording.shapes.total_calls:,} {calls_of(args)} in {len(recording.shapes.calls)} shapes; "
              f"saved {shapes}")
        # 2. tune what was recorded
        blind = " --no-model" if args.no_model else ""
        print(f"2. dynaflow-tune tune --shapes {shapes} --buckets {args.buckets} --trials {args.trials}{blind}")
        code = tuner(["tune", "--shapes", str(shapes), "--buckets", str(args.buckets), "--trials", str(args.trials),
                      "--store", str(store), "--storage", f"sqlite:///{store / 'studies.db'}", "--device", args.device,
                      "--dtype", args.dtype] + (["--no-progress"] if args.no_progress else [])
                     + (["--no-model"] if args.no_model else []))
        if code != 0:
            raise SystemExit(f"tuning failed (exit {code})")
        # 3. serve again: the server's three lines at start-up
        chooser = ScheduleMap.load(store, model=tuned, dtype=args.dtype, device=args.device)
    else:
        chooser = dbo

    rows: dict[str, list[float]] = {"unscheduled": [], "scheduled": []}
    scheduled = served(chooser) if args.granularity == "op" else None  # compiled once, reused every round
    if scheduled is not None:
        generate(scheduled, cfg, ids, args.new_tokens, device)  # compiles (prefill, decode) outside the timing
        chooser.rule_counts.clear() if isinstance(chooser, ScheduleMap) else None
    calls = calls_of(args)
    for _ in range(args.rounds):  # interleaved, so machine noise hits both alike
        served.done()  # the plain model: no wrapper left on its layers
        rows["unscheduled"].append(generate(model, cfg, ids, args.new_tokens, device))
        rows["scheduled"].append(generate(scheduled or served(chooser), cfg, ids, args.new_tokens, device))
    served.done()
    print(f"3. served {args.requests} requests x {args.prompt} prompt tokens, {args.new_tokens} new tokens, "
          f"{args.device}, policy {args.policy}, {args.granularity} granularity, {args.rounds} interleaved "
          f"round{'' if args.rounds == 1 else 's'}")
    if isinstance(chooser, ScheduleMap):
        counts = dict(sorted(chooser.rule_counts.items()))
        stats.update(tuned_share=chooser.tuned_share(), rule_counts=counts)
        print(f"   {chooser.tuned_share():.1%} of {calls} answered by a tuned schedule (by rule: {counts})")
    for name, tps in rows.items():
        print(f"   {name:<12} {spread(tps)}")
    ratio = statistics.median(rows["scheduled"]) / statistics.median(rows["unscheduled"])
    print(f"   ratio        {ratio:10.3f}x")
    stats.update(rows=rows, ratio=ratio)
    return stats


def calls_of(args) -> str:
    """What one recorded shape counts, the same words in every line: a decoder layer's call, or
    (op granularity) a call of the compiled graph of the whole model."""
    return "layer calls" if args.granularity == "layer" else "model calls (one graph each)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="results")
    p.add_argument("--model", default="llama-small", choices=sorted(PRESETS), help="the preset whose sizes the HF model takes")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--policy", choices=["store", "dbo"], default="store")
    p.add_argument("--granularity", choices=["layer", "op"], default="layer",
                   help="schedule whole decoder layers, or the ops inside them (torch.compile backend)")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--buckets", type=int, default=4, help="buckets tuned for the recorded shapes")
    p.add_argument("--trials", type=int, default=8, help="distinct schedules measured per bucket")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while tuning (long at --granularity op)")
    p.add_argument("--no-model", action="store_true", help="tune without the performance model (tune --no-model): "
                   "no profile measured, every bucket searched")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    run(args)


if __name__ == "__main__":
    main()
