"""scripts/peer_builds.py: the child runner's CPU seconds and the medians it reports."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import peer_builds  # noqa: E402
from scale_check import GIB, run_cpu  # noqa: E402


def test_cpu_seconds_count_work_not_waiting(tmp_path):
    busy = [sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass"]
    idle = [sys.executable, "-c", "import time; time.sleep(0.8)"]
    rc, wall, peak, cpu = run_cpu(busy, tmp_path / "busy.log")
    assert rc == 0 and peak > 0 and cpu >= 0.6 and wall >= 0.6
    rc, wall, _, cpu = run_cpu(idle, tmp_path / "idle.log")
    assert rc == 0 and wall >= 0.8 and cpu < wall - 0.4  # a sleeping child's wall time is not CPU time


def test_summary_gives_vlmforge_over_each_peer():
    table = [
        {"tool": "vlmforge", "seconds": 150.0, "cpu_seconds": 200.0, "peak_rss": 5 * GIB},
        {"tool": "builder", "seconds": 100.0, "cpu_seconds": 160.0, "peak_rss": 20 * GIB},
        {"tool": "vlmforge", "seconds": 140.0, "cpu_seconds": 190.0, "peak_rss": 5 * GIB},
        {"tool": "builder", "seconds": 120.0, "cpu_seconds": 170.0, "peak_rss": 16 * GIB},
    ]
    out = peer_builds.summary(table)
    assert "| vlmforge | 2 | 145.0 | 195.0 | 5.00 |" in out
    assert "| builder | 2 | 110.0 | 165.0 | 18.00 |" in out
    assert out.splitlines()[-1] == "vlmforge / builder: time 1.32x, CPU time 1.18x, peak RSS 0.28x"

