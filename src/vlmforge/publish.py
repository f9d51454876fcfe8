"""Publish a verified artifact set as a release: a folder + a byte-reproducible tarball (+ optional hub push).

    vlmforge publish artifacts/tiny-qwen2_5_vl/fp32-392 --to releases/tiny-qwen2_5_vl-fp32-392
    vlmforge verify releases/tiny-qwen2_5_vl-fp32-392.tar.gz

A release folder holds the artifact files, `manifest.json`, a model card `README.md` generated from the
manifest, and `SHA256SUMS` (checkable with `sha256sum -c SHA256SUMS` from inside the folder, covering every
file but itself). It is assembled in a hidden staging folder and renamed into place, so an interrupted
publish never leaves anything at `to` that looks complete. The tarball `<to>.tar.gz` is written with sorted
entries, fixed mtime/uid/gid/owner names and a zero gzip timestamp: publishing the same artifact set twice
gives identical bytes, so the tarball's sha256 is a stable release id.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from vlmforge.cache import owner_tag, remove_stale
from vlmforge.core.errors import ArtifactError, from_os_error
from vlmforge.core.hashing import sha256_file
from vlmforge.core.paths import confine, is_safe_relative, open_regular, scan_tree
from vlmforge.artifact.manifest import MANIFEST, MAX_MANIFEST_BYTES, RELEASE_FILES, VerifyReport, read_manifest, verify_dir

log = logging.getLogger(__name__)

SUMS, CARD = RELEASE_FILES
RESERVED = RELEASE_FILES
# Working files beside a release: `.<to>.publish-<host>-<pid>/` and `.<to>.tar.gz.<host>-<pid>.tmp`; those of
# dead publishes are removed by the next one (cache.remove_stale judges the owner).
WORK_FILES = (re.compile(r"^\..+\.publish-(?P<tag>[^/]+)$"), re.compile(r"^\..+\.tar\.gz\.(?P<tag>.+-\d+)\.tmp$"))
EXTRACT_SLACK = 16 << 20  # a release's card, SHA256SUMS and manifest beside the files its manifest lists
TAR_MTIME = 0  # every tar entry's mtime; with gzip mtime 0 the tarball depends on file contents only
GZIP_LEVEL = 6
_CHUNK = 1 << 20


# -- publish ------------------------------------------------------------------------------------------------------------
def publish(directory: Path, to: Path, *, tarball: bool = True, hub_repo: str | None = None,
            hub_revision: str | None = None) -> Path:
    """Verify `directory`, write the release folder `to` (and `<to>.tar.gz`), optionally push it to the hub.

    Returns the release folder. Publishing again to the same `to` is a no-op for an identical release
    (the tarball is rewritten, to the same bytes); anything else already at `to` is an error.
    """
    directory, to = Path(directory), Path(to)
    _check_source(directory)
    _check_target(directory, to)
    if hub_repo:
        _check_hub_reachable(hub_repo)
    manifest = read_manifest(directory)
    staging = to.parent / f".{to.name}.publish-{owner_tag()}"
    try:
        to.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_work(to.parent)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        _stage_release(directory, manifest, staging, to.name)
        if _same_release(staging, to):
            log.info("%s already holds this release", to)
            shutil.rmtree(staging)
        else:
            _check_target(directory, to)  # nothing appeared at `to` while we were staging
            os.rename(staging, to)
    except OSError as exc:
        raise from_os_error(exc, "writing the release folder", where=str(to.parent),
                            needed=sum(f["bytes"] for f in manifest["files"].values())) from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("published %s", to)
    if tarball:
        write_tarball(to, tarball_path(to))
    if hub_repo:
        push_to_hub(to, hub_repo, hub_revision)
    return to


def _remove_dead_work(folder: Path) -> None:
    for pattern in WORK_FILES:
        remove_stale(folder, pattern)


def tarball_path(release: Path) -> Path:
    release = Path(release)
    return release.with_name(release.name + ".tar.gz")


def _check_source(directory: Path) -> None:
    report = verify_dir(directory)  # raises ArtifactError when there is no valid manifest
    if not report.ok:
        raise ArtifactError(
            f"refusing to publish an artifact set that does not verify: {'; '.join(report.lines())}",
            where=str(directory),
            fix="rebuild it with `vlmforge export ...` (a set whose validation failed is never published)",
        )
    clash = [name for name in RESERVED if (directory / name).exists()]
    if clash:
        raise ArtifactError(f"the artifact set contains {clash}, names a release writes itself", where=str(directory),
                            fix="rebuild the artifact set; vlmforge builds never write these files")


def _check_target(directory: Path, to: Path) -> None:
    src, dst = directory.resolve(), to.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise ArtifactError("the release folder must lie outside the artifact set (and not contain it)",
                            where=str(to), fix="pass --to a folder beside the artifact set, e.g. releases/<name>")
    if to.is_dir() and any(to.iterdir()) and not (to / SUMS).is_file():
        raise ArtifactError(f"{to} exists, is not empty and is not a vlmforge release", where=str(to),
                            fix="choose another --to or remove that folder")
    if to.exists() and not to.is_dir():
        raise ArtifactError(f"{to} exists and is not a folder", where=str(to), fix="choose another --to")
    tar = tarball_path(to)
    if tar.exists() and not to.exists():
        raise ArtifactError(f"{tar.name} exists but its release folder {to.name} does not", where=str(tar),
                            fix="remove the stale tarball or choose another --to")


def _same_release(staging: Path, to: Path) -> bool:
    """`to` already holds exactly the release in `staging` (same SHA256SUMS and it verifies)."""
    if not (to / SUMS).is_file():
        if to.is_dir() and not any(to.iterdir()):
            to.rmdir()  # an empty folder is as good as none
        return False
    if (to / SUMS).read_bytes() != (staging / SUMS).read_bytes():
        raise ArtifactError(f"{to} already holds a different release", where=str(to),
                            fix="choose another --to, or remove the old release (and its .tar.gz) first")
    report = verify_release(to)
    if not report.ok:
        raise ArtifactError(f"{to} holds this release but it is damaged: {'; '.join(report.lines())}",
                            where=str(to), fix="remove it and publish again")
    return True


def _stage_release(directory: Path, manifest: dict, staging: Path, name: str) -> None:
    """Copy every listed file (re-hashing while copying: a file changed after verification is caught),
    then write the model card and SHA256SUMS."""
    where = str(directory / MANIFEST)
    for rel, want in sorted(manifest["files"].items()):
        got = _copy_hashed(confine(directory, rel, where=where), confine(staging, rel, where=where))
        if got != want["sha256"]:
            raise ArtifactError(f"{rel} changed while it was being published", where=str(directory / rel),
                                fix="do not modify an artifact set while publishing it; publish again")
    shutil.copyfile(directory / MANIFEST, staging / MANIFEST)
    has_genai = "genai_config.json" in manifest["files"]
    _write_text(staging / CARD, model_card(manifest, name, has_genai=has_genai))
    _write_text(staging / SUMS, sha256sums(staging))


def _copy_hashed(src: Path, dst: Path) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with open_regular(src) as fin, os.fdopen(os.open(dst, flags, 0o644), "wb") as fout:
        while block := fin.read(_CHUNK):
            h.update(block)
            fout.write(block)
        fout.flush()
        os.fsync(fout.fileno())
    os.chmod(dst, 0o644)
    return h.hexdigest()


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o644)


def _release_files(folder: Path) -> list[str]:
    """Relative posix paths of every regular file under `folder` but SHA256SUMS, sorted."""
    files, odd = scan_tree(folder)
    if odd:
        raise ArtifactError(f"{odd[0]} is a link or special file", where=str(Path(folder) / odd[0]),
                            fix="a release holds regular files only; rebuild or re-publish it")
    for rel in files:
        if any(c in rel for c in "\n\\"):
            raise ArtifactError(f"file name {rel!r} cannot be listed in {SUMS}", where=str(Path(folder) / rel),
                                fix="rename the file; names with newlines or backslashes are not supported")
    return [rel for rel in files if rel != SUMS]


def sha256sums(folder: Path) -> str:
    """`sha256sum`-format text (`<hex>  <path>`, sorted) covering every file in `folder` but SHA256SUMS."""
    return "".join(f"{sha256_file(folder / rel)}  {rel}\n" for rel in _release_files(folder))


# -- model card ---------------------------------------------------------------------------------------------------------
def model_card(manifest: dict, name: str, *, has_genai: bool) -> str:
    """README.md for a release, from the manifest only (no clock, no paths): same manifest, same bytes."""
    parts = [_card_front_matter(manifest), _card_summary(manifest, name), _card_components(manifest)]
    if manifest.get("variant"):
        parts.append(_card_deviation(manifest["variant"]))
    parts += [_card_validation(manifest["validation"]), _card_usage(name, has_genai), _card_toolchain(manifest),
              _card_files()]
    return "\n".join(p.rstrip("\n") + "\n" for p in parts)


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "**NO**"
    if isinstance(value, float):
        value = f"{value:.4g}"
    return str(value if value is not None else "-").replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _hub_id(checkpoint: str) -> str | None:
    parts = checkpoint.split("/")
    ok = len(parts) == 2 and all(parts) and ":" not in checkpoint and not checkpoint.startswith((".", "~"))
    return checkpoint if ok else None


def _card_front_matter(manifest: dict) -> str:
    lines = ["---", "library_name: onnx", "pipeline_tag: image-text-to-text",
             f"tags: [onnx, vlmforge, {manifest['family']}]"]
    base = _hub_id(manifest["source"]["checkpoint"])
    if base:
        lines.append(f"base_model: {base}")
    return "\n".join(lines + ["---"]) + "\n"


def _card_summary(manifest: dict, name: str) -> str:
    recipe, source, vision = manifest["recipe"], manifest["source"], manifest["components"]["vision"]
    model_name = recipe.get("model", {}).get("name", manifest["family"])
    verdict = "passed" if manifest["validation"]["passed"] else "FAILED"
    rows = [["base model", f"`{source['checkpoint']}`"], ["revision", source.get("revision") or "(not pinned)"],
            ["family", f"`{manifest['family']}`"], ["precision recipe", recipe.get("precision", {}).get("name", "-")],
            ["vision input", f"{vision['image_size']} x {vision['image_size']} px"],
            ["tokens per image", vision["tokens_per_image"]],
            ["validation", f"{verdict} ({len(manifest['validation']['checks'])} checks against PyTorch)"],
            ["built by", f"vlmforge {manifest['vlmforge_version']}"]]
    weights = "\n".join(f"- `{f}` sha256 `{h}`" for f, h in sorted(source.get("weights", {}).items()))
    return (f"# {name}\n\nONNX export of `{model_name}` ({manifest['family']}), built and validated by vlmforge.\n\n"
            + _table(["", ""], rows) + ("\nSource weights:\n\n" + weights + "\n" if weights else ""))


def _card_components(manifest: dict) -> str:
    rows = [[stage, f"`{c['file']}`", c["precision"], len(c.get("inputs", [])), len(c.get("outputs", []))]
            for stage, c in sorted(manifest["components"].items())]
    return ("## Components\n\n" + _table(["component", "file", "precision", "inputs", "outputs"], rows)
            + "\nInput/output names, dtypes and shapes are in `manifest.json` (`components`).\n")


def _card_deviation(variant: dict) -> str:
    statement = variant.get("statement") or json.dumps(variant, sort_keys=True)
    return ("## Deviation from the source model\n\n"
            f"> **This artifact set is not equivalent to its source model** (DeepStack: {variant.get('deepstack', '-')}).\n>\n"
            f"> {statement}\n")


def _card_validation(validation: dict) -> str:
    rows = [[c["stage"], c["name"], c["metric"], c["value"], c["tolerance"], c["passed"]] for c in validation["checks"]]
    return ("## Validation\n\nEvery check compares the ONNX graphs with the PyTorch model they were exported from.\n\n"
            + _table(["stage", "check", "metric", "value", "tolerance", "pass"], rows))


def _card_usage(name: str, has_genai: bool) -> str:
    text = ("## How to run it\n\n```bash\n"
            f"vlmforge verify {name}\n"
            f"vlmforge generate {name} --image x.png --prompt \"Describe this image.\"\n```\n")
    if has_genai:
        text += ("\nWith onnxruntime-genai (`pip install onnxruntime-genai`):\n\n```python\n"
                 "import json\nimport onnxruntime_genai as og\n\n"
                 f"model = og.Model(\"{name}\")\n"
                 "processor = model.create_multimodal_processor()  # og.MultiModalProcessor\n"
                 "tokenizer = og.Tokenizer(model)\n"
                 "messages = [{\"role\": \"user\", \"content\": [{\"type\": \"image\"}, {\"type\": \"text\", \"text\": \"Describe this image.\"}]}]\n"
                 "prompt = tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)\n"
                 "inputs = processor(prompt, images=og.Images.open(\"x.png\"))\n"
                 "params = og.GeneratorParams(model)\nparams.set_search_options(max_length=1024)\n"
                 "generator = og.Generator(model, params)\ngenerator.set_inputs(inputs)\n"
                 "stream = processor.create_stream()\n"
                 "while not generator.is_done():\n"
                 "    generator.generate_next_token()\n"
                 "    print(stream.decode(generator.get_next_tokens()[0]), end=\"\", flush=True)\n```\n")
    return text


def _card_toolchain(manifest: dict) -> str:
    tc = manifest["toolchain"]
    rows = [["python", tc.get("python", "-")]] + [[k, v] for k, v in sorted(tc.get("packages", {}).items())]
    return "## Toolchain\n\n" + _table(["package", "version"], rows)


def _card_files() -> str:
    return ("## Files and integrity\n\n"
            f"`{SUMS}` lists the sha256 of every file but itself: run `sha256sum -c {SUMS}` inside this folder, "
            "or `vlmforge verify` on the folder or its `.tar.gz`, which also checks `manifest.json`.\n")


# -- tarball ------------------------------------------------------------------------------------------------------------
def write_tarball(release: Path, out: Path) -> Path:
    """Deterministic `.tar.gz` of the release folder, entries under `<release name>/`; written atomically."""
    release, out = Path(release), Path(out)
    _remove_dead_work(out.parent)
    tmp = str(out.parent / f".{out.name}.{owner_tag()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=GZIP_LEVEL) as gz:
                with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    tar.addfile(_tar_info(release.name + "/", tarfile.DIRTYPE, 0))
                    for rel in _release_files(release) + [SUMS]:
                        path = release / rel
                        with open(path, "rb") as f:
                            tar.addfile(_tar_info(f"{release.name}/{rel}", tarfile.REGTYPE, path.stat().st_size), f)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except OSError as exc:
        raise from_os_error(exc, "writing the release tarball", where=str(out),
                            needed=sum((release / r).stat().st_size for r in _release_files(release))) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("wrote %s", out)
    return out


def _tar_info(name: str, kind: bytes, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = TAR_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def safe_extract(archive: Path, dest: Path) -> Path:
    """Extract a release tarball into `dest`, refusing absolute paths, `..`, links, special files, duplicate
    names and more than one top-level folder. Returns the extracted release folder.

    Nothing is written before every member header has been read and judged, and what is written is capped:
    each listed file at the size its manifest declares, the whole at the manifest's total plus
    EXTRACT_SLACK, counted while copying. A 4 MB tarball that inflates to gigabytes fails with nothing on
    disk beyond that cap."""
    archive = Path(archive)

    def bad(what: str) -> ArtifactError:
        return ArtifactError(f"unsafe or malformed release tarball: {what}", where=str(archive),
                             fix="only extract tarballs written by `vlmforge publish`; fetch the release again")

    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            members = tar.getmembers()  # headers only: the data is decompressed and skipped, not written
            top, files = _judge_members(members, bad)
            declared = _declared_sizes(tar, files, top, bad)
            cap, total = sum(declared.values()) + EXTRACT_SLACK, 0
            for rel, m in sorted(files.items()):  # judged in full before anything is written
                limit = declared.get(rel, EXTRACT_SLACK)
                total += m.size
                if m.size > limit or total > cap:
                    raise bad(f"member {m.name!r} is {m.size} bytes; its manifest allows {limit} "
                              f"({cap} bytes for the whole release)")
            root = Path(dest) / top
            root.mkdir()
            written = 0
            for rel, m in sorted(files.items()):
                written += _extract_member(tar, m, root / rel, min(m.size, cap - written))
            while tar.fileobj.read(_CHUNK):  # read to the gzip trailer so its CRC is checked too
                pass
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise ArtifactError(f"{archive.name} is not a readable .tar.gz ({type(exc).__name__}: {exc})",
                            where=str(archive), fix="the tarball is damaged or truncated; fetch it again") from exc
    return root


def _judge_members(members, bad) -> tuple[str, dict]:
    """(the one top-level folder, {relative path: member} of its regular files); refuses anything else."""
    tops, files = set(), {}
    for m in members:
        name = m.name.rstrip("/")
        top, _, rel = name.partition("/")
        if not is_safe_relative(name) or not top:
            raise bad(f"member {m.name!r} is not a plain relative path (absolute, '..', or odd characters)")
        if not (m.isfile() or m.isdir()):
            raise bad(f"member {m.name!r} is a link or special file")
        tops.add(top)
        if m.isfile():
            if not rel:
                raise bad(f"member {m.name!r} is a file at the top level")
            if rel in files:
                raise bad(f"member {m.name!r} appears twice")
            files[rel] = m
    if len(tops) != 1:
        raise bad(f"expected one top-level folder, found {sorted(tops)[:5]}")
    return tops.pop(), files


def _declared_sizes(tar, files: dict, top: str, bad) -> dict[str, int]:
    """{path: bytes} the release's own manifest declares for its files (the manifest member is read, capped)."""
    m = files.get(MANIFEST)
    if m is None:
        raise bad(f"no {top}/{MANIFEST}")
    if m.size > MAX_MANIFEST_BYTES:
        raise bad(f"{MANIFEST} is {m.size} bytes")
    try:
        data = json.loads(tar.extractfile(m).read(MAX_MANIFEST_BYTES).decode("utf-8"))
        listed = {rel: int(v["bytes"]) for rel, v in data["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise bad(f"its {MANIFEST} does not list files with sizes ({type(exc).__name__})") from None
    return {**listed, MANIFEST: m.size}


def _extract_member(tar, member, dst: Path, limit: int) -> int:
    """Copy one member's data to a new regular file, never more than `limit` bytes; returns bytes written."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    src = tar.extractfile(member)
    written = 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(dst, flags, 0o644), "wb") as out:
        while written < limit and (block := src.read(min(_CHUNK, limit - written))):
            out.write(block)
            written += len(block)
    return written


# -- verify -------------------------------------------------------------------------------------------------------------
@dataclass
class ReleaseReport:
    path: Path
    manifest: VerifyReport
    sums_changed: list[str] = field(default_factory=list)  # hash in SHA256SUMS differs from the file
    sums_missing: list[str] = field(default_factory=list)  # listed in SHA256SUMS, not present
    sums_unlisted: list[str] = field(default_factory=list)  # present, not listed in SHA256SUMS
    sums_malformed: list[str] = field(default_factory=list)  # lines that are not `<hex>  <path>`

    @property
    def ok(self) -> bool:
        return self.manifest.ok and not (self.sums_changed or self.sums_missing or self.sums_unlisted
                                         or self.sums_malformed)

    def lines(self) -> list[str]:
        out = list(self.manifest.lines())
        out += [f"{SUMS}: sha256 differs: {p}" for p in self.sums_changed]
        out += [f"{SUMS}: missing: {p}" for p in self.sums_missing]
        out += [f"{SUMS}: not listed: {p}" for p in self.sums_unlisted]
        out += [f"{SUMS}: malformed line: {line!r}" for line in self.sums_malformed]
        return out


def is_release(path: Path) -> bool:
    """True for a release tarball or a folder with SHA256SUMS (what `vlmforge verify` should route here)."""
    path = Path(path)
    return (path.is_file() and path.name.endswith((".tar.gz", ".tgz"))) or (path / SUMS).is_file()


def verify_release(path: Path) -> ReleaseReport:
    """Check a release folder or tarball: SHA256SUMS against the files, and the manifest (verify_dir).

    Each file is hashed once: files the manifest lists are hashed by verify_dir and their SHA256SUMS entry
    must equal the manifest's hash; the model card and the manifest itself are hashed here.
    """
    path = Path(path)
    if path.is_file():
        with tempfile.TemporaryDirectory(prefix=".vlmforge-verify-") as tmp:
            report = verify_release(safe_extract(path, Path(tmp)))
            report.path = path
            return report
    if not (path / SUMS).is_file():
        raise ArtifactError(f"no {SUMS} in {path}: not a vlmforge release", where=str(path),
                            fix="publish the artifact set with `vlmforge publish DIR --to RELEASE`; "
                                "for a plain artifact set use `vlmforge verify DIR`")
    with open_regular(path / SUMS, str(path / SUMS)) as f:
        sums, malformed = parse_sha256sums(f.read(MAX_MANIFEST_BYTES).decode("utf-8", errors="replace"))
    manifest = read_manifest(path)
    mreport = verify_dir(path)
    mreport.unlisted = [p for p in mreport.unlisted if p not in RESERVED]
    report = ReleaseReport(path, mreport, sums_malformed=malformed)
    present = _release_files(path)
    report.sums_unlisted = [p for p in present if p not in sums]
    for rel, want in sorted(sums.items()):
        if not (path / rel).is_file() or (path / rel).is_symlink():
            report.sums_missing.append(rel)
        elif rel in manifest["files"] and rel not in mreport.missing:
            if want != manifest["files"][rel]["sha256"] or rel in mreport.changed:
                report.sums_changed.append(rel)
        elif sha256_file(path / rel) != want:
            report.sums_changed.append(rel)
    return report


def parse_sha256sums(text: str) -> tuple[dict[str, str], list[str]]:
    """`<64 hex>  <path>` or `<64 hex> *<path>` lines -> ({path: hex}, malformed lines)."""
    sums, bad = {}, []
    for line in text.splitlines():
        digest, sep, rest = line.partition(" ")
        name = rest[1:] if rest[:1] in (" ", "*") else None
        ok_digest = len(digest) == 64 and all(c in "0123456789abcdef" for c in digest.lower())
        if not (sep and ok_digest and name) or name in sums or not is_safe_relative(name):
            bad.append(line)
            continue
        sums[name] = digest.lower()
    return sums, bad


# -- hub ----------------------------------------------------------------------------------------------------------------
def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_fix(repo: str) -> str:
    return (f"unset HF_HUB_OFFLINE, make sure this machine reaches huggingface.co and HF_TOKEN may write to {repo}; "
            f"or copy the release folder elsewhere and run `hf upload {repo} RELEASE_DIR .` there")


def _check_hub_reachable(repo: str) -> None:
    if _hub_offline():
        raise ArtifactError(f"cannot push to the hub repo {repo!r}: HF_HUB_OFFLINE is set (offline mode)",
                            where=f"hub repo {repo}", fix=_hub_fix(repo))


def push_to_hub(release: Path, repo: str, revision: str | None = None) -> str:
    """Upload a release folder to a Hugging Face model repo (created if missing). Returns the commit URL."""
    release = Path(release)
    _check_hub_reachable(repo)
    report = verify_release(release)
    if not report.ok:
        raise ArtifactError(f"refusing to push a release that does not verify: {'; '.join(report.lines())}",
                            where=str(release), fix="publish it again with `vlmforge publish`")
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo, repo_type="model", exist_ok=True)
        if revision:
            api.create_branch(repo, branch=revision, repo_type="model", exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=str(release), repo_type="model", revision=revision,
                                 commit_message=f"vlmforge release {release.name}")
    except Exception as exc:  # network, auth, offline, quota: huggingface_hub raises many types; one answer here
        raise ArtifactError(f"could not push {release.name} to the hub repo {repo!r} "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})",
                            where=f"hub repo {repo}", fix=_hub_fix(repo)) from exc
    log.info("pushed %s to %s", release, getattr(info, "commit_url", repo))
    return str(getattr(info, "commit_url", repo))


# -- CLI (called from vlmforge.cli) -------------------------------------------------------------------------------------
def add_parsers(sub) -> None:
    """Register `vlmforge publish` on the CLI's sub-parsers."""
    p = sub.add_parser("publish", help="turn a verified artifact set into a release folder + reproducible tarball")
    p.add_argument("directory", help="artifact directory (with manifest.json)")
    p.add_argument("--to", required=True, help="release folder to create; the tarball goes beside it as <to>.tar.gz")
    p.add_argument("--no-tarball", action="store_true", help="write the folder only")
    p.add_argument("--hub-repo", help="also upload the release folder to this Hugging Face model repo")
    p.add_argument("--hub-revision", help="branch of the hub repo (default: main)")
    p.set_defaults(func=cmd_publish)


def cmd_publish(args) -> int:
    release = publish(Path(args.directory), Path(args.to), tarball=not args.no_tarball,
                      hub_repo=args.hub_repo, hub_revision=args.hub_revision)
    print(f"published {release}")
    if not args.no_tarball:
        tar = tarball_path(release)
        print(f"tarball   {tar} (sha256 {sha256_file(tar)})")
    return 0


def cmd_verify_release(path: Path) -> int:
    """What `vlmforge verify PATH` should do when `is_release(PATH)`."""
    report = verify_release(path)
    for line in report.lines():
        print(line)
    print(f"{path}: {'OK' if report.ok else 'FAILED'}")
    return 0 if report.ok else 1

