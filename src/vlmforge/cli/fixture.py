"""`vlmforge fixture NAME OUT`: a family's tiny checkpoint, or a random-weight one at a public config."""

from __future__ import annotations

from pathlib import Path

from vlmforge.core.errors import RecipeError


def cmd_fixture(args) -> int:
    """A tiny fixture of a family (`qwen2_5_vl`), or a random-weight checkpoint at a public config
    (`qwen2_5_vl_3b`, streamed in bf16 shards; --layers / --vision-layers reduce its depth)."""
    from vlmforge.fixtures.checkpoint import check_new_folder
    from vlmforge.fixtures.public import public_configs, write_public_fixture
    from vlmforge.registry import families, get_family

    where = "vlmforge fixture NAME OUT"
    if args.family in public_configs():
        out = write_public_fixture(args.family, check_new_folder(Path(args.out), where), layers=args.layers,
                                   vision_layers=args.vision_layers, seed=args.seed,
                                   max_shard_bytes=args.shard_bytes, rope_layout=args.rope_layout)
        print(out)
        return 0
    if args.family not in families():
        raise RecipeError(f"unknown fixture {args.family!r}", where=where,
                          fix=f"use a tiny fixture family {sorted(families())} or a public config {sorted(public_configs())}")
    if args.layers is not None or args.vision_layers is not None:
        raise RecipeError(f"--layers / --vision-layers apply to the public configs, not the tiny {args.family} fixture",
                          where=where, fix=f"drop them, or use one of {sorted(public_configs())}")
    family = get_family(args.family, where=where)
    out = family.write_fixture(check_new_folder(Path(args.out), where))
    print(out)
    return 0


def add_parsers(sub) -> None:
    f = sub.add_parser("fixture", help="write a family's tiny checkpoint, or a random-weight one at a public config "
                                       "(a recipes/model name), as a Hugging Face folder")
    f.add_argument("family", metavar="NAME", help="a family key (tiny fixture) or a public config (recipes/model/)")
    f.add_argument("out")
    f.add_argument("--layers", type=int, help="decoder layers (public configs; default: all)")
    f.add_argument("--vision-layers", type=int, help="ViT blocks (public configs; default: all)")
    f.add_argument("--seed", type=int, default=0, help="weights are a pure function of the seed (default 0)")
    f.add_argument("--shard-bytes", type=int, default=2 * 10**9, help="safetensors shard limit (default 2e9)")
    f.add_argument("--rope-layout", choices=("hub", "transformers5"), default="hub",
                   help="config.json rotary keys: rope_scaling + rope_theta as the hub files (default), "
                        "or transformers 5's rope_parameters")
    f.set_defaults(func=cmd_fixture)
