"""`edgewise tune` (a model learns its user's writing, inside a memory budget; or an adapter merged into a GGUF) and
`edgewise suggest` (a keyboard's next words)."""

from __future__ import annotations

import argparse
import sys

from edgewise.cli.args import number, positive_float, positive_int, progress_bar, size_in_bytes


def add_commands(sub) -> None:
    tune = sub.add_parser(
        "tune",
        help="fine-tune a language model on your writing, on this device, inside a memory budget (an adapter file)",
        description="Fine-tune the model on your text without it leaving the device. The base stays quantized and frozen;"
        " a contribution analysis on your text measures what each trainable piece (RMSNorm gains, biases, LoRA on a"
        " projection, rows of a projection) would gain per byte, and a search picks what trains so that the training step"
        " fits --budget (printed as a table). Checkpoints are atomic: a rerun with the same --out resumes. Ends with a line"
        " `adapter = PATH peak_mb = X trained_params = N`. Use the adapter with `edgewise generate|chat|eval ppl|suggest"
        " --adapter ADAPTER`, or merge it: `edgewise tune --merge ADAPTER OUT.gguf`.",
        epilog="examples:\n  edgewise tune --text my-notes/ --budget 64MB --out me.adapter\n"
        "  edgewise tune --text austen --budget 16MB --out austen.adapter --minutes 10\n"
        "  edgewise suggest --adapter me.adapter \"See you at the\"\n"
        "  edgewise tune --merge me.adapter me.gguf",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tune.add_argument("--text", metavar="FILE|FOLDER|austen|shakespeare", help="your writing: a UTF-8 file, a folder of .txt/.md files, or a bundled corpus")
    tune.add_argument("--out", metavar="ADAPTER", help="the adapter file to write (and to resume, when it exists)")
    tune.add_argument("--budget", type=size_in_bytes, default=None, metavar="SIZE",
                      help="memory the training may add above the model's inference footprint (16MB, 64MB; 1024-based; default 64MB)")
    tune.add_argument("--model", metavar="NAME|PATH.gguf", help="the base: an embedded model's name or a GGUF (default: SmolLM2-135M)")
    tune.add_argument("--steps", type=positive_int, default=200, help="optimizer steps (default 200)")
    tune.add_argument("--minutes", type=positive_float, default=None, help="stop (and checkpoint) after this many minutes; a rerun resumes")
    tune.add_argument("--seq-len", type=number(int, 8), default=256, help="tokens per window (default 256; the search may halve it to fit a better plan)")
    tune.add_argument("--batch", type=positive_int, default=1, help="windows per step, gradients summed over them: costs time, and 4 bytes per trained parameter (with 1, each gradient is applied inside the backward and dropped) (default 1)")
    tune.add_argument("--lr", type=positive_float, default=1e-3, help="Adam's learning rate, after a warm-up over 10%% of steps, decaying linearly (default 1e-3)")
    tune.add_argument("--checkpoint-every", type=positive_int, default=10, metavar="N", help="rewrite the adapter every N steps (default 10)")
    tune.add_argument("--seed", type=number(int, 0), default=0, help="window order and LoRA initialization (default 0)")
    tune.add_argument("--merge", nargs=2, metavar=("ADAPTER", "OUT.gguf"),
                      help="instead of training: write the base with the adapter folded in as a standalone GGUF (changed matrices requantized to their own type)")
    tune.set_defaults(handler=cmd_tune)

    sg = sub.add_parser("suggest", help="a keyboard's next-word suggestions after some text (with your adapter)",
                        description="The top next words after TEXT (or, with --complete, completions of the word TEXT ends in), with their"
                        " probabilities, one per line.")
    sg.add_argument("text", help="what has been typed so far, e.g. \"See you at the\"")
    sg.add_argument("--adapter", metavar="ADAPTER", help="an adapter from `edgewise tune` (trained on the same --model)")
    sg.add_argument("--model", metavar="NAME|PATH.gguf", help="the base model (default: SmolLM2-135M)")
    sg.add_argument("-k", type=positive_int, default=3, help="how many words (default 3)")
    sg.add_argument("--complete", action="store_true", help="TEXT ends inside a word: suggest completions of it (default: the next word)")
    sg.set_defaults(handler=cmd_suggest)


def cmd_tune(args) -> int:
    from edgewise.errors import EdgewiseError

    if args.merge:
        if args.text or args.out:
            raise EdgewiseError("--merge ADAPTER OUT.gguf writes a GGUF from a trained adapter: drop --text and --out")
        from edgewise.personalize.merge import merge

        result = merge(args.merge[0], args.merge[1], model=args.model, progress=progress_bar("merging", unit="tensor"))
        print(result.line())
        return 0
    missing = [flag for flag, value in (("--text", args.text), ("--out", args.out)) if not value]
    if missing:
        raise EdgewiseError(f"edgewise tune needs {' and '.join(missing)}: e.g. edgewise tune --text my-notes/ --budget 64MB --out me.adapter")
    from edgewise.data.text import load_user_text
    from edgewise.personalize.train import tune

    text = load_user_text(args.text)
    result = tune(
        text, args.out, args.budget or 64 << 20, model=args.model, steps=args.steps, seq_len=args.seq_len, batch=args.batch, lr=args.lr,
        seed=args.seed, minutes=args.minutes, checkpoint_every=args.checkpoint_every, log=lambda msg: print(msg, file=sys.stderr),
        progress=progress_bar("tuning", postfix=("loss", "tok/s", "peak MB")), analysis_progress=progress_bar("contribution analysis", unit="window"),
    )
    print(f"trained steps {result.resumed_at + 1}-{result.steps} in {result.seconds:.0f} s, {result.tokens_per_s:.0f} tok/s; loss {result.first_loss:.3f} -> {result.last_loss:.3f};"
          f" peak RSS {result.peak_mb:.0f} MB = inference footprint {result.inference_mb:.0f} MB + training {result.training_mb:.0f} MB"
          f" (budget {result.plan.budget / 2**20:.0f} MB)", file=sys.stderr)
    print(result.line())
    return 0


def cmd_suggest(args) -> int:
    from edgewise.errors import EdgewiseError
    from edgewise.lm.runtime import LanguageModel
    from edgewise.personalize.keyboard import suggest

    if not args.text.strip():
        raise EdgewiseError("give the text typed so far, e.g. edgewise suggest \"See you at the\"")
    lm = LanguageModel.load(args.model, compile=False, adapter=args.adapter, progress=progress_bar("loading model"))
    text = args.text if args.complete or args.text[-1].isspace() else args.text + " "
    for word, p in suggest(lm, text, k=args.k):
        print(f"{word}\t{p:.3f}")
    return 0
