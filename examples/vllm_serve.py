"""The whole loop in vLLM: serve while recording the step shapes vLLM's scheduler forms, tune
them on vLLM's own model, serve again with the tuned store, and print the share of steps a tuned
record answered.

    sh scripts/setup.sh --vllm                 # vLLM's CPU build, once
    python examples/vllm_serve.py              # a random-weight Llama (2 layers), ~5 minutes on 2 cores
    python examples/vllm_serve.py --model DIR --buckets 4 --trials 20

Each serve is a process of its own (the plugin reads its switch, DYNAFLOW_VLLM_SCHEDULES, as
vLLM starts): the first with an empty store (every step sequential; the step shapes written to
shapes.json as the engine exits), then `dynaflow-tune tune --model vllm:DIR --shapes
shapes.json` (each bucket measured in vLLM's worker, on a step of its shape that vLLM's
scheduler formed), then the second serve with the tuned store. On a 2-core CPU the tuner finds
vLLM's own compiled graph best for every bucket, so the second serve runs the same steps: the
records answered them, and "sequential" was their answer.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def prompts(n: int) -> list[list[int]]:
    return [[(7 * i + 3 * j) % 500 + 1 for j in range(3 + (37 * i) % 200)] for i in range(n)]


def serve(model: str, out: str, requests: int) -> None:
    """One serve (run in its own process): greedy tokens for `requests` prompts of mixed lengths,
    with a 128-token step budget so that steps mix prefill chunks with decodes."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model, skip_tokenizer_init=True, dtype="float32", max_model_len=512, max_num_batched_tokens=128,
              max_num_seqs=32, enable_chunked_prefill=True, enable_prefix_caching=False, seed=0)
    t0 = time.perf_counter()
    results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts(requests)],
                           SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = [list(r.outputs[0].token_ids) for r in results]
    Path(out).write_text(json.dumps({"tokens": tokens, "seconds": seconds}))


def random_llama(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=1024)).save_pretrained(folder)
    return folder


def run(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv[:4])} ... failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return done


def served(work: Path, model: Path, name: str, store: Path, requests: int, **env: str) -> dict:
    out, report = work / f"{name}.json", work / f"{name}.report.json"
    run([sys.executable, __file__, "--serve", str(model), str(out), "--requests", str(requests)],
        DYNAFLOW_VLLM_SCHEDULES=str(store), DYNAFLOW_VLLM_REPORT=str(report), **env)
    return {**json.loads(out.read_text()), "report": json.loads(report.read_text())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="a model folder vLLM serves (default: a random Llama)")
    ap.add_argument("--work", type=Path, default=None, help="where the store, shapes and study go (default: a temp dir)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--buckets", type=int, default=3)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--serve", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(*args.serve, args.requests)
    work = args.work or Path(tempfile.mkdtemp(prefix="dynaflow-vllm-"))
    work.mkdir(parents=True, exist_ok=True)
    model = args.model or random_llama(work / "llama")
    store, shapes = work / "store", work / "shapes.json"
    store.mkdir(exist_ok=True)
    print(f"model {model}, work in {work}", flush=True)

    first = served(work, model, "before", store, args.requests, DYNAFLOW_VLLM_SHAPES=str(shapes))
    print(f"serve 1 (empty store): {first['report']['steps_sequential']} steps, all sequential; "
          f"their shapes in {shapes}", flush=True)
    tuned = run([sys.executable, "-m", "dynaflow.tuner.cli", "tune", "--model", f"vllm:{model}", "--shapes",
                 str(shapes), "--buckets", str(args.buckets), "--trials", str(args.trials), "--store", str(store),
                 "--storage", f"sqlite:///{work / 'study.db'}", "--no-progress"])
    for line in tuned.stdout.splitlines():
        if re.match(r"(recorded|coverage|  vllm-|vllm-)", line):
            print(f"  tune: {line.strip()}")
    second = served(work, model, "after", store, args.requests)
    rules = second["report"]["answered_by"]
    total = sum(rules.values())
    share = (rules.get("exact", 0) + rules.get("nearest", 0)) / total if total else 0.0
    print(f"serve 2 (tuned store): a tuned record answered {share:.1%} of {total} steps "
          f"(exact {rules.get('exact', 0)}, nearest {rules.get('nearest', 0)}, no record {rules.get('sequential', 0)}); "
          f"{second['report']['steps_split']} split, hardware {second['report']['hardware']}")
    rate = lambda r: sum(map(len, r["tokens"])) / r["seconds"]  # noqa: E731
    print(f"tokens identical: {first['tokens'] == second['tokens']}; output tokens/s {rate(first):,.0f} before, "
          f"{rate(second):,.0f} after (one run each: noisy)")


if __name__ == "__main__":  # vLLM's engine core is a spawned process: it imports this file again
    main()
