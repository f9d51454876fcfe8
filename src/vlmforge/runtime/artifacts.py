"""What the runtime reads from an artifact set before a session opens: the verified manifest, the files it
lists (confined to the set), the KV layout from the decoder's contract, the listed JSON configs, the
tokenizer, the end-of-sequence ids; and the checks that the opened graphs and the requested execution
providers are the ones the manifest describes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vlmforge.artifact.manifest import MANIFEST, RELEASE_FILES, check_verified
from vlmforge.core.contracts import StageContract
from vlmforge.core.errors import ArtifactError, InputError
from vlmforge.core.paths import confine
from vlmforge.host.tokens import eos_ids
from vlmforge.runtime.engine import Engine, KVLayout

log = logging.getLogger("vlmforge.runtime.pipeline")  # the name its warnings had before the split


def resolve_inside(directory: Path, rel: str) -> Path:
    """`directory/rel`, confined to the artifact set (vlmforge.core.paths.confine)."""
    return confine(directory, rel, where=str(Path(directory) / MANIFEST))


def verify_artifacts(directory: Path) -> dict:
    """The one verification (manifest.verify_dir): every listed file's size and sha256, no links, nothing
    unlisted; then the manifest's own consistency. Returns the manifest."""
    directory = Path(directory)
    manifest = check_verified(directory, "the runtime loads verified sets only", RELEASE_FILES)
    for stage, comp in manifest["components"].items():
        if comp["file"] not in manifest["files"]:
            raise ArtifactError(f"component {stage} file {comp['file']} is not listed in the manifest's files",
                                where=str(directory / MANIFEST), fix="rebuild the artifact set")
    if not manifest["validation"]["passed"]:
        log.warning("%s: the manifest records no passing validation (built with validation off?)", directory)
    return manifest


def layout_from_manifest(manifest: dict, where: str) -> KVLayout:
    """KV layout from the decoder's (and embedding's) I/O contract recorded in the manifest."""
    return KVLayout.from_contract(StageContract.from_json("decoder", manifest["components"]["decoder"]), where,
                                  error=ArtifactError)


def check_providers(providers, where: str) -> list[str] | None:
    """Every requested execution provider must exist in this onnxruntime: no silent fallback to CPU."""
    if providers is None:
        return None
    import onnxruntime as ort

    available = ort.get_available_providers()
    unknown = [p for p in providers if p not in available]
    if unknown or not providers:
        raise InputError(f"execution provider(s) {unknown or providers} are not available in this onnxruntime "
                         f"({ort.__version__}); available: {available}", where=where,
                         fix="pass one of the available providers (e.g. --provider CPUExecutionProvider), or install "
                             "the onnxruntime build that has it (onnxruntime-gpu for CUDAExecutionProvider)")
    return list(providers)


def check_engine(engine: Engine, manifest: dict, files: dict, where: str) -> None:
    """Each opened graph must be the one the manifest describes: its I/O (names, dtypes, dims) equals the
    component's contract and its weights match the precision label. One error naming every difference."""
    from vlmforge.runtime.engine import contract_problems, precision_problems

    problems = []
    for stage in ("vision", "embedding", "decoder"):
        comp = manifest["components"][stage]
        found = contract_problems(getattr(engine, stage), comp) + precision_problems(files[stage], comp["precision"])
        problems += [f"{stage} ({comp['file']}): {p}" for p in found]
    if problems:
        raise ArtifactError("the graphs are not the ones the manifest describes: " + "; ".join(problems)[:1500],
                            where=where, fix="rebuild the artifact set with `vlmforge export`, or fetch the release again")


def listed_json(directory: Path, manifest: dict, name: str) -> dict:
    """A JSON object file the manifest lists ({} when it lists none of that name); ArtifactError otherwise."""
    if name not in manifest["files"]:
        return {}
    path = resolve_inside(directory, name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{name} is not valid JSON ({type(exc).__name__})", where=str(path),
                            fix="rebuild the artifact set") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{name} holds a JSON {type(data).__name__}, not an object", where=str(path),
                            fix="rebuild the artifact set")
    return data


def required_eos_ids(*sources) -> tuple[int, ...]:
    """host.tokens.eos_ids of the sources; an artifact set that names no end-of-sequence token is an error."""
    out = eos_ids(*sources)
    if not out:
        raise ArtifactError("the artifact set names no end-of-sequence token", where="manifest token_ids.eos",
                            fix="rebuild the artifact set from a checkpoint whose config sets eos_token_id")
    return out


def load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise ArtifactError(f"cannot load the tokenizer: {type(exc).__name__}: {str(exc)[:300]}", where=str(directory),
                            fix="the artifact set needs tokenizer.json + tokenizer_config.json; rebuild it") from exc
    if not getattr(tok, "chat_template", None):
        raise ArtifactError("the tokenizer has no chat template", where=str(directory),
                            fix="rebuild from a checkpoint with chat_template.jinja or tokenizer_config.json chat_template")
    return tok
