"""Checkpoints: what is saved besides the model, where, and which ones are kept.

Layout: RUN/checkpoints/step-0000120/ (accelerator.save_state + train_config.json). A
checkpoint is written as RUN/checkpoints/.tmp-step-0000120 and renamed when every process
has finished writing, so a `step-*` directory is always complete: a crash mid-save leaves
only a `.tmp-*` that is never picked as latest and never pushes a good one out of rotation.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .data import Position

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{7,})$")


@dataclass
class TrainState:
    """Loop state that `save_state` carries next to model/optimizer/scheduler/RNG.

    `positions[rank][worker]` is where each loader worker's stream stands in `epoch`, so a
    resumed run skips (without decoding) exactly the samples already trained on.
    """

    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches consumed in `epoch` (per process)
    positions: list = field(default_factory=list)  # [rank][worker] -> [batches, block, offset]
    world_size: int = 1
    num_workers: int = 0
    best_cer: float | None = None
    best_step: int | None = None
    skips: dict = field(default_factory=dict)  # skipped samples by reason, all ranks, whole run
    nonfinite_in_a_row: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)

    def starts_for(self, rank: int) -> list[Position] | None:
        """This rank's per-worker resume positions, or None to start the epoch afresh."""
        if not self.positions or rank >= len(self.positions):
            return None
        return [Position(*p) for p in self.positions[rank]]


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step-{step:07d}"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest(run_dir: str | Path) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def step_of(path: str | Path) -> int:
    m = STEP_DIR.match(Path(path).name)
    if not m:
        raise ValueError(f"{path}: not a checkpoint directory (expected .../step-NNNNNNN)")
    return int(m.group(1))


def save(accelerator, run_dir: str | Path, step: int, config_json: str) -> Path:
    """Write the checkpoint for `step` atomically; every process must call this."""
    final = step_dir(run_dir, step)
    tmp = final.with_name(".tmp-" + final.name)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a crash at this very step
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every rank's files (RNG states, ZeRO shards) are in tmp
    if accelerator.is_main_process:
        (tmp / "train_config.json").write_text(config_json)
        _before_rename_hook()
        if final.exists():  # re-saving a step after resume: replace the old copy only now
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def _before_rename_hook() -> None:
    """Tests stretch the window between writing and renaming to kill a run inside it."""
    pause = os.environ.get("WDX_TEST_PAUSE_BEFORE_RENAME")
    if pause:
        import time

        time.sleep(float(pause))


def rotate(run_dir: str | Path, keep: int, best_step: int | None) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints and the best one; main process only."""
    done = complete_checkpoints(run_dir)
    protected = set(done[-keep:]) | {p for p in done if best_step is not None and step_of(p) == best_step}
    removed = [p for p in done if p not in protected]
    for p in removed:
        shutil.rmtree(p)
    for tmp in checkpoints_dir(run_dir).glob(".tmp-step-*"):
        shutil.rmtree(tmp, ignore_errors=True)  # half-written by a crashed run
    return removed


def saved_config(checkpoint: str | Path) -> dict:
    path = Path(checkpoint) / "train_config.json"
    return json.loads(path.read_text()) if path.exists() else {}
