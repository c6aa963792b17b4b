"""Serve 16 prompts of mixed lengths with vLLM (CPU build) and write what came back as JSON.

    python tests/vllm_driver.py MODEL_DIR OUT.json ['{"enforce_eager": true}']

The plugin is on or off by the environment (DYNAFLOW_VLLM_SCHEDULES / DYNAFLOW_VLLM_POLICY), as
for any vLLM user. A 64-token step budget makes vLLM chunk the longer prompts, so steps mix
prefill chunks with decodes. Written: each prompt's greedy tokens, the log-probability of each,
and the seconds the engine took to start.
"""
import json
import sys
import time


def prompts(n: int = 16) -> list[list[int]]:
    return [[(7 * i + 3 * j) % 500 + 1 for j in range(3 + 11 * i)] for i in range(n)]


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model, out = sys.argv[1], sys.argv[2]
    extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}  # more of LLM's arguments (enforce_eager, ...)
    t0 = time.perf_counter()
    llm = LLM(model=model, skip_tokenizer_init=True, dtype="float32", max_model_len=512, max_num_batched_tokens=64,
              max_num_seqs=16, enable_chunked_prefill=True, enable_prefix_caching=False, kv_cache_memory_bytes=2**27,
              seed=0, **extra)
    startup = time.perf_counter() - t0
    t1 = time.perf_counter()
    results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts()],
                           SamplingParams(max_tokens=8, temperature=0, logprobs=1), use_tqdm=False)
    generate = time.perf_counter() - t1
    tokens = [list(r.outputs[0].token_ids) for r in results]
    logprobs = [[step[t].logprob for step, t in zip(r.outputs[0].logprobs, r.outputs[0].token_ids)] for r in results]
    with open(out, "w") as f:
        json.dump({"tokens": tokens, "logprobs": logprobs, "startup_s": startup, "generate_s": generate}, f)


if __name__ == "__main__":  # vLLM's engine core is a spawned process: it imports this file again
    main()
