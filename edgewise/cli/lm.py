"""`edgewise generate`, `chat` and `eval ppl`: a language model run from RAM, from a flash store, or streamed from its
GGUF under a RAM budget."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgewise.cli.args import non_negative_float, non_negative_int, number, positive_int, progress_bar, unit_fraction
from edgewise.errors import EdgewiseError


def add_commands(sub) -> None:
    """`generate`, `chat` and `eval ppl`."""
    gen = sub.add_parser("generate", help="continue a prompt, streaming tokens, then print TTFT, tok/s and peak RSS")
    gen.add_argument("prompt", help="the text to continue")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template as one user turn")
    add_model_args(gen)
    add_sampling_args(gen)
    add_flash_args(gen)
    gen.set_defaults(handler=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat with the model's template (empty line or Ctrl-D ends)")
    chat.add_argument("--system", help="a system prompt (default: the template's own)")
    add_model_args(chat)
    add_sampling_args(chat)
    chat.set_defaults(handler=cmd_chat)

    ev = sub.add_parser("eval", help="evaluate a model")
    ev_sub = ev.add_subparsers(dest="metric", metavar="METRIC", required=True)
    ppl = ev_sub.add_parser(
        "ppl",
        help="perplexity over non-overlapping windows of a text",
        description="Perplexity over non-overlapping windows of --ctx tokens across the first --max-tokens "
        "tokens of the text. Ends with a line `ppl = X`.",
    )
    ppl.add_argument("--text", required=True, metavar="shakespeare|austen|FILE", help="a bundled corpus or any UTF-8 file")
    ppl.add_argument("--ctx", type=number(int, 2), default=1024, help="window length in tokens (default 1024)")
    ppl.add_argument("--max-tokens", type=positive_int, default=None, help="score only the first M tokens of the text (default: all)")
    ppl.add_argument(
        "--scoring", choices=("all", "llama.cpp"), default="all",
        help="all (default): every position of each window is scored; llama.cpp: llama-perplexity's rule, only the second "
        "half of each window (and a BOS first where the tokenizer adds one), so the two tools agree on the same file",
    )
    add_model_args(ppl, compile_default=False)
    add_flash_args(ppl)
    ppl.set_defaults(handler=cmd_eval_ppl)


def add_model_args(p: argparse.ArgumentParser, compile_default: bool = True) -> None:
    from edgewise.models import DEFAULT_MODEL, model_names

    p.add_argument(
        "--model",
        metavar="NAME|PATH.gguf",
        help=f"an embedded model ({model_names()}; default {DEFAULT_MODEL}) or a GGUF file of a llama, qwen2, qwen3 or gemma3 model",
    )
    p.add_argument("--adapter", metavar="ADAPTER", help="apply an adapter from `edgewise tune`, trained on this --model (decodes eagerly)")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help="decode threads (default: adapt to the cores other processes leave free, measured while decoding)",
    )
    p.add_argument(
        "--precision",
        choices=("quant", "bf16", "fp32"),
        default="quant",
        help="quant: int4/int8 kernels on the GGUF's own quantized weights (fast, default); "
        "bf16/fp32: dequantized weights (fp32 is the reference)",
    )
    if compile_default:
        p.add_argument("--no-compile", action="store_true", help="decode eagerly instead of with the cached AOTInductor step")
        p.add_argument(
            "--wait-compile",
            action="store_true",
            help="on a first run, compile the decode step before generating (about a minute) instead of decoding eagerly"
            " while it compiles in the background",
        )


def add_flash_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("flash inference (FFN weights read from a flash store under a DRAM budget)")
    g.add_argument(
        "--flash", metavar="STORE", help="run from this store (made by `edgewise flash convert`); --model, if given, must be its source GGUF."
        " A store written with --budget (a streaming plan) fixes its budget; the options below are the bundled store's"
    )
    g.add_argument("--dram-budget", default=None, help="DRAM for FFN weights: a size (40MB, 64MiB; 1024-based) or a share of them (default 50%%)")
    g.add_argument("--window", type=non_negative_int, default=4, help="keep the units used by the last K tokens cached (default 4)")
    g.add_argument("--active-fraction", type=unit_fraction, default=None, help="fraction of FFN units each token computes (default: the store's operating point)")
    g.add_argument(
        "--reads", choices=("unit", "adjacent", "cost"), default="cost", help="one read per unit, adjacent units merged, or the cost model's plan (default)"
    )
    g.add_argument("--naive", action="store_true", help="the baseline: read every layer's whole FFN from flash every token")
    s = p.add_argument_group("streaming (a GGUF larger than the RAM it may use, read from flash every pass)")
    s.add_argument(
        "--stream-budget", metavar="SIZE", help="keep up to SIZE of the model's weights in RAM (600MB, or a share of them: 50%%), by use "
        "per byte; stream the rest of the FFN weights from the GGUF with direct reads each pass. Output is the dense model's. "
        "Pairs well with --speculate 4, which reads them once for several tokens",
    )


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=positive_int, default=128, help="new tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default); e.g. 0.7 for varied text")
    p.add_argument("--top-p", type=unit_fraction, default=0.9, help="nucleus sampling mass when temperature > 0 (default 0.9)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed for sampling (default 0)")
    p.add_argument(
        "--speculate", type=non_negative_int, default=0, metavar="N",
        help="speculative decoding: guess up to N tokens (1-7) by looking the last words up earlier in the text, and check them"
        " in one pass; greedy only, the same output in fewer passes where text repeats (code does). It pays where a pass reads"
        " the weights from flash (StreamingLanguageModel); in RAM the checks run eagerly and can be slower. 0 = off (default)",
    )


def _load(args, compile: bool):
    from edgewise.lm.runtime import LanguageModel

    return LanguageModel.load(
        args.model,
        precision=args.precision,
        compile=compile,
        progress=progress_bar("loading model"),
        log=lambda msg: print(msg, file=sys.stderr),
        wait_for_compile=getattr(args, "wait_compile", False),
        threads=args.threads,
        adapter=args.adapter,
    )


def _sampler(args):
    from edgewise.lm.runtime import Sampler

    return Sampler(args.temperature, args.top_p, args.seed)


def _lookup(args):
    """The prompt-lookup drafter for --speculate, validated before any model loads; None when off."""
    if not args.speculate:
        return None
    from edgewise.lm.speculative import PromptLookup

    if args.temperature != 0:
        raise EdgewiseError(f"--speculate checks drafts against the greedy choice: drop --temperature {args.temperature} or --speculate")
    return PromptLookup(draft=args.speculate)


def _open_stream(args):
    from edgewise.flash.runtime import StreamingLanguageModel
    from edgewise.sizes import parse_size

    parse_size(args.stream_budget, of=1, what="--stream-budget")  # the form, before the model is read
    lm = StreamingLanguageModel.open(args.model, budget=args.stream_budget, threads=args.threads, progress=progress_bar("loading model"))
    plan = lm.plan
    print(f"streaming {sum(p.nbytes for p in plan.streamed) / 1e6:.0f} MB of {lm.path.name}'s weights per pass; "
          f"{plan.dram_bytes / 1e6:.0f} MB in RAM of a {plan.budget_bytes / 1e6:.0f} MB budget", file=sys.stderr)
    return lm


def _open_flash(args):
    from edgewise.flash import plan_store
    from edgewise.flash.runtime import FlashLanguageModel, StreamingLanguageModel

    if plan_store.manifest_format(args.flash) == plan_store.FORMAT:
        given = [flag for flag, on in (("--dram-budget", args.dram_budget), ("--naive", args.naive), ("--active-fraction", args.active_fraction)) if on]
        if given:
            raise EdgewiseError(f"{args.flash} is a streaming plan, made for one budget: {given[0]} applies to the bundled store only; "
                                f"to change the budget, convert again with `edgewise flash convert {args.flash} --budget SIZE`")
        lm = StreamingLanguageModel.from_store(args.flash, model=args.model, threads=args.threads, progress=progress_bar("loading model"),
                                              check_progress=progress_bar("checksum of the GGUF", unit="B"))
        print(f"streaming {sum(p.nbytes for p in lm.plan.streamed) / 1e6:.0f} MB of {lm.path.name}'s weights per pass; "
              f"{lm.plan.dram_bytes / 1e6:.0f} MB in RAM of a {lm.plan.budget_bytes / 1e6:.0f} MB budget", file=sys.stderr)
        return lm
    return FlashLanguageModel.open(
        args.flash,
        dram_budget=args.dram_budget or "50%",
        model=args.model,
        mode="naive" if args.naive else "flash",
        window=args.window,
        reads=args.reads,
        active_fraction=args.active_fraction,
        precision=args.precision,
        progress=progress_bar("loading model"),
    )


def cmd_generate(args) -> int:
    if not args.prompt.strip():
        raise EdgewiseError("empty prompt: give some text to continue, e.g. edgewise generate \"Once upon a time\"")
    lookup = _lookup(args)
    if args.adapter and (args.flash or args.stream_budget):
        raise EdgewiseError("--adapter applies to a model run from RAM: drop --flash / --stream-budget")
    if args.flash and args.stream_budget:
        raise EdgewiseError("--flash (a converted store) and --stream-budget (a GGUF streamed as it is) are two engines: give one")
    if args.flash:
        lm = _open_flash(args)
    elif args.stream_budget:
        lm = _open_stream(args)
    else:
        lm = _load(args, compile=not args.no_compile)
    text = lm.chat_template.render([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    ids = lm.tokenizer.encode(text)
    lm.check_prompt(ids, args.max_tokens)
    if not args.chat:
        print(args.prompt, end="", flush=True)
    for piece in lm.tokenizer.stream(lm.generate(ids, args.max_tokens, _sampler(args), lookup=lookup)):
        print(piece, end="", flush=True)
    print()
    print(lm.last_stats.line(), file=sys.stderr)
    if _streams(lm):
        gbps = _probed_gbps(Path(args.flash) if args.flash else None)
        from edgewise.metrics.memory import rss_anon_bytes

        print(lm.stream_stats.line(gbps) + ("" if gbps else " | run `edgewise flash probe` once for the disk's bound")
              + f" | anonymous memory {rss_anon_bytes() / 1e6:.0f} MB (RSS also counts the GGUF's mapped pages: page cache)", file=sys.stderr)
    elif args.flash:
        print(lm.flash_stats.line(), file=sys.stderr)
    return 0


def _streams(lm) -> bool:
    from edgewise.flash.runtime import StreamingLanguageModel

    return isinstance(lm, StreamingLanguageModel)


def _probed_gbps(store: Path | None) -> float | None:
    """The disk's direct-read throughput at the streaming engine's read size (1 MiB, the most threads probed): from
    STORE/probe.json when `edgewise flash probe STORE` measured it, else this machine's default probe; None without one."""
    from edgewise.flash.engine import default_probe_path
    from edgewise.flash.io import CostModel, ProbeResult
    from edgewise.flash.store import PROBE_FILE

    for probe in ([store / PROBE_FILE] if store else []) + [default_probe_path()]:
        if probe.is_file():
            return float(CostModel.from_probe(ProbeResult.load(probe)).gbps[-1])
    return None


def cmd_chat(args) -> int:
    lookup = _lookup(args)
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
        for piece in lm.tokenizer.stream(lm.generate(ids, args.max_tokens, sampler, lookup=lookup)):
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
    if args.adapter and args.flash:
        raise EdgewiseError("--adapter applies to a model run from RAM: drop --flash")
    lm = _open_flash(args) if args.flash else _load(args, compile=False)
    if args.ctx > lm.cfg.context_length:
        raise EdgewiseError(f"--ctx {args.ctx} is longer than the model's context of {lm.cfg.context_length} tokens")
    ids = lm.tokenizer.encode(text)
    cache = lm.new_cache(args.ctx)
    lm.governor.start()
    result = perplexity(
        lambda window: lm.prefill_chunks(window, cache),
        ids,
        args.ctx,
        args.max_tokens,
        progress=progress_bar("perplexity"),
        scoring=args.scoring,
        bos_id=lm.tokenizer.bos_id if lm.tokenizer.add_bos else None,
    )
    print(
        f"{lm.path.name} [{args.precision}{_flash_label(args, lm)}] on {args.text}: {result.n_windows} windows x {result.ctx} tokens"
        f"{', second halves scored (llama.cpp rule)' if args.scoring == 'llama.cpp' else ''},"
        f" {result.n_predicted} predictions, mean NLL {result.nll_sum / result.n_predicted:.4f}"
    )
    print(f"ppl = {result.ppl:.4f}")
    return 0


def _flash_label(args, lm) -> str:
    if not args.flash:
        return ""
    if _streams(lm):
        return f", streamed under a {lm.plan.budget_bytes / 1e6:.0f} MB plan"
    return f", flash {args.dram_budget or '50%'}"

