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

from vlmforge.core.hashing import file_stamp, sha256_file
from vlmforge.core.env import hub_offline
from vlmforge.core.errors import CheckpointError, VlmforgeError
from vlmforge.core.paths import confine
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
    weight_elements: int = 0  # tensor elements in all weight files (from their headers)


def checkpoint_file(path: Path, name: str, where: str) -> Path:
    """The real file behind `<checkpoint>/<name>`, confined: inside the checkpoint folder, or, for a Hugging
    Face cache snapshot (`models--org--name/snapshots/<rev>/`, whose files are links), inside that repo's
    `blobs/`. Anything a link leads elsewhere is refused: its bytes would be copied into an artifact set."""
    path = Path(path)
    real = path.resolve()
    also = (real.parent.parent / "blobs",) if real.parent.name == "snapshots" and \
        real.parent.parent.name.startswith("models--") else ()
    out = confine(path, name, where=where, also=also, error=CheckpointError,
                  fix=f"replace {name} in the checkpoint by the file itself (not a link out of the folder)")
    if out != real / name:
        log.debug("%s/%s is read from %s", path, name, out)
    return out


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
    if hub_offline():
        raise CheckpointError(f"checkpoint {repo_id!r} is a hub id but HF_HUB_OFFLINE is set (offline mode)",
                              where=where, fix=fix)
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


def check_safetensors(path: Path, where: str) -> tuple[dict[str, str], int]:
    """Every weight file must be a complete safetensors file. Returns ({name: sha256}, number of elements)."""
    files = sorted(p for p in path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        raise CheckpointError(
            f"no *.safetensors weights in {path}" + (f" (found pickle weights {pickles})" if pickles else ""),
            where=where,
            fix="vlmforge loads safetensors only; convert the checkpoint (save_pretrained(..., safe_serialization=True))",
        )
    hashes, elements = {}, 0
    for f in files:
        real = checkpoint_file(path, f.name, where)
        elements += _check_one_safetensors(real, f.name)
        hashes[f.name] = _prefetched(real) or sha256_file(real)
    return hashes, elements


# -- the shards' sha256, started before the build imports its model code ---------------------------------------------
# The cache keys and the manifest's source need every shard's sha256 (2.3 GB at a 2-layer 3B, 7.5 GB at a full one:
# 2-7 s); hashlib releases the GIL, so hashing beside the imports of torch/transformers/onnxscript hides it.
_PREFETCH: dict[str, dict] = {}  # real path -> {stamp, done, sha256}


def prefetch_weight_hashes(checkpoint: str) -> None:
    """Start hashing the *.safetensors files of a local checkpoint folder in daemon threads (never waited for at
    exit: a build that fails first is not held up). Only files confined to the folder (checkpoint_file), and
    nothing at all for anything unusual: check_safetensors checks and reports as ever, and takes a result only
    for the same file (path, size, mtime, inode) it was started on."""
    import threading

    try:
        path = Path(os.path.expanduser(checkpoint))
        if checkpoint.startswith(FIXTURE_PREFIX) or path.is_symlink() or not path.is_dir():
            return
        jobs = [(real, {"stamp": file_stamp(real), "done": threading.Event(), "sha256": None})
                for real in (checkpoint_file(path, f.name, str(path)) for f in sorted(path.glob("*.safetensors")))]
    except (OSError, VlmforgeError):
        return

    def work(queue: list) -> None:
        while True:
            try:
                real, job = queue.pop(0)
            except IndexError:  # another worker took the last one
                return
            try:
                job["sha256"] = sha256_file(real)
            except (OSError, VlmforgeError):
                pass
            finally:
                job["done"].set()

    for real, job in jobs:
        _PREFETCH[str(real)] = job
    queue = list(jobs)
    for _ in range(min(len(jobs), os.cpu_count() or 1)):
        threading.Thread(target=work, args=(queue,), name="vlmforge-hash", daemon=True).start()


def _prefetched(real: Path) -> str | None:
    """The prefetched sha256 of `real` if it was started on this very file, else None (hash it again)."""
    job = _PREFETCH.pop(str(real), None)
    try:
        if job is None or job["stamp"] != file_stamp(real):
            return None
    except OSError:
        return None
    job["done"].wait()
    return job["sha256"] if job["stamp"] == file_stamp(real) else None


# safetensors dtypes and their sizes in bits (F4/F6 pack several values per byte).
SAFETENSORS_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
                    "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
                    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own limit


def read_safetensors_header(fh) -> tuple[dict, int]:
    """The JSON header of an open safetensors file and the offset where its data section starts. Unchecked:
    a checkpoint's files pass `_check_one_safetensors` (open_source) before anything reads their tensors."""
    (n,) = struct.unpack("<Q", fh.read(8))
    return json.loads(fh.read(n)), 8 + n


def _check_one_safetensors(f: Path, name: str) -> int:
    """Refuse a damaged or hostile safetensors file from its header alone (nothing is mapped or allocated):
    every tensor's dtype, shape and byte range must agree and tile the data section exactly.
    Returns the number of elements the file holds."""
    size = f.stat().st_size
    fix = f"re-download or re-copy {name}; the file is damaged"

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{name} is not a valid safetensors file ({why})", where=str(f), fix=fix)

    try:
        with open(f, "rb") as fh:
            header_len = struct.unpack("<Q", fh.read(8))[0]
            if header_len <= 0 or header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise bad(f"header length {header_len} is beyond the file or the format's limit")
            header = json.loads(fh.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise bad(str(exc)[:200]) from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    data_len, spans, elements = size - 8 - header_len, [], 0
    for key, v in header.items():
        if key == "__metadata__":
            continue
        if not (isinstance(v, dict) and v.get("dtype") in SAFETENSORS_BITS and isinstance(v.get("shape"), list)
                and all(isinstance(d, int) and d >= 0 for d in v["shape"]) and isinstance(v.get("data_offsets"), list)
                and len(v["data_offsets"]) == 2 and all(isinstance(o, int) for o in v["data_offsets"])):
            raise bad(f"tensor {key[:80]!r} has a malformed entry")
        begin, end = v["data_offsets"]
        n = 1
        for d in v["shape"]:
            n *= d
        if not 0 <= begin <= end <= data_len or (n * SAFETENSORS_BITS[v["dtype"]] + 7) // 8 != end - begin:
            raise bad(f"tensor {key[:80]!r} (shape {v['shape'][:8]}, {v['dtype']}) does not fit its byte range "
                      f"[{begin}, {end}) of a {data_len}-byte data section")
        spans.append((begin, end))
        elements += n
    spans.sort()
    if any(b < a_end for (_, a_end), (b, _) in zip(spans, spans[1:])):
        raise bad("two tensors overlap")
    end = spans[-1][1] if spans else 0
    if 8 + header_len + end != size:
        raise CheckpointError(
            f"{name} is truncated or padded: header describes {8 + header_len + end} bytes, file has {size}",
            where=str(f),
            fix=fix,
        )
    return elements


def open_source(checkpoint: str, family_key: str, revision: str | None, cache_root: Path, where: str) -> Source:
    path = resolve_checkpoint(checkpoint, revision, cache_root, where)
    config = read_config(path, where)
    family = check_family(config, family_key, path, where)
    check_config_keys(config, path)
    weights, elements = check_safetensors(path, where)
    return Source(path=path, checkpoint=checkpoint, revision=revision, family=family, config=config,
                  weight_files=weights, weight_elements=elements)


# Keys every vision-language checkpoint of the supported families has. Without them transformers falls back
# to its built-in defaults (a 7B-sized model) and a tiny checkpoint would be instantiated at full size.
REQUIRED_CONFIG_KEYS = ("text_config", "vision_config", "image_token_id", "vision_start_token_id",
                        "vision_end_token_id")
PARAMETER_SLACK = 1.02  # the model may hold at most this much more than the checkpoint (buffers, rounding)


# The Qwen2.5-VL hub files predate the nested layout: their text model's keys sit at the top level.
FLAT_TEXT_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def check_config_keys(config: dict, path: Path) -> None:
    flat = "text_config" not in config and all(k in config for k in FLAT_TEXT_KEYS)
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in config and not (flat and k == "text_config")]
    if missing:
        raise CheckpointError(
            f"config.json lacks {missing}: transformers would fill them with its defaults (a different, "
            "full-size model)", where=str(path / "config.json"),
            fix="use the config.json that came with the checkpoint (every Qwen-VL release has these keys)")
    for k in ("vision_config",) if flat else ("text_config", "vision_config"):
        if not isinstance(config[k], dict):
            raise CheckpointError(f"config.json: {k} is not an object", where=str(path / "config.json"),
                                  fix="use the config.json that came with the checkpoint")


def check_model_size(source: Source, hf_config) -> int:
    """Count the parameters `hf_config` describes (on the meta device: no memory) and refuse a config that
    describes more than the checkpoint holds, before any model is instantiated. Returns the count."""
    return parameter_counts(source, hf_config)[0]


def parameter_counts(source: Source, hf_config) -> tuple[int, dict[str, int]]:
    """(the parameters `hf_config` describes, {stage: parameters its graph holds}), from one model on the meta
    device; a config that describes more than the checkpoint holds is refused. A tied head counts in both the
    embedding and the decoder (both graphs hold it); the dict is empty when the family names no stage prefixes."""
    import torch
    import transformers

    cls = getattr(transformers, source.family.hf_class)
    try:
        with torch.device("meta"):
            model = cls._from_config(hf_config)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(f"config.json does not describe a valid model ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''})",
                              where=str(source.path / "config.json"),
                              fix="use the config.json that came with the checkpoint") from None
    count = sum(p.numel() for p in model.parameters())
    if count > source.weight_elements * PARAMETER_SLACK:
        raise CheckpointError(
            f"config.json describes a model of {count / 1e6:.1f} M parameters, but the safetensors files hold "
            f"{source.weight_elements / 1e6:.1f} M values: the config does not belong to these weights",
            where=str(source.path / "config.json"),
            fix="use the config.json that came with the checkpoint, or complete the weight files")
    prefixes = source.family.stage_weights or {}
    stages = dict.fromkeys(prefixes, 0)
    for name, p in model.named_parameters(remove_duplicate=False):
        for stage, pre in prefixes.items():
            if name.startswith(tuple(pre)):
                stages[stage] += p.numel()
    return count, stages


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
