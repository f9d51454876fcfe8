"""`vlmforge generate` and `vlmforge chat` on a real tiny artifact set (in process, and one real Ctrl-C)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vlmforge.cli import main
from vlmforge.fixtures.images import sample_image
from vlmforge.runtime.commands import run_chat
from vlmforge.runtime.pipeline import Pipeline

VLMFORGE = Path(sys.executable).with_name("vlmforge")


@pytest.fixture(scope="module")
def art(qwen25_392):
    return qwen25_392.directory


@pytest.fixture(scope="module")
def pipe(art):
    return Pipeline.load(art)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    p = tmp_path_factory.mktemp("cli-images") / "a.png"
    sample_image(31, size=(420, 420)).save(p)
    return str(p)


def test_generate_streams_the_reply_and_prints_stats(art, pipe, image, capsys):
    rc = main(["generate", str(art), "--image", image, "--image", image, "--prompt", "Compare.", "--max-new-tokens", "8",
               "--stats"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert out == pipe.generate("Compare.", images=[image, image], max_new_tokens=8) + "\n"
    assert "vision" in err and "2 images" in err and "time to first token" in err and "tokens/s" in err


def test_generate_no_stream_prints_the_same_text(art, pipe, capsys):
    rc = main(["generate", str(art), "--prompt", "Hello.", "--max-new-tokens", "8", "--no-stream",
               "--temperature", "0.7", "--top-k", "20", "--top-p", "0.9", "--seed", "5"])
    out, _ = capsys.readouterr()
    assert rc == 0
    assert out == pipe.generate("Hello.", max_new_tokens=8, temperature=0.7, top_k=20, top_p=0.9, seed=5) + "\n"


@pytest.mark.parametrize("argv, words", [
    (["--image", "/nonexistent/x.png"], ["InputError", "image file not found", "/nonexistent/x.png"]),
    (["--temperature", "-1"], ["InputError", "temperature"]),
    (["--top-p", "0"], ["InputError", "top_p"]),
    (["--top-k", "-3"], ["InputError", "top_k"]),
    (["--max-new-tokens", "100000"], ["InputError", "context length"]),
])
def test_generate_bad_input_prints_the_error_without_traceback(art, capsys, argv, words):
    rc = main(["generate", str(art), "--prompt", "Hi."] + argv)
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert all(w in err for w in words) and "Traceback" not in err


def test_generate_on_a_tampered_set_is_an_artifact_error(art, tmp_path, capsys):
    import shutil

    d = tmp_path / "set"
    shutil.copytree(art, d)
    (d / "embedding.onnx").write_bytes((d / "embedding.onnx").read_bytes()[:-1])
    assert main(["generate", str(d), "--prompt", "Hi."]) == 2
    err = capsys.readouterr().err
    assert "ArtifactError" in err and "embedding.onnx" in err and "Traceback" not in err


def _lines(*lines):
    it = iter(lines)

    def read():
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read


def test_chat_loop_images_reset_errors_and_quit(pipe, image):
    chat = pipe.chat()
    out, err = io.StringIO(), io.StringIO()
    read = _lines("Hello.", "/image /no/such.png", f"/image {image}", "What is this?", "/bogus", "/reset",
                  "Again.", "/quit", "never read")
    assert run_chat(chat, read, out, err, {"max_new_tokens": 5}) == 0
    replies = out.getvalue().splitlines()
    assert len(replies) == 3
    assert replies[0] == pipe.generate("Hello.", max_new_tokens=5)
    assert replies[2] == pipe.generate("Again.", max_new_tokens=5)  # /reset dropped the earlier turns
    errors = err.getvalue()
    assert "image file not found" in errors and "attached" in errors and "unknown command" in errors
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]


def test_chat_turn_error_keeps_the_session(pipe):
    chat = pipe.chat()
    out, err = io.StringIO(), io.StringIO()
    read = _lines("Hi.", "Hi again.")
    assert run_chat(chat, read, out, err, {"max_new_tokens": pipe.context_length}) == 0
    assert err.getvalue().count("InputError") == 2 and chat.messages == []


class _InterruptAfter(io.StringIO):
    """A terminal whose user presses Ctrl-C after `n` writes of a reply."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def write(self, s: str) -> int:
        if self.n == 0:
            self.n = -1
            raise KeyboardInterrupt
        self.n -= 1
        return super().write(s)


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(pipe):
    chat = pipe.chat()
    out, err = _InterruptAfter(2), io.StringIO()
    assert run_chat(chat, _lines("Write a long poem.", "Thanks."), out, err, {"max_new_tokens": 60}) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].endswith(" [stopped]") and len(lines) == 2
    partial = lines[0][: -len(" [stopped]")]
    kept = chat.messages[1]["content"]  # what the model produced before the stop (a piece may not have shown)
    assert kept.startswith(partial) and pipe.generate("Write a long poem.", max_new_tokens=60).startswith(kept)
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]


@pytest.mark.skipif(not VLMFORGE.exists(), reason="console script not installed")
def test_real_sigint_during_a_reply_keeps_the_chat_process_alive(art):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([str(VLMFORGE), "chat", str(art), "--max-new-tokens", "3500"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=_default_sigint)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True)
    reader.start()
    try:
        proc.stdin.write("Write a very long story.\n")
        proc.stdin.flush()
        deadline = time.time() + 60
        while not got and time.time() < deadline:
            time.sleep(0.05)
        assert got, "no reply streamed"
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.stdin.write("/quit\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=5)
    assert "[stopped]" in "".join(got)


def _default_sigint() -> None:
    """The child starts with SIGINT at its default and unblocked, as a terminal gives it: a process inherits an
    ignored or blocked SIGINT (a pytest-xdist worker can hold one after earlier tests), and then never raises
    KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
