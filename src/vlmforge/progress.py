"""A one-line live status for long build steps (export, transform, validation) on a terminal.

On a TTY (stderr) the step being worked on is shown as one line with its elapsed seconds, redrawn in place
twice a second and cleared when the step ends (the build then logs one line saying how it ended). Log
records printed meanwhile clear the line first, so the two never interleave. When stderr is not a terminal
(CI, a log file, a parallel matrix job) nothing is drawn: the log lines alone tell the story.

`note(text)` gives the running step a detail from deep inside it (the decoder layer whose weights a streamed
export is writing, the block a layer-streamed reference is reading): on a terminal it is shown after the
label; without one it is logged, at most once every LOG_EVERY seconds, so a long step in CI says where it is.

Plain ANSI (carriage return + erase line); no dependency.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from typing import IO, Iterator

CLEAR = "\r\033[K"
SPINNER = "|/-\\"
LOG_EVERY = 60.0  # seconds between two logged notes of one step (no terminal)
_CURRENT: "Progress | None" = None  # the Progress whose step is running (note() reaches it)

log = logging.getLogger("vlmforge.progress")


def note(text: str) -> None:
    """A detail of the step running now (e.g. "decoder layer 13/36"); nothing when no step runs."""
    current = _CURRENT
    if current is not None:
        current._note(text)


class Progress:
    def __init__(self, stream: IO[str] | None = None, enabled: bool | None = None, interval: float = 0.5) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = enabled
        self.interval = interval
        self._lock = threading.Lock()
        self._label: str | None = None
        self._detail: str | None = None
        self._start = 0.0
        self._logged = 0.0
        self._shown = False

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        """Show `label` with a ticking clock while the block runs (without a terminal: only its notes, logged)."""
        global _CURRENT
        previous, _CURRENT = _CURRENT, self
        with self._lock:
            outer = (self._label, self._detail, self._start, self._logged)
            self._label, self._detail, self._start = label, None, time.perf_counter()
            self._logged = self._start
        try:
            if not self.enabled or outer[0] is not None:  # a step inside a step: the outer one's line shows it
                yield
            else:
                with self._live():
                    yield
        finally:
            _CURRENT = previous
            with self._lock:
                self._label, self._detail, self._start, self._logged = outer

    def _note(self, text: str) -> None:
        with self._lock:
            if self._label is None:
                return
            self._detail = text
            now = time.perf_counter()
            if self.enabled or now - self._logged < LOG_EVERY:
                return
            self._logged = now
            label, elapsed = self._label, now - self._start
        log.info("%s: %s (%.0f s)", label, text, elapsed)

    @contextlib.contextmanager
    def _live(self) -> Iterator[None]:
        stop = threading.Event()
        ticker = threading.Thread(target=self._tick, args=(stop,), name="vlmforge-progress", daemon=True)
        filt = _ClearLine(self)
        handlers = logging.getLogger().handlers
        for h in handlers:
            h.addFilter(filt)
        ticker.start()
        try:
            yield
        finally:
            stop.set()
            ticker.join()
            for h in handlers:
                h.removeFilter(filt)
            with self._lock:
                self._clear()

    def _tick(self, stop: threading.Event) -> None:
        n = 0
        while not stop.is_set():
            with self._lock:
                if self._label is not None:
                    elapsed = time.perf_counter() - self._start
                    detail = f" ({self._detail})" if self._detail else ""
                    self.stream.write(f"{CLEAR}{SPINNER[n % len(SPINNER)]} {self._label}{detail}  {elapsed:5.1f} s")
                    self.stream.flush()
                    self._shown = True
            n += 1
            stop.wait(self.interval)

    def _clear(self) -> None:
        if self._shown:
            self.stream.write(CLEAR)
            self.stream.flush()
            self._shown = False

    def clear(self) -> None:
        with self._lock:
            self._clear()


class _ClearLine(logging.Filter):
    """Attached to the root handlers while a step runs: a log record first erases the status line."""

    def __init__(self, progress: Progress) -> None:
        super().__init__()
        self.progress = progress

    def filter(self, record: logging.LogRecord) -> bool:
        self.progress.clear()
        return True


QUIET = Progress(enabled=False)
