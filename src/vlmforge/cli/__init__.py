"""The command line: argument parsing only. Each command module parses its arguments, calls the library and
prints; recipes are composed by `vlmforge.recipe`, the only place Hydra/OmegaConf are imported. Nothing in
vlmforge imports this package: it is the entry point (`vlmforge = vlmforge.cli:main`, `python -m vlmforge.cli`)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from vlmforge.cli import artifacts, build, fixture
from vlmforge.core.errors import VlmforgeError, from_os_error
from vlmforge.core.logs import quiet_noisy_loggers

log = logging.getLogger("vlmforge")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlmforge", description="Build, validate, verify and run ONNX artifact sets of vision-language models."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    p.add_argument("--recipes", help="recipes folder (default: ./recipes)")
    sub = p.add_subparsers(dest="command", required=True)
    build.add_parsers(sub)
    artifacts.add_parsers(sub)
    fixture.add_parsers(sub)
    from vlmforge.artifact.js_commands import register as register_js
    from vlmforge.release.commands import add_parsers as add_publish_parsers
    from vlmforge.runtime.commands import register

    add_publish_parsers(sub)
    register(sub)
    register_js(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    quiet_noisy_loggers()
    try:
        return int(args.func(args) or 0)
    except VlmforgeError as err:
        if args.verbose:
            log.exception("details")
        print(err.render(), file=sys.stderr)
        return 2
    except OSError as exc:  # the machine refused (disk full, read-only, permissions): not a bug, no traceback
        if args.verbose:
            log.exception("details")
        print(from_os_error(exc, f"running `vlmforge {args.command}`").render(), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # The build has cleaned up by now. A second Ctrl-C during the interpreter's teardown (a second or more with
        # torch loaded; Python puts SIGINT back to its default before it ends) would kill the process by signal
        # instead of ending it with 130: ignore it for the last steps.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("interrupted", file=sys.stderr)
        return 130
