"""Fault injection for the tests, at named points of the loop; inert unless a WDX_TEST_* variable is set.

- WDX_TEST_PAUSE_BEFORE_RENAME=STEP:SECONDS: stretch the window between writing the
  checkpoint of that step and renaming it, so a test can kill the run inside it.
- WDX_TEST_SIGTERM=POINT:STEP:RANK: the process of that rank sends itself SIGTERM when it
  reaches POINT ("eval" or "save") at that optimizer step; a preemption at an exact moment.
"""

from __future__ import annotations

import os
import signal
import time


def reached(point: str, step: int, rank: int) -> None:
    if os.environ.get("WDX_TEST_SIGTERM") == f"{point}:{step}:{rank}":
        os.kill(os.getpid(), signal.SIGTERM)


def before_rename(step: int) -> None:
    at, _, seconds = os.environ.get("WDX_TEST_PAUSE_BEFORE_RENAME", "").partition(":")
    if at == str(step):
        time.sleep(float(seconds))
