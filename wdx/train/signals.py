"""SIGTERM and SIGINT as a request: the loop saves at the next step boundary and exits 0."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop saves at the next step boundary and exits 0.

    `accelerate launch` with one process does not forward signals: a scheduler's SIGTERM
    kills the launcher and this process would train on unsupervised. So when a launcher
    started it, this process also asks the (Linux) kernel for a SIGTERM when its parent
    dies (PR_SET_PDEATHSIG). Not when started from a shell: `nohup python train_loop.py`
    must survive the shell.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        launched = "ACCELERATE_USE_CPU" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ  # simple / torchrun
        if launched and sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
