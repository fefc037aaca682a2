"""Checkpoints: what is saved besides the model, where, and which ones are kept.

Layout: RUN/checkpoints/step-0000120/: accelerator.save_state (model, optimizer, scheduler,
scaler, RNG; all loaded back with torch's weights_only loading), train_state.json (step,
data position, best CER), model_fingerprint.json and train_config.json. A
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

from . import faults
from .data import Position

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{7,})$")


STATE_FILE, FINGERPRINT_FILE, CONFIG_FILE = "train_state.json", "model_fingerprint.json", "train_config.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed by this run (one line, names the checkpoint)."""


@dataclass
class TrainState:
    """Loop state saved as JSON next to accelerate's state (JSON, not pickle: nothing in a
    checkpoint is unpickled on resume).

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

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def load(cls, checkpoint: str | Path) -> TrainState:
        path = Path(checkpoint) / STATE_FILE
        if not path.exists():
            raise CheckpointError(f"{checkpoint}: no {STATE_FILE}; not a checkpoint written by train_loop.py")
        return cls(**json.loads(path.read_text()))

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


def save(accelerator, run_dir: str | Path, step: int, files: dict[str, str]) -> Path:
    """Write the checkpoint for `step` atomically, with `files` (name -> text) beside
    accelerate's state; every process must call this."""
    final = step_dir(run_dir, step)
    tmp = final.with_name(".tmp-" + final.name)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a crash at this very step
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every rank's files (RNG states, ZeRO shards) are in tmp
    if accelerator.is_main_process:
        for name, text in files.items():
            (tmp / name).write_text(text)
        faults.before_rename(step)
        if final.exists():  # re-saving a step after resume: replace the old copy only now
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


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


def fingerprint(model, tokenizer, base_model: str) -> dict:
    """What must match for a checkpoint to fit this run's model and tokenizer."""
    c = model.config
    return {"base_model": base_model, "vocab_size": model.get_input_embeddings().weight.shape[0],
            "d_model": c.d_model, "encoder_layers": c.encoder_layers, "decoder_layers": c.decoder_layers,
            "num_mel_bins": c.num_mel_bins, "tokenizer_size": len(tokenizer)}


def check_fingerprint(checkpoint: str | Path, current: dict) -> None:
    """Refuse a checkpoint written for another model or tokenizer (a moved base model is fine)."""
    path = Path(checkpoint) / FINGERPRINT_FILE
    if not path.exists():
        raise CheckpointError(f"{checkpoint}: no {FINGERPRINT_FILE}; not a checkpoint written by train_loop.py")
    saved = json.loads(path.read_text())
    differ = [k for k in current if k != "base_model" and saved.get(k) != current[k]]
    if differ:
        details = ", ".join(f"{k} {saved.get(k)} vs {current[k]}" for k in differ)
        raise CheckpointError(f"--resume-from-checkpoint {checkpoint}: written for another model or tokenizer "
                              f"({saved.get('base_model')}; {details})")
    if saved["base_model"] != current["base_model"]:
        log.warning("%s was written with --base-model %s; resuming with %s (same architecture and tokenizer)",
                    checkpoint, saved["base_model"], current["base_model"])
