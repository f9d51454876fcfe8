"""vlmforge.release: release folder + SHA256SUMS + model card + deterministic tarball; verify_release; hub errors.

All tests reuse the session build `qwen25_392` and one module-scoped release; nothing is mocked.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import vlmforge
from vlmforge.core.errors import ArtifactError
from vlmforge.artifact.manifest import read_manifest, write_manifest
from vlmforge.release.card import model_card
from vlmforge.release.files import SUMS, tarball_path
from vlmforge.release.hub import push_to_hub
from vlmforge.release.publish import publish
from vlmforge.release.tarball import safe_extract
from vlmforge.release.verify import parse_sha256sums, verify_release

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def release(qwen25_392, tmp_path_factory) -> Path:
    return publish(qwen25_392.directory, tmp_path_factory.mktemp("rel") / "tiny-qwen2_5_vl-fp32-392")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


# -- the release folder ------------------------------------------------------------------------------------------------
def test_publish_sha256sums_accepted_by_sha256sum(release):
    sha256sum = shutil.which("sha256sum")
    if sha256sum is None:
        pytest.skip("no sha256sum binary on this machine")
    proc = subprocess.run([sha256sum, "-c", "--strict", SUMS], cwd=release, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listed, bad = parse_sha256sums((release / SUMS).read_text())
    assert not bad
    on_disk = {p.relative_to(release).as_posix() for p in release.rglob("*") if p.is_file()}
    assert set(listed) == on_disk - {SUMS}
    assert {"manifest.json", "README.md", "vision.onnx", "decoder.onnx"} <= set(listed)


def test_publish_release_verifies_as_folder_and_tarball(release):
    assert verify_release(release).ok
    tar = tarball_path(release)
    report = verify_release(tar)
    assert report.ok, report.lines()
    assert report.path == tar


def test_publish_tarball_is_byte_identical_when_published_twice(qwen25_392, release, tmp_path):
    again = publish(qwen25_392.directory, tmp_path / "elsewhere" / release.name)
    assert tarball_path(again).read_bytes() == tarball_path(release).read_bytes()
    with tarfile.open(tarball_path(release), "r:gz") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names[0] == release.name + "/" or names[0] == release.name
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}
    assert all(n.startswith(release.name + "/") for n in names[1:])


def test_publish_again_to_same_release_is_a_noop(qwen25_392, release):
    before = (release / SUMS).read_bytes(), tarball_path(release).read_bytes()
    assert publish(qwen25_392.directory, release) == release
    assert ((release / SUMS).read_bytes(), tarball_path(release).read_bytes()) == before


def test_publish_refuses_when_to_holds_something_else(qwen25_392, tmp_path):
    to = tmp_path / "taken"
    to.mkdir()
    (to / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not a vlmforge release"):
        publish(qwen25_392.directory, to)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_publish_refuses_when_to_holds_a_different_release(qwen25_392, release, tmp_path):
    other = _copy(release, tmp_path / release.name)
    (other / SUMS).write_text((other / SUMS).read_text().replace("README.md", "README.md "))
    with pytest.raises(ArtifactError, match="different release"):
        publish(qwen25_392.directory, other)


def test_publish_refuses_to_publish_into_the_artifact_set(qwen25_392):
    with pytest.raises(ArtifactError, match="outside the artifact set"):
        publish(qwen25_392.directory, qwen25_392.directory / "release")


# -- refusing bad inputs -----------------------------------------------------------------------------------------------
def test_publish_refuses_tampered_artifact_dir(qwen25_392, tmp_path):
    src = _copy(qwen25_392.directory, tmp_path / "set")
    _flip_byte(src / "vision.onnx")
    with pytest.raises(ArtifactError, match="does not verify") as err:
        publish(src, tmp_path / "rel")
    assert "vision.onnx" in err.value.what
    assert not (tmp_path / "rel").exists() and not tarball_path(tmp_path / "rel").exists()


def test_publish_refuses_when_validation_failed(qwen25_392, tmp_path):
    src = _copy(qwen25_392.directory, tmp_path / "set")
    manifest = read_manifest(src)
    manifest["validation"]["passed"] = False
    write_manifest(src, manifest)
    with pytest.raises(ArtifactError, match="failed validation"):
        publish(src, tmp_path / "rel")


def test_publish_refuses_dir_without_manifest(qwen25_392, tmp_path):
    src = _copy(qwen25_392.directory, tmp_path / "set")
    (src / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        publish(src, tmp_path / "rel")


# -- interrupted publish -----------------------------------------------------------------------------------------------
_CHILD = """
import resource, signal, sys
from pathlib import Path
from vlmforge.release.publish import publish
# Python starts with SIGXFSZ ignored: a write past the limit fails with EFBIG -> exception -> clean-up runs.
# With the default action the kernel kills the process mid-write, as a crash or power cut would: no clean-up.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN if sys.argv[3] == "error" else signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))  # dies/fails copying decoder.onnx
publish(Path(sys.argv[1]), Path(sys.argv[2]))
"""


@pytest.mark.parametrize("how", ["error", "killed"])
def test_interrupted_publish_leaves_nothing_that_looks_complete(qwen25_392, tmp_path, how):
    pytest.importorskip("resource")
    to = tmp_path / "out" / "rel"
    # the child imports the vlmforge this test imported (a checkout run with PYTHONPATH=src, not the venv's)
    env = {"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(vlmforge.__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(qwen25_392.directory), str(to), how],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert not to.exists() and not tarball_path(to).exists()
    left = list((tmp_path / "out").iterdir())
    if how == "error":
        assert "while writing the release folder" in proc.stderr
        assert left == []  # the staging folder was removed
    else:
        assert proc.returncode < 0  # killed by SIGXFSZ mid-copy: no clean-up ran
        assert all(p.name.startswith(".rel.publish-") for p in left)
        assert not any((p / SUMS).exists() for p in left)
    # and a later publish still works, and removes what the dead one left
    assert verify_release(publish(qwen25_392.directory, to)).ok
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["rel", "rel.tar.gz"]


# -- verify_release catches damage -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vision.onnx", "README.md", "manifest.json"])
def test_verify_release_catches_changed_byte_in_folder(release, tmp_path, name):
    copy = _copy(release, tmp_path / release.name)
    if name == "manifest.json":  # keep it valid JSON: a changed value, not a broken file
        data = json.loads((copy / name).read_text())
        data["vlmforge_version"] += ".post1"
        (copy / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    else:
        _flip_byte(copy / name)
    report = verify_release(copy)
    assert not report.ok
    assert any(name in line for line in report.lines()), report.lines()


def test_verify_release_catches_changed_byte_in_tarball(release, tmp_path):
    raw = tmp_path / "raw.tar.gz"
    shutil.copyfile(tarball_path(release), raw)
    _flip_byte(raw)
    with pytest.raises(ArtifactError, match="not a readable"):
        verify_release(raw)


def test_verify_release_catches_changed_member_in_valid_tarball(release, tmp_path):
    """A re-packed archive (valid gzip, valid tar) whose vision.onnx differs by one byte."""
    repacked = tmp_path / "repacked.tar.gz"
    with tarfile.open(tarball_path(release), "r:gz") as src, tarfile.open(repacked, "w:gz") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read() if m.isfile() else None
            if m.name.endswith("/vision.onnx"):
                data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
            dst.addfile(m, io.BytesIO(data) if data is not None else None)
    report = verify_release(repacked)
    assert not report.ok
    assert "vision.onnx" in report.manifest.changed and "vision.onnx" in report.sums_changed


def test_verify_release_catches_file_added_to_release(release, tmp_path):
    copy = _copy(release, tmp_path / release.name)
    (copy / "extra.bin").write_bytes(b"x")
    report = verify_release(copy)
    assert not report.ok and "extra.bin" in report.sums_unlisted


def _tar_with(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        top = tarfile.TarInfo("rel")
        top.type = tarfile.DIRTYPE
        tar.addfile(top)
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


def _member(name: str, kind=tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type = kind
    m.linkname = link
    return m


@pytest.mark.parametrize("member", [
    _member("rel/../../evil.txt"),
    _member("/etc/evil.txt"),
    _member("rel/link", tarfile.SYMTYPE, "/etc/passwd"),
    _member("rel/hard", tarfile.LNKTYPE, "rel/x"),
    _member("other/file.txt"),
], ids=["dotdot", "absolute", "symlink", "hardlink", "two-tops"])
def test_safe_extract_rejects_unsafe_member(tmp_path, member):
    archive = _tar_with(tmp_path / "bad.tar.gz", member, b"payload")
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ArtifactError, match="unsafe or malformed"):
        safe_extract(archive, dest)
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "evil.txt").exists()


def test_verify_release_rejects_folder_without_sums(qwen25_392):
    with pytest.raises(ArtifactError, match="not a vlmforge release"):
        verify_release(qwen25_392.directory)


# -- hub -----------------------------------------------------------------------------------------------------------------
def test_publish_hub_push_offline_gives_clear_error(qwen25_392, release, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ArtifactError) as err:
        publish(qwen25_392.directory, tmp_path / "rel", hub_repo="someone/tiny-release")
    assert "HF_HUB_OFFLINE" in err.value.what and "someone/tiny-release" in err.value.where
    assert "unset HF_HUB_OFFLINE" in err.value.fix
    assert not (tmp_path / "rel").exists()  # checked before anything is written
    with pytest.raises(ArtifactError, match="offline"):
        push_to_hub(release, "someone/tiny-release")


# -- the model card ----------------------------------------------------------------------------------------------------
def test_model_card_has_source_validation_toolchain_and_usage(release):
    card = (release / "README.md").read_text()
    manifest = read_manifest(release)
    assert "`fixture:qwen2_5_vl`" in card and "| family | `qwen2_5_vl` |" in card
    assert "| vision input | 392 x 392 px |" in card and "| tokens per image | 196 |" in card
    assert "| stage | check | metric | value | tolerance | pass |" in card
    rows = [line for line in card.splitlines() if line.endswith("| yes |") and line.count("|") == 7]
    assert len(rows) == len(manifest["validation"]["checks"])
    assert f"| torch | {manifest['toolchain']['packages']['torch']} |" in card
    assert f'vlmforge generate {release.name} --image x.png --prompt "Describe this image."' in card
    assert "og.Model(" in card and "og.Images.open(" in card and "create_multimodal_processor" in card
    assert "Deviation from the source model" not in card


def test_model_card_states_deviation_and_omits_genai_when_absent(release):
    manifest = read_manifest(release)
    manifest["variant"] = {"deepstack": "dropped", "statement": "This artifact set omits the DeepStack features."}
    card = model_card(manifest, "x", has_genai=False)
    assert "## Deviation from the source model" in card and "omits the DeepStack features" in card
    assert "onnxruntime_genai" not in card
    assert model_card(manifest, "x", has_genai=False) == card  # no clock, no randomness


def test_model_card_genai_snippet_runs(release, tmp_path):
    """The onnxruntime-genai snippet in the card works as written (image made up, length capped)."""
    pytest.importorskip("onnxruntime_genai")
    from PIL import Image

    card = (release / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 18
    Image.new("RGB", (320, 240), (180, 40, 40)).save(tmp_path / "x.png")
    (tmp_path / release.name).symlink_to(release)
    proc = subprocess.run([sys.executable, "-c", code.replace("max_length=1024", "max_length=260")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()


# -- the nightly workflow ----------------------------------------------------------------------------------------------
def test_nightly_workflow_is_valid_yaml_with_schedule_and_gpu_job():
    yaml = pytest.importorskip("yaml")
    wf = yaml.safe_load((REPO / ".github" / "workflows" / "nightly.yml").read_text())
    triggers = wf.get("on", wf.get(True))  # PyYAML reads a bare `on` key as True
    assert "cron" in triggers["schedule"][0] and "workflow_dispatch" in triggers
    job = wf["jobs"]["nightly"]
    assert "self-hosted" in job["runs-on"] and "gpu" in job["runs-on"]
    script = json.dumps(job["steps"])
    for needle in ("make test", "make export-all", "vlmforge verify", "vlmforge publish", "actions/upload-artifact",
                   "secrets.HF_TOKEN", "--hub-repo"):
        assert needle in script, needle
