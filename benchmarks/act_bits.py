"""Which layers' inputs may the native kernels round to int8, and which need int16?

Perplexity of the quantized model with each layer role's activations at 8 bits (others at 16),
against the fp32 dequantized model, on held-out text. Writes benchmarks/results/act_bits.md.

    python benchmarks/act_bits.py [--text austen] [--ctx 512] [--tokens 4096]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from edgewise.data.text import load_text
from edgewise.files import write_text_atomic
from edgewise.gguf_io import read_gguf
from edgewise.lm.model import ACT_BITS, Llama, causal_mask
from edgewise.lm.runtime import LanguageModel
from edgewise.metrics.perplexity import perplexity

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default="austen")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--tokens", type=int, default=4096)
    args = p.parse_args()

    lm = LanguageModel.load(precision="fp32", compile=False)
    gguf = read_gguf(lm.path)
    ids = lm.tokenizer.encode(load_text(args.text)[: args.tokens * 8])

    def ppl_of(model: Llama) -> float:
        cache = model.new_cache(args.ctx)

        @torch.no_grad()
        def logits(window: list[int]) -> torch.Tensor:
            return model(torch.tensor(window), torch.arange(len(window)), causal_mask(0, len(window)), cache.keys, cache.values)

        return perplexity(logits, ids, args.ctx, args.tokens).ppl

    reference = ppl_of(lm.model)
    configs = {"all 16-bit": {k: 16 for k in ACT_BITS}, "all 8-bit": {k: 8 for k in ACT_BITS}}
    for role in ACT_BITS:
        configs[f"{role} 8-bit, rest 16"] = {**{k: 16 for k in ACT_BITS}, role: 8}
    rows = []
    for name, bits in configs.items():
        model = Llama.from_gguf(gguf, "quant", act_bits=bits)
        value = ppl_of(model)
        rows.append((name, value, value / reference - 1))
        print(f"{name:32s} ppl {value:.4f} ({value / reference - 1:+.3%})", flush=True)
    lines = [
        f"# Activation rounding per layer role ({args.text}, {args.tokens} tokens, windows of {args.ctx})",
        "",
        f"fp32 dequantized reference: ppl {reference:.4f}",
        "",
        "| activations | ppl | vs fp32 |",
        "|---|---:|---:|",
        *[f"| {n} | {v:.4f} | {r:+.3%} |" for n, v, r in rows],
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RESULTS / "act_bits.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
