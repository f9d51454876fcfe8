"""Source checkpoints: resolve (local folder, embedded fixture, hub id), check, hash, load.

Weights load from safetensors only; `trust_remote_code` stays off unless the recipe opts in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from vlmforge.core.hashing import sha256_file
from vlmforge.errors import CheckpointError
from vlmforge.registry import FamilySpec, family_for_architecture, get_family

log = logging.getLogger(__name__)

FIXTURE_PREFIX = "fixture:"
TRAINED_SUFFIX = "-trained"  # fixture:<family>-trained: the tiny model trained on the synthetic VQA task
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


@dataclass(frozen=True)
class Source:
    path: Path
    checkpoint: str  # as the recipe gave it
    revision: str | None
    family: FamilySpec
    config: dict
    weight_files: dict[str, str] = field(default_factory=dict)  # relative name -> sha256


def fixture_fingerprint(family_key: str, trained: bool = False) -> str:
    """Hash of the code (and shipped weights) that write a family's embedded fixture: a changed fixture
    never reuses a stale cache."""
    import inspect

    import vlmforge.fixtures as fx

    root = Path(fx.__file__).parent
    files = [root / "tokens.py", root / "tokenizer.py", root / "checkpoint.py",
             Path(inspect.getsourcefile(get_family(family_key).write_fixture))]
    if trained:
        files += [root / "trained.py", root / "trained" / "SHA256SUMS"]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def fixture_dir(cache_root: Path, family_key: str, trained: bool = False) -> Path:
    family = get_family(family_key)
    name = family.fixture_name.replace("tiny-", "trained-") if trained else family.fixture_name
    return Path(cache_root) / "fixtures" / f"{name}-{fixture_fingerprint(family_key, trained)}"


def resolve_checkpoint(checkpoint: str, revision: str | None, cache_root: Path, where: str) -> Path:
    """Turn the recipe's `model.checkpoint` into a local folder."""
    if checkpoint.startswith(FIXTURE_PREFIX):
        key = checkpoint[len(FIXTURE_PREFIX):]
        trained = key.endswith(TRAINED_SUFFIX)
        family_key = key[: -len(TRAINED_SUFFIX)] if trained else key
        family = get_family(family_key, where=where)
        out = fixture_dir(cache_root, family_key, trained)
        if not (out / "config.json").exists():
            log.info("writing embedded fixture %s to %s", out.name, out)
            if trained:
                from vlmforge.fixtures.trained import write_trained_fixture

                write_trained_fixture(family.key, out)
            else:
                family.write_fixture(out)
        return out
    path = Path(os.path.expanduser(checkpoint))
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(
                f"checkpoint {checkpoint!r} is a file, not a Hugging Face model folder",
                where=where,
                fix="point model.checkpoint at the folder holding config.json and *.safetensors",
            )
        return path
    if _looks_like_hub_id(checkpoint):
        return _download(checkpoint, revision, where)
    raise CheckpointError(
        f"checkpoint folder {checkpoint!r} does not exist",
        where=where,
        fix="set model.checkpoint=/path/to/local/model (a folder with config.json and *.safetensors) "
        "or a hub id such as Qwen/Qwen2.5-VL-3B-Instruct",
    )


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))


def _download(repo_id: str, revision: str | None, where: str) -> Path:
    fix = (
        f"on a machine with hub access run `hf download {repo_id} --local-dir /models/{repo_id.split('/')[-1]}`, "
        f"copy the folder here and set model.checkpoint=/models/{repo_id.split('/')[-1]}"
    )
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise CheckpointError(f"checkpoint {repo_id!r} is a hub id but HF_HUB_OFFLINE=1", where=where, fix=fix)
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.safetensors", "*.json", "*.jinja", "*.txt", "*.model"]
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        raise CheckpointError(
            f"could not download {repo_id!r} from the hub ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
            where=where,
            fix=fix,
        ) from exc


def read_config(path: Path, where: str) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(
            f"no config.json in {path}", where=where, fix="point model.checkpoint at a Hugging Face model folder"
        )
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"config.json is not valid JSON: {exc}", where=str(cfg_path), fix="restore the file") from exc


def check_family(config: dict, family_key: str, path: Path, where: str) -> FamilySpec:
    """The recipe's family must match the checkpoint's architecture."""
    family = get_family(family_key, where=where)
    archs = config.get("architectures") or []
    model_type = config.get("model_type", "?")
    if model_type == family.key or any(a in family.architectures for a in archs):
        return family
    other = next((f for a in archs if (f := family_for_architecture(a))), None)
    if other is not None:
        fix = f"use a {other.display_name} recipe (model family {other.key}) for this checkpoint, or point the recipe at a {family.display_name} checkpoint"
    else:
        from vlmforge.registry import families

        supported = sorted(a for f in families().values() for a in f.architectures)
        fix = f"vlmforge supports {supported}; point model.checkpoint at one of those"
    raise CheckpointError(
        f"checkpoint architecture {archs or model_type} (model_type {model_type!r}) is not {family.display_name}",
        where=f"{path / 'config.json'} ({where})",
        fix=fix,
    )


def check_safetensors(path: Path, where: str) -> dict[str, str]:
    """Every weight file must be a complete safetensors file. Returns {name: sha256}."""
    files = sorted(p for p in path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        raise CheckpointError(
            f"no *.safetensors weights in {path}" + (f" (found pickle weights {pickles})" if pickles else ""),
            where=where,
            fix="vlmforge loads safetensors only; convert the checkpoint (save_pretrained(..., safe_serialization=True))",
        )
    hashes = {}
    for f in files:
        _check_one_safetensors(f)
        hashes[f.name] = sha256_file(f)
    return hashes


def _check_one_safetensors(f: Path) -> None:
    size = f.stat().st_size
    fix = f"re-download or re-copy {f.name}; the file is damaged"
    try:
        with open(f, "rb") as fh:
            header_len = struct.unpack("<Q", fh.read(8))[0]
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header length beyond end of file")
            header = json.loads(fh.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{f.name} is not a valid safetensors file ({exc})", where=str(f), fix=fix) from exc
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise CheckpointError(
            f"{f.name} is truncated or padded: header describes {8 + header_len + end} bytes, file has {size}",
            where=str(f),
            fix=fix,
        )


def open_source(checkpoint: str, family_key: str, revision: str | None, cache_root: Path, where: str) -> Source:
    path = resolve_checkpoint(checkpoint, revision, cache_root, where)
    config = read_config(path, where)
    family = check_family(config, family_key, path, where)
    weights = check_safetensors(path, where)
    return Source(path=path, checkpoint=checkpoint, revision=revision, family=family, config=config, weight_files=weights)


def load_model(source: Source, trust_remote_code: bool = False, dtype: str = "float32"):
    """The PyTorch model, in eval mode, from safetensors only."""
    import torch
    import transformers

    cls = getattr(transformers, source.family.hf_class)
    try:
        model = cls.from_pretrained(
            str(source.path),
            dtype=getattr(torch, dtype),
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            attn_implementation="eager",
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(
            f"transformers could not load the checkpoint: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
            where=str(source.path),
            fix="check the folder is a complete Hugging Face checkpoint of this family",
        ) from exc
    source.family.check_checkpoint_config(model.config, str(source.path / "config.json"))
    return model.eval()
