"""The vLLM plugin's cost when it answers sequential: vLLM with the plugin on (an empty store:
every step is looked up and answered sequential, running vLLM's own compiled graph) against vLLM
without it, in interleaved rounds, each round a fresh engine of each (off, on, off, on, ...);
and, measured inside the plugin's engine, the share of each sequential step the plugin spends
deciding (reading the step's batch, the lookup) before it runs vLLM's graph: the same cost
without the noise between engine processes, which on a 2-core machine exceeds 10%.

    python benchmarks/vllm_overhead.py [--rounds 3] [--max-tokens 128]

Needs vLLM (`sh scripts/setup.sh --vllm`, or the overlay scripts/test.sh makes). Target: time per
output token with the plugin <= 1.03x without it. Printed: each round's time per output token,
the median ratio and its spread over the rounds, the plugin's share of a step, and the engine
start-up time the plugin adds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PLUGIN_ENV = ("DYNAFLOW_VLLM_SCHEDULES", "DYNAFLOW_VLLM_POLICY", "DYNAFLOW_VLLM_REPORT")


def serve(model: str, out: str, max_tokens: int) -> None:
    """One engine: 16 prompts of mixed lengths (chunked prefill mixes them with decodes), greedy."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=model, skip_tokenizer_init=True, dtype="float32", max_model_len=512, max_num_batched_tokens=64,
              max_num_seqs=16, enable_chunked_prefill=True, enable_prefix_caching=False, kv_cache_memory_bytes=2**27)
    startup = time.perf_counter() - t0
    prompts = [TokensPrompt(prompt_token_ids=[(7 * i + 3 * j) % 500 + 1 for j in range(3 + 11 * i)]) for i in range(16)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)  # warm
    t1 = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t1
    tokens = sum(len(r.outputs[0].token_ids) for r in results)
    Path(out).write_text(json.dumps({"startup_s": startup, "s_per_token": seconds / tokens, "tokens": tokens,
                                     "ids": [list(r.outputs[0].token_ids) for r in results]}))


def make_model(folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=1024)).save_pretrained(folder)


def round_of(model: Path, out: Path, max_tokens: int, store: Path | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in PLUGIN_ENV}
    if store is not None:
        env["DYNAFLOW_VLLM_SCHEDULES"] = str(store)
        env["DYNAFLOW_VLLM_REPORT"] = str(out.with_suffix(".report.json"))
    run = subprocess.run([sys.executable, __file__, "--serve", str(model), str(out), "--max-tokens", str(max_tokens)],
                         env=env, capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        sys.exit(f"vllm_overhead: a {'plugin' if store else 'plain'} engine failed:\n{(run.stdout + run.stderr)[-3000:]}")
    result = json.loads(out.read_text())
    if store is not None:
        result["report"] = json.loads(out.with_suffix(".report.json").read_text())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--serve", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], args.serve[1], args.max_tokens)
        return
    try:
        import vllm  # noqa: F401
    except ImportError:
        sys.exit("vllm_overhead: vLLM is not installed here; `sh scripts/setup.sh --vllm` installs its CPU build.")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        make_model(tmp_path / "llama")
        (tmp_path / "empty-store").mkdir()
        rows = []
        for r in range(args.rounds):
            off = round_of(tmp_path / "llama", tmp_path / "off.json", args.max_tokens, None)
            on = round_of(tmp_path / "llama", tmp_path / "on.json", args.max_tokens, tmp_path / "empty-store")
            if on["ids"] != off["ids"]:
                sys.exit("vllm_overhead: the plugin's tokens differ from vLLM's: a bug, not a cost")
            rows.append((off, on))
            print(f"round {r + 1}: {on['tokens']} output tokens; per token without the plugin "
                  f"{1e3 * off['s_per_token']:.2f} ms, with it {1e3 * on['s_per_token']:.2f} ms "
                  f"({on['s_per_token'] / off['s_per_token']:.3f}x); start-up {off['startup_s']:.1f} s vs "
                  f"{on['startup_s']:.1f} s", flush=True)
    ratios = [on["s_per_token"] / off["s_per_token"] for off, on in rows]
    shares = [on["report"]["deciding_s"] / on["report"]["sequential_steps_s"] for _, on in rows]
    per_step = [1e6 * on["report"]["deciding_s"] / max(on["report"]["steps_sequential"], 1) for _, on in rows]
    added = [on["startup_s"] - off["startup_s"] for off, on in rows]
    print(f"time per output token, plugin answering sequential / vLLM without it: {statistics.median(ratios):.3f}x "
          f"median over {len(ratios)} rounds (spread {min(ratios):.3f}-{max(ratios):.3f}x; target <= 1.03x)")
    print(f"inside the plugin's engine: deciding takes {statistics.median(per_step):.0f} us per sequential step, "
          f"{statistics.median(shares):.2%} of the step (spread {min(shares):.2%}-{max(shares):.2%}): a time per "
          f"token of {1 + statistics.median(shares):.3f}x vLLM's own graph")
    print(f"engine start-up the plugin adds: {statistics.median(added):+.1f} s median "
          f"({min(added):+.1f} to {max(added):+.1f} s)")


if __name__ == "__main__":  # vLLM's engine core is a spawned process: it imports this file again
    main()
