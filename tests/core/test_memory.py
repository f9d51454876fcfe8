"""The peak memory a build reports: a high-water mark that never goes down until a new one is started."""

from __future__ import annotations

import sys

import pytest

from vlmforge.core import memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def test_the_reported_peak_covers_what_was_resident_and_resets_per_cell():
    memory.reset_peak()
    before = memory.peak_kib()
    block = bytearray(256 << 20)  # 256 MiB, touched so it is resident
    for i in range(0, len(block), 4096):
        block[i] = 1
    held = memory.peak_kib()
    del block
    memory.give_back()
    after = memory.peak_kib()
    assert held[1] >= before[0] + (200 << 10) and held[1] >= held[0]
    assert after[1] >= held[1] and after[0] < held[0]  # freed, and the peak remembers it
    memory.reset_peak()
    assert memory.peak_kib()[1] < held[1]  # a new cell starts its own mark


def test_a_lower_vmhwm_read_never_lowers_the_peak(monkeypatch):
    # Linux records VmHWM only when pages are unmapped; RSS that leaves another way (reclaimed file pages) can make a
    # later read lower than an earlier one. The build log's peaks must still rise monotonically.
    reads = iter([(600 << 10, 680 << 10), (500 << 10, 670 << 10), (520 << 10, 690 << 10)])
    monkeypatch.setattr(memory, "status_kib", lambda *keys: next(reads))
    monkeypatch.setattr(memory, "_seen_peak_kib", 0)
    assert [memory.peak_kib()[1] >> 10 for _ in range(3)] == [680, 680, 690]
