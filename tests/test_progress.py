"""Progress in a log that is not a terminal: one plain line every RLFT_PROGRESS_EVERY seconds and
one at the end, each with the count, share, elapsed time and ETA."""

from __future__ import annotations

import re
import time

import pytest

from rlft import metrics


def test_plain_progress_lines_every_n_seconds(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RLFT_PROGRESS_EVERY", "0.2")
    monkeypatch.setattr(metrics, "console", metrics.Console(stderr=True, force_terminal=False, width=200))
    seen = []
    for i in metrics.progress(range(2, 12), 12, "grpo rl", start=2):
        seen.append(i)
        time.sleep(0.05)
    assert seen == list(range(2, 12))
    lines = capsys.readouterr().err.splitlines()
    # 10 steps of 50 ms: a line about every 4 steps, and the last one
    assert 2 <= len(lines) <= 4, lines
    assert re.fullmatch(r"grpo rl: 12/12 \(100%\) elapsed 0:00:00 eta 0:00:00", lines[-1]), lines
    assert all(re.fullmatch(r"grpo rl: \d+/12 \(\d+%\) elapsed \d:\d\d:\d\d eta \d:\d\d:\d\d", line) for line in lines)
