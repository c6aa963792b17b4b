"""A toy server: load the schedule store at start-up, generate for a batch of requests with a
Hugging Face model (random weights, built from its config: nothing is downloaded), and print
tokens/s with and without the schedules, measured side by side.

    python examples/serve.py                               # schedules from results/ (llama-small, float32, cpu)
    python examples/serve.py --policy dbo                  # a ten-line dual-batch-overlap policy instead
    python examples/serve.py --device cuda --store results --model llama3-8b --dtype bfloat16

On a 2-core CPU the store says sequential is best, so both rows match: that is the point of
storing "sequential is best" rather than a schedule that only looked faster.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from dynaflow.runtime import Schedule, ScheduleMap, StreamSpec, apply_schedules, remove_schedules


def dbo(layout):
    """Dual-batch overlap: two nano-batches on two streams, only for batches of 8+ requests."""
    if layout.num_requests < 8:
        return Schedule()
    half = layout.num_requests // 2
    return Schedule(split_sizes=(half, layout.num_requests - half), streams=(StreamSpec(), StreamSpec()), label="dbo")


def generate(model, cfg, ids, new_tokens: int, device) -> float:
    """Prefill + greedy decode with a static KV cache; returns generated tokens per second."""
    cache = StaticCache(config=cfg, max_cache_len=ids.shape[1] + new_tokens + 1)
    cache.early_initialization(ids.shape[0], cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                               model.dtype, device)  # a server allocates its KV cache up front
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
            ids = logits[:, -1:].argmax(-1)
    sync()
    return ids.shape[0] * new_tokens / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="results")
    p.add_argument("--model", default="llama-small", help="the preset the store's schedules were tuned for")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--policy", choices=["store", "dbo"], default="store")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (args.requests, args.prompt), device=device)

    # start-up: the three lines a server needs
    chooser = ScheduleMap.load(args.store, model=args.model, dtype=args.dtype, device=args.device) \
        if args.policy == "store" else dbo

    rows = {"unscheduled": [], "scheduled": []}
    for _ in range(args.rounds):  # interleaved, so machine noise hits both alike
        rows["unscheduled"].append(generate(model, cfg, ids, args.new_tokens, device))
        apply_schedules(model, chooser)
        rows["scheduled"].append(generate(model, cfg, ids, args.new_tokens, device))
        remove_schedules(model)
    print(f"{args.requests} requests x {args.prompt} prompt tokens, {args.new_tokens} new tokens, "
          f"{args.device}, policy {args.policy}, median of {args.rounds} rounds")
    for name, tps in rows.items():
        print(f"{name:<12} {statistics.median(tps):10.1f} tokens/s")
    print(f"ratio        {statistics.median(rows['scheduled']) / statistics.median(rows['unscheduled']):10.3f}x")


if __name__ == "__main__":
    main()
