"""Hostile artifact sets, releases and tarballs through `vlmforge verify` and `vlmforge publish`.

Each case: the expected exit code, one error paragraph and no traceback, the sentinel tree unchanged,
nothing outside the set read into a release, and nothing left that `verify` accepts."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest

from tests.hostile._support import (SECRET, Sentinel, assert_refused, cli, copy_set, list_outside, manifest,
                                    no_bytes_of, rehash, small_fs, write_manifest)


@pytest.fixture()
def sentinel(tmp_path) -> Sentinel:
    return Sentinel(tmp_path / "outside")


@pytest.fixture()
def art(qwen25_392, tmp_path) -> Path:
    return copy_set(qwen25_392.directory, tmp_path / "sets" / "set")


@pytest.fixture(scope="module")
def release(qwen25_392, tmp_path_factory) -> Path:
    from vlmforge.release.publish import publish

    return publish(qwen25_392.directory, tmp_path_factory.mktemp("rel") / "rel")


# -- verify: manifest keys that leave the set ---------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["ABS", "../../outside/secret.txt", "../../../../../../../etc/passwd",
                                 "sub/../../x", "./vision.onnx", "a//b", "a\\..\\b", ".hidden", ""])
def test_verify_refuses_manifest_keys_outside_the_set(capsys, art, sentinel, key):
    key = str(sentinel.secret) if key == "ABS" else key
    list_outside(art, key, sentinel.secret if key != "../../../../../../../etc/passwd" else art / "manifest.json")
    err = assert_refused(cli(capsys, "verify", str(art)), "ArtifactError", "schema at files")
    assert "OK" not in err
    sentinel.assert_untouched()


def test_verify_answer_does_not_tell_whether_an_outside_file_exists(capsys, art, sentinel, tmp_path):
    answers = []
    for target in (sentinel.secret, sentinel.root / "no-such-file"):
        m = manifest(art)
        m["files"] = {k: v for k, v in m["files"].items() if not k.startswith("/")}
        m["files"][str(target)] = {"sha256": "0" * 64, "bytes": 1}
        write_manifest(art, m)
        code, out, err = cli(capsys, "verify", str(art))
        answers.append((code, out, err.replace(str(target), "TARGET")))
    assert answers[0] == answers[1] and answers[0][0] == 2
    assert "missing" not in answers[0][2] and "changed" not in answers[0][2]


def test_verify_reports_a_symlink_to_an_outside_file_without_reading_it(capsys, art, sentinel):
    (art / "generation_config.json").unlink()
    (art / "generation_config.json").symlink_to(sentinel.secret)
    list_outside(art, "generation_config.json", sentinel.secret)  # even with the outside file's true hash
    assert_refused(cli(capsys, "verify", str(art)), "link or special file (not read): generation_config.json", code=1)
    sentinel.assert_untouched()


def test_verify_reports_a_symlink_to_a_folder(capsys, art, sentinel):
    (art / "extra").symlink_to(sentinel.root, target_is_directory=True)
    code, out, _ = cli(capsys, "verify", str(art))
    assert code == 1 and "link or special file (not read): extra" in out and out.rstrip().endswith("FAILED")
    sentinel.assert_untouched()


def test_verify_reports_a_fifo_without_blocking(capsys, art):
    os.mkfifo(art / "pipe")
    code, out, _ = cli(capsys, "verify", str(art))
    assert code == 1 and "link or special file (not read): pipe" in out


@pytest.mark.parametrize("what", ["folder", "binary", "deep", "array", "link", "huge"])
def test_verify_refuses_a_manifest_that_is_not_one(capsys, art, sentinel, what):
    path = art / "manifest.json"
    path.unlink()
    if what == "folder":
        path.mkdir()
    elif what == "binary":
        path.write_bytes(os.urandom(2048) + b"\xff\xfe")
    elif what == "deep":
        path.write_text("[" * 200_000 + "]" * 200_000)
    elif what == "array":
        path.write_text("[1, 2, 3]")
    elif what == "link":
        path.symlink_to(sentinel.secret)
    else:
        with open(path, "wb") as f:
            f.truncate(65 << 20)  # sparse: costs no disk
    assert_refused(cli(capsys, "verify", str(art)), "ArtifactError")
    sentinel.assert_untouched()


def test_verify_refuses_a_path_that_is_not_a_folder(capsys, sentinel):
    assert_refused(cli(capsys, "verify", str(sentinel.secret)), "is not a folder")


# -- verify: tarballs -------------------------------------------------------------------------------------------------
class _Zeros(io.RawIOBase):
    def __init__(self, n: int) -> None:
        self.left = n

    def readinto(self, b) -> int:
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def _tarball(path: Path, release: Path, extra: list[tuple[tarfile.TarInfo, object]]) -> Path:
    with gzip.GzipFile(path, "wb", compresslevel=1, mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for p in sorted(release.rglob("*")):
            tar.add(p, arcname=f"{release.name}/{p.relative_to(release).as_posix()}", recursive=False)
        for info, data in extra:
            tar.addfile(info, data)
    return path


def test_verify_caps_what_a_tarball_bomb_may_write(capsys, release, tmp_path, monkeypatch):
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    size = 300 << 20
    info = tarfile.TarInfo(f"{release.name}/padding.bin")
    info.size = size
    bomb = _tarball(tmp_path / "bomb.tar.gz", release, [(info, _Zeros(size))])
    assert bomb.stat().st_size < size // 40  # a small download ...
    assert_refused(cli(capsys, "verify", str(bomb)), "padding.bin", "manifest allows")
    assert list(scratch.iterdir()) == []  # ... that wrote nothing it was not allowed to, and left nothing


@pytest.mark.parametrize("member", ["../evil.sh", "/abs/evil.sh", "link", "device", "two-tops"])
def test_verify_refuses_unsafe_tarball_members(capsys, release, tmp_path, member):
    info = tarfile.TarInfo({"../evil.sh": "../evil.sh", "/abs/evil.sh": "/abs/evil.sh",
                            "two-tops": "other/evil.sh"}.get(member, f"{release.name}/{member}"))
    if member == "link":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif member == "device":
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    data = io.BytesIO(b"#!/bin/sh\necho pwned\n") if info.type == tarfile.REGTYPE else None
    info.size = len(data.getvalue()) if data else 0
    bad = _tarball(tmp_path / "bad.tar.gz", release, [(info, data)])
    assert_refused(cli(capsys, "verify", str(bad)), "unsafe or malformed release tarball")
    assert not (tmp_path / "evil.sh").exists() and not Path("/abs/evil.sh").exists()


# -- publish ------------------------------------------------------------------------------------------------------------
def test_publish_never_truncates_an_outside_file_named_by_an_absolute_key(capsys, art, sentinel, tmp_path):
    list_outside(art, str(sentinel.secret), sentinel.secret)
    assert_refused(cli(capsys, "publish", str(art), "--to", str(tmp_path / "rels" / "r")), "ArtifactError")
    sentinel.assert_untouched()
    assert not (tmp_path / "rels" / "r").exists()


def test_publish_never_writes_outside_the_release_for_a_dotdot_key(capsys, art, tmp_path):
    (art / "payload.sh").write_text("echo pwned\n")
    m = manifest(art)
    m["files"]["../x/payload.sh"] = m["files"]["vision.onnx"]
    write_manifest(art, m)
    assert_refused(cli(capsys, "publish", str(art), "--to", str(tmp_path / "rels" / "r")), "ArtifactError")
    assert not (tmp_path / "rels" / "x").exists() and not (tmp_path / "rels" / "r").exists()


def test_publish_never_copies_the_bytes_behind_a_symlink(capsys, art, sentinel, tmp_path):
    (art / "generation_config.json").unlink()
    (art / "generation_config.json").symlink_to(sentinel.secret)
    list_outside(art, "generation_config.json", sentinel.secret)
    assert_refused(cli(capsys, "publish", str(art), "--to", str(tmp_path / "rels" / "r")), "does not verify",
                   "link or special file")
    assert no_bytes_of(tmp_path / "rels", SECRET) if (tmp_path / "rels").exists() else True
    sentinel.assert_untouched()


def test_publish_refuses_a_target_holding_user_files(capsys, art, tmp_path):
    to = tmp_path / "mine"
    to.mkdir()
    (to / "thesis.tex").write_text("years of work\n")
    assert_refused(cli(capsys, "publish", str(art), "--to", str(to)), "not a vlmforge release")
    assert (to / "thesis.tex").read_text() == "years of work\n"


def test_publish_refuses_a_target_inside_the_set(capsys, art):
    assert_refused(cli(capsys, "publish", str(art), "--to", str(art / "rel")), "outside the artifact set")
    assert not (art / "rel").exists()


def test_publish_removes_only_dead_publishes_leftovers(capsys, art, tmp_path):
    from vlmforge.core.workdirs import _host

    rels = tmp_path / "rels"
    (rels / f".r.publish-{_host()}-999999999").mkdir(parents=True)  # a dead publish's staging folder
    (rels / f".r.tar.gz.{_host()}-999999999.tmp").write_bytes(b"x" * 1000)
    (rels / ".r.publish-notes").mkdir()  # not a vlmforge working name: the user's
    (rels / f".r.publish-{_host()}-{os.getpid()}x").mkdir()
    assert cli(capsys, "publish", str(art), "--to", str(rels / "r"))[0] == 0
    assert sorted(p.name for p in rels.iterdir()) == sorted(
        [".r.publish-notes", f".r.publish-{_host()}-{os.getpid()}x", "r", "r.tar.gz"])


def test_publish_on_a_full_disk_says_where_and_how_much(capsys, art, tmp_path):
    with small_fs(tmp_path / "tiny", "256k") as fs:
        err = assert_refused(cli(capsys, "publish", str(art), "--to", str(fs / "r")), "no space left", "is needed")
        assert not (fs / "r").exists() and [p for p in fs.iterdir()] == []
    assert "FileSystemError" in err


def test_publish_to_a_read_only_file_system(capsys, art, tmp_path):
    with small_fs(tmp_path / "ro", "1m", readonly=True) as fs:
        assert_refused(cli(capsys, "publish", str(art), "--to", str(fs / "r")), "Read-only file system")


def test_verify_release_with_a_hostile_sha256sums_line(capsys, release, tmp_path, sentinel):
    rel = copy_set(release, tmp_path / "r2")
    with open(rel / "SHA256SUMS", "a") as f:
        f.write(f"{'0' * 64}  ../outside/secret.txt\n{'0' * 64}  {sentinel.secret}\n")
    code, out, err = cli(capsys, "verify", str(rel))
    assert code == 1 and "malformed line" in out and "Traceback" not in err
    sentinel.assert_untouched()


def test_rehashed_set_with_an_unlisted_link_still_fails(capsys, art, sentinel):
    (art / "notes").symlink_to(sentinel.secret)
    rehash(art)
    assert cli(capsys, "verify", str(art))[0] == 1


def test_verify_says_a_set_built_without_validation_is_not_validated(capsys, art):
    m = manifest(art)
    m["validation"] = {"passed": False, "checks": []}
    write_manifest(art, m)
    code, out, _ = cli(capsys, "verify", str(art))
    assert code == 1 and "no validation (built with validate=off)" in out and "failed validation" not in out
