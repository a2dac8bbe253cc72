"""`edgewise flash convert` and `flash probe`: a model made ready for flash inference, and the disk measured."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from edgewise.cli.args import non_negative_float, positive_int, progress_bar
from edgewise.errors import EdgewiseError


def add_commands(sub) -> None:
    """`flash convert` and `flash probe`."""
    flash = sub.add_parser("flash", help="flash inference: convert a model into a flash store, measure the disk")
    flash_sub = flash.add_subparsers(dest="flash_command", metavar="ACTION", required=True)
    conv = flash_sub.add_parser(
        "convert",
        help="write a flash store: a streaming plan (--budget; K-quant models), or the bundled FFN file with predictors (Q4_1)",
        description="With --budget SIZE: a streaming plan (STORE/manifest.json, plan.md) for any GGUF, run with `generate --flash "
        "STORE`; the FFN weights that do not fit stream from the GGUF itself each pass (edgewise.flash.plan_store). "
        "Without: split a Q4_1 GGUF into the first engine's bundled store (STORE/manifest.json, metadata.json, resident.safetensors, ffn.bin). "
        "The FFN file holds, per layer and neuron, gate row + up row + down column in the GGUF's Q4_1, in 4 KiB units "
        "ordered by co-activation. Low-rank predictors are fitted on --calibration-tokens of --corpus, and the operating "
        "point is the smallest fraction of units whose perplexity on the following --eval-tokens stays within --tolerance. "
        "It works one layer at a time, so memory does not grow with the model's depth: on the default model it takes about "
        "2 minutes and 0.85 GB peak RSS (torch itself is 0.2 GB of that; benchmarks/results/flash_convert.md); more "
        "--calibration-tokens or a wider model hold more of one layer's activations at once.",
    )
    conv.add_argument("store", metavar="STORE", help="output directory")
    conv.add_argument("--model", metavar="NAME|PATH.gguf", help="an embedded model or a GGUF; without --budget its FFN weights must be Q4_1 (default: the embedded SmolLM2-135M)")
    conv.add_argument(
        "--budget", metavar="SIZE", help="write a streaming plan instead, for any GGUF (Q4_K models such as qwen2.5-coder-1.5b): keep SIZE of "
        "the weights in RAM (900MB, or a share: 50%%), attention, norms and output head first, then FFN tensors by use per byte, and stream "
        "the rest from the GGUF each pass. SIZE counts weights and reading buffers; the process adds about 0.25 GB (torch, activations, "
        "KV cache: benchmarks/results/flash.md). Prints the plan; the store pins the GGUF by sha256 and reads it in place (no copy)",
    )
    conv.add_argument("--corpus", default="shakespeare", metavar="shakespeare|austen|FILE", help="calibration text (default shakespeare)")
    conv.add_argument("--calibration-tokens", type=positive_int, default=8192, help="tokens the predictors are fitted on (default 8192)")
    conv.add_argument("--eval-tokens", type=positive_int, default=1024, help="held-out tokens the operating point is chosen on (default 1024)")
    conv.add_argument("--rank", type=positive_int, default=32, help="predictor rank (default 32)")
    conv.add_argument("--tolerance", type=non_negative_float, default=0.04, help="relative perplexity rise allowed at the operating point (default 0.04)")
    pr = flash_sub.add_parser(
        "probe",
        help="measure direct-read throughput against read size and threads: the engine's cost model",
        description="Random O_DIRECT reads of 4 KiB..1 MiB with 1..32 threads on a scratch file. Saved as STORE/probe.json "
        "when a store is given, else as this machine's default (~/.cache/edgewise/flash_probe.json).",
    )
    pr.add_argument("store", nargs="?", metavar="STORE", help="save the result with this store (and probe its disk)")
    conv.set_defaults(handler=cmd_flash_convert)
    pr.set_defaults(handler=cmd_flash_probe)


def cmd_flash_probe(args) -> int:
    from edgewise.flash.engine import default_probe_path
    from edgewise.flash.store import PROBE_FILE
    from edgewise.flash.io import probe

    folder = Path(args.store) if args.store else default_probe_path().parent
    if args.store and not folder.is_dir():
        raise EdgewiseError(f"{folder}: no such flash store directory; create it with `edgewise flash convert {folder}`")
    folder.mkdir(parents=True, exist_ok=True)
    result = probe(folder, progress=progress_bar("probing"))
    out = result.save(folder / PROBE_FILE if args.store else default_probe_path())
    print(f"direct I/O: {'O_DIRECT' if result.direct else 'page cache + DONTNEED (O_DIRECT refused)'}")
    print("read size  " + "  ".join(f"{t:>3} thr" for t in result.threads) + "   (GB/s)")
    for size, row in zip(result.sizes, result.gbps):
        print(f"{size >> 10:>6} KiB " + "  ".join(f"{g:7.2f}" for g in row))
    print(f"saved {out}")
    return 0


def cmd_flash_convert(args) -> int:
    if args.budget is not None:
        return _convert_plan(args)
    from edgewise.flash.convert import ConvertOptions, convert

    opts = ConvertOptions(args.corpus, args.calibration_tokens, args.eval_tokens, rank=args.rank, tolerance=args.tolerance, log=lambda msg: print(msg, file=sys.stderr))
    store = convert(args.store, args.model, opts, progress=progress_bar)
    manifest = json.loads((store / "manifest.json").read_text())
    print(f"wrote {store}: ffn.bin {(store / 'ffn.bin').stat().st_size / 1e6:.1f} MB, resident {(store / 'resident.safetensors').stat().st_size / 1e6:.1f} MB")
    print(f"operating point: {manifest['predictor']['active_fraction']:.0%} of FFN units per token")
    return 0


def _convert_plan(args) -> int:
    from edgewise.flash.plan_store import PlanStore

    saved = PlanStore.write(args.store, args.model, args.budget, progress=progress_bar("checksum of the GGUF", unit="B"))
    plan = saved.plan
    print(plan.table())
    ring = "two layers: reads overlap compute" if plan.ring_depth > 1 else "one layer: the budget cannot hold two, so reads and compute take turns"
    print(f"prefetch ring: {ring}")
    print(f"wrote {saved.path}: {plan.dram_bytes / 1e6:.0f} MB in RAM of {plan.budget_bytes / 1e6:.0f} MB, "
          f"{plan.bytes_per_token / 1e6:.0f} MB streamed from {saved.model_path.name} per pass")
    print(f"next: edgewise generate --flash {args.store} --speculate 4 \"...\"  (and `edgewise flash probe {args.store}` for the disk's bound)")
    return 0

