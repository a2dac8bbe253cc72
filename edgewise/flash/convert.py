"""`edgewise flash convert`: GGUF -> flash store (see `edgewise.flash.store` for the format).

1. One pass over the layers, one block in memory at a time (`edgewise.lm.layerwise.LayerWalk`): the
   dense model (fp32) runs calibration text through layer i, whose FFN inputs x and |h| fit its
   low-rank predictor and neuron order; then held-out text goes through layer i, dense and at each
   candidate fraction of units.
2. The operating point (fraction of units computed) is the smallest fraction whose held-out
   perplexity stays within the tolerance; the predictors' recall and precision there are reported.
3. Write ffn.bin, resident.safetensors, metadata.json and the manifest into a new folder that
   replaces the store whole (`edgewise.files.atomic_dir`).

Memory is bounded by one layer's work, not the model: the calibration and held-out residual streams
(4 bytes x tokens x d_model each), one block's fp32 weights, and one layer's x and |h| with the
fit's float64 copies. `benchmarks/flash_convert.py` measures the peak.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgewise import __version__
from edgewise.data.text import load_text
from edgewise.errors import EdgewiseError
from edgewise.files import atomic_dir
from edgewise.flash.predictor import (
    SelectedFFN,
    capture_block,
    fit_predictor,
    neuron_unit_index,
    order_neurons,
    recall_precision,
    unit_predictor,
)
from edgewise.flash.store import (
    FORMAT,
    PROBE_FILE,
    VERSION,
    BundleLayout,
    check_ffn_tensors,
    jsonable,
    pack_layer,
    resident_tensor_entries,
    sha256_file,
    split_down,
)
from edgewise.gguf_io import read_gguf
from edgewise.lm.config import ModelConfig
from edgewise.lm.layerwise import LayerWalk
from edgewise.lm.threads import ThreadGovernor
from edgewise.lm.tokenizer import TextTokenizer
from edgewise.models import resolve_model

DEFAULT_FRACTIONS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

Progress = Callable[[str], Callable[[int, int], None]]


@dataclass
class ConvertOptions:
    corpus: str = "shakespeare"
    calibration_tokens: int = 8192  # predictors and neuron order are fitted on these
    eval_tokens: int = 1024  # the operating point is chosen on these (the following tokens)
    ctx: int = 256
    rank: int = 32
    tolerance: float = 0.04  # perplexity may rise this much (relative) at the operating point
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    seed: int = 0
    log: Callable[[str], None] = field(default=lambda msg: None)


def _no_progress(desc: str) -> Callable[[int, int], None]:
    return lambda done, total: None


def _windows(ids: list[int], ctx: int) -> list[list[int]]:
    return [ids[i : i + ctx] for i in range(0, len(ids) - ctx + 1, ctx)]


@dataclass
class Calibrated:
    """What the pass over the layers found: per layer the neuron order and unit predictor (A, B_u, c_u); the
    sweep over fractions (perplexity, recall, precision); per layer quality at the chosen fraction."""

    orders: list[np.ndarray]
    unit_preds: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    sweep: list[dict]
    quality: list[dict]
    dense_ppl: float
    chosen: dict


def _calibrate(walk: LayerWalk, layout: BundleLayout, opts: ConvertOptions, train_windows: list[list[int]], eval_windows: torch.Tensor, progress: Progress) -> Calibrated:
    """Steps 1 and 2 of the module docstring: the pass over the layers, then the operating point."""
    fractions = sorted(set(opts.fractions) | {1.0})
    k_of = {f: max(1, math.ceil(f * layout.n_units)) for f in fractions}
    cfg = walk.cfg
    calib_h = walk.embed(torch.tensor(train_windows))
    dense_h = walk.embed(eval_windows)
    sparse_h = {f: dense_h.clone() for f in fractions if f < 1.0}
    orders, unit_preds = [], []
    quality: dict[float, list[dict]] = {f: [] for f in fractions}  # per fraction, per layer: held-out recall and precision
    bar = progress("calibrating layers")
    for i in range(cfg.n_layers):
        block = walk.block(i)
        calib_h, x, h_abs = capture_block(walk, block, calib_h)
        pred = fit_predictor(x, h_abs, opts.rank)
        order = order_neurons(h_abs, layout.bundles_per_unit)
        del x, h_abs
        a, b_units, c_units = unit_predictor(pred, order, layout.bundles_per_unit)
        neuron_unit = neuron_unit_index(order, layout.bundles_per_unit, cfg.ffn_dim)
        orders.append(order)
        unit_preds.append((a, b_units, c_units))
        dense_h, x, h_abs = capture_block(walk, block, dense_h)
        scores = (x @ a.T) @ b_units.T + c_units
        for f in fractions:
            r, p = recall_precision(scores, h_abs, neuron_unit, k_of[f], layout.bundles_per_unit)
            quality[f].append({"layer": i, "recall": round(r, 4), "precision": round(p, 4)})
        del x, h_abs, scores
        dense_ffn = block.ffn
        for f in sparse_h:
            block.ffn = SelectedFFN(dense_ffn, a, b_units, c_units, neuron_unit, k_of[f])
            sparse_h[f] = walk.run_block(block, sparse_h[f])
        del block, dense_ffn
        bar(i + 1, cfg.n_layers)
    del calib_h

    # the operating point: the smallest fraction within the tolerance of the dense perplexity
    nll = dict(zip([1.0, *sparse_h], walk.nll([dense_h, *sparse_h.values()], eval_windows)))
    ppl = {f: math.exp(total / count) for f, (total, count) in nll.items()}
    dense_ppl = ppl[1.0]
    sweep = [{"fraction": f, "k_units": k_of[f], "ppl": ppl[f]} for f in fractions]
    chosen = next(s for s in sweep if s["ppl"] <= dense_ppl * (1 + opts.tolerance))
    for entry in sweep:
        entry["recall"] = round(float(np.mean([q["recall"] for q in quality[entry["fraction"]]])), 4)
        entry["precision"] = round(float(np.mean([q["precision"] for q in quality[entry["fraction"]]])), 4)
    quality = quality[chosen["fraction"]]
    opts.log(
        f"operating point: {chosen['fraction']:.0%} of units ({chosen['k_units']}/{layout.n_units} per layer), ppl {chosen['ppl']:.3f} vs dense {dense_ppl:.3f}"
        f" (limit +{opts.tolerance:.0%}); predictor recall {np.mean([q['recall'] for q in quality]):.3f}, precision {np.mean([q['precision'] for q in quality]):.3f}"
    )

    return Calibrated(orders, unit_preds, sweep, quality, dense_ppl, chosen)


def convert(store_dir: str | os.PathLike, model_path: str | os.PathLike | None = None, options: ConvertOptions | None = None, progress: Progress = _no_progress) -> Path:
    opts = options or ConvertOptions()
    t_start = time.perf_counter()
    store = Path(store_dir).resolve()
    if store.exists() and not store.is_dir():
        raise EdgewiseError(f"{store}: exists and is not a directory; give a directory for the flash store")
    if store.is_dir() and any(store.iterdir()) and not (store / "manifest.json").is_file():
        raise EdgewiseError(f"{store}: a folder that is not a flash store and not empty; the new store replaces the folder whole, so give a new or empty one")
    path = resolve_model(model_path)
    if store in Path(path).resolve().parents:
        raise EdgewiseError(f"{path}: the model lies inside the store {store}, which convert replaces whole; move it out first")
    gguf = read_gguf(path)
    cfg = ModelConfig.from_gguf(gguf)
    check_ffn_tensors(gguf, cfg.n_layers)
    layout = BundleLayout.for_dims(cfg.dim, cfg.ffn_dim)
    tokenizer = TextTokenizer.from_gguf(gguf)

    # the calibration text, in windows no longer than the model's context
    ctx = min(opts.ctx, cfg.context_length)
    ids = tokenizer.encode(load_text(opts.corpus)[: 12 * (opts.calibration_tokens + opts.eval_tokens)])
    need = opts.calibration_tokens + opts.eval_tokens
    if len(ids) < need:
        raise EdgewiseError(f"corpus {opts.corpus!r} gives {len(ids)} tokens; calibration needs {need} (--calibration-tokens + --eval-tokens)")
    train_windows = _windows(ids[: opts.calibration_tokens], ctx)
    eval_ids = ids[opts.calibration_tokens : need]
    if not train_windows or len(eval_ids) < ctx:
        raise EdgewiseError(f"--calibration-tokens and --eval-tokens must each be at least the calibration window of {ctx} tokens")
    torch.manual_seed(opts.seed)

    # steps 1 and 2 of the module docstring: one pass over the layers, each built from the GGUF when reached
    # (`LayerWalk`). The dense calibration stream gives layer i's x and |h|, which fit its predictor and neuron
    # order; then the held-out stream goes through layer i dense, and once more per candidate fraction with the
    # fitted predictor selecting units (`SelectedFFN`), so every fraction's perplexity comes out of the same pass
    governor = ThreadGovernor()  # the thread count follows the free CPUs: OpenMP workers spinning beside a busy process slow every layer
    governor.start()
    try:
        fit = _calibrate(LayerWalk(gguf, tick=governor.tick), layout, opts, train_windows, torch.tensor(_windows(eval_ids, ctx)), progress)
    finally:
        governor.stop()
    orders, unit_preds, k_units = fit.orders, fit.unit_preds, fit.chosen["k_units"]

    # 3. files, into a new folder swapped in whole: a killed convert never leaves a partial store, nor
    # loses the previous one (a probe measured for the old store is carried over)
    with atomic_dir(store, keep=(PROBE_FILE,)) as out:
        layers, down_scales = [], []
        bar = progress("writing ffn.bin")
        ffn_bytes = 0
        with open(out / "ffn.bin", "wb") as f:
            for i in range(cfg.n_layers):
                t = lambda name: gguf.tensor(f"blk.{i}.{name}.weight")  # noqa: E731
                ffn_bytes += sum(t(name).nbytes for name in ("ffn_gate", "ffn_up", "ffn_down"))
                columns, down_d, down_m = split_down(np.asarray(t("ffn_down").raw), cfg.dim, cfg.ffn_dim)
                down_scales.append((down_d, down_m))
                units = pack_layer(layout, np.asarray(t("ffn_gate").raw), np.asarray(t("ffn_up").raw), columns, orders[i])
                layers.append({"offset": f.tell(), "bytes": int(units.nbytes), "sha256": hashlib.sha256(units).hexdigest()})
                f.write(units)
                bar(i + 1, cfg.n_layers)
            f.flush()
            os.fsync(f.fileno())

        from safetensors.numpy import save_file

        resident = {name: np.ascontiguousarray(t.raw) for name, t in resident_tensor_entries(gguf).items()}
        for i in range(cfg.n_layers):
            a, b_units, c_units = unit_preds[i]
            resident[f"flash.blk.{i}.down_d"], resident[f"flash.blk.{i}.down_m"] = down_scales[i]
            # fp32: the top-k boundary is full of near ties, and fp16 factors moved the chosen units enough to
            # change the perplexity the operating point was chosen from (232 -> 328 at 50% on the test store)
            resident[f"flash.blk.{i}.pred_a"] = a.to(torch.float32).numpy()
            resident[f"flash.blk.{i}.pred_b"] = b_units.to(torch.float32).numpy()
            resident[f"flash.blk.{i}.pred_c"] = c_units.to(torch.float32).numpy()
            resident[f"flash.blk.{i}.order"] = orders[i]
        # safetensors.numpy writes an array's memory as it lies: a transposed view would read back scrambled
        save_file({name: np.ascontiguousarray(array) for name, array in resident.items()}, str(out / "resident.safetensors"))
        (out / "metadata.json").write_text(json.dumps({k: jsonable(v) for k, v in gguf.metadata.items()}))
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "edgewise": __version__,
            "model": {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size},
            "dims": {"n_layers": cfg.n_layers, "d_model": cfg.dim, "d_ff": cfg.ffn_dim},
            "ffn_file": {
                "path": "ffn.bin",
                "quant": "Q4_1",
                "unit_bytes": layout.unit_bytes,
                "bundles_per_unit": layout.bundles_per_unit,
                "bundle_bytes": layout.bundle_bytes,
                "n_units": layout.n_units,
                "gguf_ffn_bytes": ffn_bytes,
                "down_scale_bytes": int(sum(d.nbytes + m.nbytes for d, m in down_scales)),
                "layers": layers,
            },
            "resident_tensors": {name: {"qtype": t.qtype.name, "shape": list(t.shape)} for name, t in resident_tensor_entries(gguf).items()},
            "predictor": {
                "rank": opts.rank,
                "corpus": opts.corpus,
                "calibration_tokens": opts.calibration_tokens,
                "eval_tokens": opts.eval_tokens,
                "ctx": ctx,
                "tolerance": opts.tolerance,
                "dense_ppl": fit.dense_ppl,
                "sweep": fit.sweep,
                "active_fraction": fit.chosen["fraction"],
                "k_units": [k_units] * cfg.n_layers,
                "quality": fit.quality,
            },
            "convert_seconds": round(time.perf_counter() - t_start, 1),
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return store

