"""`vlmforge export-js SET OUT` (registered by vlmforge.cli; argparse and printing only)."""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    """Add `vlmforge export-js` to the CLI's sub-parsers."""
    p = subparsers.add_parser("export-js", help="write a verified artifact set as a folder transformers.js loads "
                                                "(onnx/vision_encoder, embed_tokens, decoder_model_merged, config.json)")
    p.add_argument("directory", help="artifact directory (with manifest.json)")
    p.add_argument("out", help="folder to write (new, empty, or one export-js wrote before)")
    p.set_defaults(func=cmd_export_js)


def cmd_export_js(args) -> int:
    from vlmforge.artifact.transformers_js import export_js

    out = export_js(Path(args.directory), Path(args.out))
    print(f"wrote {out} (load it with transformers.js: node js/greedy.mjs {out} --prompt ...)")
    return 0
