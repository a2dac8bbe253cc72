"""llama.cpp (llama-cpp-python) as a peer in the benchmarks: one timed greedy generation."""

from __future__ import annotations

import time


def timed_generation(llm, ids: list[int], n: int) -> dict:
    """Greedy-decode `n` tokens after prompt `ids` on a `llama_cpp.Llama`; TTFT, prefill and decode tok/s."""
    llm.reset()  # else generate() reuses the KV prefix of the identical previous prompt and skips prefill
    t0 = time.perf_counter()
    t_first = None
    count = 0
    for _ in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        count += 1
        if count == 1:
            t_first = time.perf_counter()
        if count == n:
            break
    t_end = time.perf_counter()
    ttft = t_first - t0
    return {"ttft_s": ttft, "prefill_tok_s": len(ids) / ttft, "decode_tok_s": (n - 1) / (t_end - t_first)}
