"""`vlmforge generate` / `vlmforge chat` sub-commands (registered by vlmforge.cli).

    vlmforge generate artifacts/tiny-qwen2_5_vl/fp32-392 --image cat.png --prompt "Describe it." --stats
    vlmforge chat artifacts/tiny-qwen2_5_vl/fp32-392

Replies stream to stdout; statistics and diagnostics go to stderr. `VlmforgeError`s propagate to
`cli.main`, which prints them without a traceback.
"""

from __future__ import annotations

import sys
from typing import Callable, TextIO

from vlmforge.core.errors import VlmforgeError

CHAT_HELP = "commands: /image PATH (attach to the next message), /reset, /quit; Ctrl-C stops a reply"


def register(subparsers) -> None:
    """Add the runtime sub-commands to the CLI's sub-parsers."""
    g = subparsers.add_parser("generate", help="run an artifact set on a prompt (and images); streams the reply")
    g.add_argument("directory", help="artifact directory (with manifest.json)")
    g.add_argument("--prompt", required=True, help="the user message")
    g.add_argument("--image", action="append", default=[], metavar="PATH", help="image file (repeatable)")
    _generation_options(g)
    g.add_argument("--no-stream", action="store_true", help="print the reply once it is complete")
    g.set_defaults(func=cmd_generate)
    c = subparsers.add_parser("chat", help="interactive multi-turn chat with an artifact set")
    c.add_argument("directory", help="artifact directory (with manifest.json)")
    c.add_argument("--system", help="system message")
    _generation_options(c)
    c.set_defaults(func=cmd_chat)


def _generation_options(p) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--provider", action="append", default=None, metavar="NAME",
                   help="onnxruntime execution provider (repeatable; default CPUExecutionProvider)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = all cores)")
    p.add_argument("--stats", action="store_true", help="print vision ms, time to first token, decode tokens/s to stderr")


def _options(args) -> dict:
    return {
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
        "top_p": args.top_p, "repetition_penalty": args.repetition_penalty, "seed": args.seed, "stop": tuple(args.stop),
    }


def format_stats(stats) -> str:
    return (
        f"vision {stats.vision_s * 1e3:.1f} ms ({stats.images} image{'s' if stats.images != 1 else ''}) | "
        f"prefill {stats.prefill_s * 1e3:.1f} ms ({stats.prompt_tokens} tokens) | "
        f"time to first token {stats.ttft_s * 1e3:.1f} ms | "
        f"decode {stats.decode_tokens_per_s:.1f} tokens/s ({stats.decode_steps} steps, {stats.new_tokens} tokens)"
    )


def cmd_generate(args, out: TextIO | None = None, err: TextIO | None = None) -> int:
    from vlmforge.runtime.pipeline import Pipeline

    out, err = out or sys.stdout, err or sys.stderr
    pipe = Pipeline.load(args.directory, providers=args.provider, threads=args.threads)
    pieces = pipe.stream(args.prompt, args.image, **_options(args))  # input errors raise here, before any run
    if args.no_stream:
        out.write("".join(pieces))
    else:
        for piece in pieces:
            out.write(piece)
            out.flush()
    out.write("\n")
    out.flush()
    if args.stats and pipe.last_stats is not None:
        print(format_stats(pipe.last_stats), file=err)
    return 0


def cmd_chat(args) -> int:
    from vlmforge.runtime.pipeline import Pipeline

    pipe = Pipeline.load(args.directory, providers=args.provider, threads=args.threads)
    interactive = sys.stdin.isatty()
    read = (lambda: input("> ")) if interactive else _read_stdin_line
    if interactive:
        print(CHAT_HELP, file=sys.stderr)
    return run_chat(pipe.chat(args.system), read, sys.stdout, sys.stderr, _options(args), show_stats=args.stats)


def _read_stdin_line() -> str:
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def run_chat(chat, read: Callable[[], str], out: TextIO, err: TextIO, options: dict, *, show_stats: bool = False) -> int:
    """The chat loop: `read()` returns the next line (EOFError ends the session).

    A `VlmforgeError` in a turn (an unreadable image, a conversation longer than the context) is
    printed and the session continues. Ctrl-C while a reply streams stops that reply; what was
    produced stays in the conversation and the loop reads the next line.
    """
    pending_images: list[str] = []
    while True:
        try:
            line = read()
        except EOFError:
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            chat.reset()
            pending_images.clear()
            print("(conversation cleared)", file=err)
            continue
        if text.startswith("/image"):
            path = text[len("/image"):].strip()
            if not path:
                print("usage: /image PATH", file=err)
                continue
            try:
                chat.pipeline.load_images([path], "/image")
            except VlmforgeError as exc:
                print(exc.render(), file=err)
                continue
            pending_images.append(path)
            print(f"(image attached to the next message: {path})", file=err)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]!r}; {CHAT_HELP}", file=err)
            continue
        _chat_turn(chat, text, pending_images, out, err, options, show_stats)


def _chat_turn(chat, text: str, pending_images: list[str], out: TextIO, err: TextIO, options: dict, show_stats: bool) -> None:
    try:
        pieces = chat.stream(text, list(pending_images), **options)
    except VlmforgeError as exc:
        print(exc.render(), file=err)
        return
    pending_images.clear()
    try:
        for piece in pieces:
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        pieces.close()
        out.write(" [stopped]")
    out.write("\n")
    out.flush()
    stats = chat.pipeline.last_stats
    if show_stats and stats is not None:
        print(format_stats(stats), file=err)
