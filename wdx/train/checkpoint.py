"""Checkpoints: what is saved besides the model, where, and which ones are kept.

Layout: RUN/checkpoints/step-0000120/: accelerator.save_state (model, optimizer, scheduler,
scaler, RNG; all loaded back with torch's weights_only loading), train_state.json (step,
data position, best CER), model_fingerprint.json and train_config.json. A
checkpoint is written as RUN/checkpoints/.tmp-step-0000120 and renamed when every process
has finished writing, so a `step-*` directory is always complete: a crash mid-save leaves
only a `.tmp-*` that is never picked as latest and never pushes a good one out of rotation.
`manifest.json`, written last, holds every file's size: a checkpoint damaged later (a
truncated copy, a full disk on a synced volume) is recognised before anything is loaded,
and `latest` falls back to the newest intact one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from wdx import strictjson
from wdx.data.pipeline import Position
from wdx.train import faults
from wdx.train.accel import agree

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{7,})$")


STATE_FILE, FINGERPRINT_FILE, CONFIG_FILE = "train_state.json", "model_fingerprint.json", "train_config.json"
MANIFEST_FILE = "manifest.json"
# How the domain-token rows are stored: their own parameter since this value existed; before,
# rows of the embedding trained through a gradient mask (other optimizer state, other keys).
DOMAIN_ROWS = "parameter"


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
    data_layout: dict = field(default_factory=dict)  # what `positions` depend on (see train_loop.data_layout)
    best_metric: float | None = None  # of --metric-for-best-model, at a saved step
    best_step: int | None = None
    best_results: dict | None = None  # the best evaluation's CER/WER by domain (the model card's, when final/ is it)
    evals_without_improvement: int = 0  # for --early-stopping-patience
    skips: dict = field(default_factory=dict)  # skipped samples by reason, all ranks, whole run
    nonfinite_in_a_row: int = 0

    def to_json(self) -> str:
        return strictjson.dumps(asdict(self), indent=1)

    @classmethod
    def load(cls, checkpoint: str | Path) -> TrainState:
        path = Path(checkpoint) / STATE_FILE
        if not path.exists():
            raise CheckpointError(f"{checkpoint}: no {STATE_FILE}; not a checkpoint written by train_loop.py")
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{checkpoint}: {STATE_FILE} is unreadable ({exc})") from None

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
    """The newest complete checkpoint that passes `verify`; damaged newer ones are logged and passed over."""
    for path in reversed(complete_checkpoints(run_dir)):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def resolve(run_dir: str | Path, spec: str | None) -> Path | None:
    """--resume-from-checkpoint: None, "latest" (the newest intact one, if any) or a directory."""
    if spec is None:
        return None
    if spec == "latest":
        found = latest(run_dir)
        if found is None:
            log.info("--resume-from-checkpoint latest: no checkpoint in %s yet; starting from step 0", run_dir)
        return found
    path = Path(spec)
    if not path.is_dir():
        raise CheckpointError(f"--resume-from-checkpoint {path}: no such checkpoint directory")
    problem = verify(path)
    if problem:
        raise CheckpointError(f"--resume-from-checkpoint {path}: damaged ({problem}); "
                              "name an older checkpoint or use 'latest'")
    return path


def load(accelerator, path: Path) -> None:
    """accelerator.load_state, with a checkpoint that cannot be loaded named in one line."""
    try:
        accelerator.load_state(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors/torch raise their own types for bad files
        log.debug("load_state failed", exc_info=True)
        raise CheckpointError(f"{path}: cannot be loaded ({str(exc).splitlines()[0][:200]}); "
                              "resume from an older checkpoint") from None
    # load_state restores Accelerate's micro-batch counter, and `sync_gradients` is that counter
    # modulo the *current* --grad-accum: after a resume with another accumulation, optimizer.step()
    # and zero_grad() would be no-ops until it lines up again, which may be never. Every saved
    # step ended on a whole optimizer step, so the counter restarts at 0.
    accelerator.step = 0


def verify(path: str | Path) -> str | None:
    """What is wrong with a checkpoint's files, or None. Checkpoints written before manifests
    existed are checked for their loop state only."""
    path = Path(path)
    manifest = path / MANIFEST_FILE
    sizes = {}
    if manifest.exists():
        try:
            sizes = json.loads(manifest.read_text())
        except ValueError:
            return f"{MANIFEST_FILE} is unreadable"
    for name, size in sizes.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    try:
        json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        return f"{STATE_FILE} is unreadable ({exc.__class__.__name__})"
    return None


def write_manifest(path: Path) -> None:
    sizes = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}
    (path / MANIFEST_FILE).write_text(json.dumps(sizes, indent=1))


def step_of(path: str | Path) -> int:
    m = STEP_DIR.match(Path(path).name)
    if not m:
        raise ValueError(f"{path}: not a checkpoint directory (expected .../step-NNNNNNN)")
    return int(m.group(1))


def save(accelerator, run_dir: str | Path, step: int, files: dict[str, str]) -> Path:
    """Write the checkpoint for `step` atomically, with `files` (name -> text) beside
    accelerate's state; every process must call this.

    A write that fails on any process (a full disk, a vanished mount) is agreed on by all of
    them, the partial copy is removed, and every process raises the same one-line
    CheckpointError; the previous checkpoints are untouched. On a full disk torch raises a
    RuntimeError and safetensors its own error, not OSError, hence the broad catch (the
    traceback goes to the debug log).
    """
    final = step_dir(run_dir, step)
    tmp = final.with_name(".tmp-" + final.name)
    error = None
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a crash at this very step
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.debug("checkpoint write failed", exc_info=True)
        error = exc
    accelerator.wait_for_everyone()  # every rank's files (RNG states, ZeRO shards) are in tmp
    if accelerator.is_main_process and error is None:
        try:
            for name, text in files.items():
                (tmp / name).write_text(text)
            write_manifest(tmp)
        except OSError as exc:
            error = exc
    if agree(accelerator, error is not None)[0]:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(save_failure(run_dir, step, error))
    if accelerator.is_main_process:
        faults.before_rename(step)
        if final.exists():  # re-saving a step after resume: replace the old copy only now
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def save_failure(run_dir: str | Path, step: int, error: Exception | None) -> str:
    """One line: what failed, how much room there is and is needed, what is still there."""
    where = checkpoints_dir(run_dir)
    previous = latest(run_dir)
    what = "failed on another process" if error is None else str(error).splitlines()[0][:200]
    free = shutil.disk_usage(where).free / 2**30
    size = sum(f.stat().st_size for f in previous.rglob("*") if f.is_file()) / 2**30 if previous else None
    room = f"{free:.2f} GiB free" + (f", a checkpoint takes {size:.2f} GiB" if size is not None else "")
    kept = f"{previous.name} is intact; resume from it" if previous else "no earlier checkpoint exists"
    return f"saving checkpoint step {step} in {where} failed ({what}); {room}; {kept}"


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


# The frozen weights' hash, seeded domain-token rows left out (they train, and --seed only
# decides where they start). Checkpoints written before it recorded the rows too under
# "frozen_sha256", which a resume with another --seed refused: those are no longer checked.
FROZEN_KEY = "frozen_weights_sha256"
# what a checkpoint was trained with that a resume must repeat, by the flag that sets it
FREEZE_FLAGS = {"train_encoder_layers": "--train-encoder-layers", "train_decoder_layers": "--train-decoder-layers",
                "domain_conditioning": "--domain-conditioning", "domains": "--domains"}


def fingerprint(whisper, base_model: str, train_encoder_layers: int, train_decoder_layers: int) -> dict:
    """What must match for a checkpoint to fit this run's model, tokenizer and freeze (a wdx.model.whisper.Whisper)."""
    c = whisper.model.config
    return {"base_model": base_model, "vocab_size": whisper.model.get_input_embeddings().weight.shape[0],
            "d_model": c.d_model, "encoder_layers": c.encoder_layers, "decoder_layers": c.decoder_layers,
            "num_mel_bins": c.num_mel_bins, "tokenizer_size": len(whisper.tokenizer), "domain_rows": DOMAIN_ROWS,
            "train_encoder_layers": train_encoder_layers, "train_decoder_layers": train_decoder_layers,
            "domain_conditioning": getattr(c, "domain_conditioning", "token"),
            "domains": ",".join(getattr(c, "domains", None) or ()), FROZEN_KEY: whisper.frozen_sha256}


def check_fingerprint(checkpoint: str | Path, current: dict) -> None:
    """Refuse a checkpoint written for another model, tokenizer or set of frozen weights (a
    moved base model with the same weights is fine).

    final/ is built from the base's frozen weights plus the checkpoint's trained ones: a
    checkpoint trained on another base's frozen weights (or with another freeze) would give a
    final/ that was never trained nor evaluated.
    """
    path = Path(checkpoint) / FINGERPRINT_FILE
    if not path.exists():
        raise CheckpointError(f"{checkpoint}: no {FINGERPRINT_FILE}; not a checkpoint written by train_loop.py")
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{checkpoint}: {FINGERPRINT_FILE} is unreadable ({exc})") from None
    if saved.get("domain_rows") != current.get("domain_rows"):
        raise CheckpointError(f"{checkpoint}: written by an older version of this trainer, whose domain-token rows "
                              "trained inside the embedding; resume or --export it with the version that wrote it")
    for key, flag in FREEZE_FLAGS.items():  # older checkpoints do not record the freeze
        if saved.get(key, current[key]) != current[key]:
            raise CheckpointError(f"{checkpoint}: trained with {flag} {saved[key]}, this run has {current[key]}; "
                                  f"resume with {flag} {saved[key]} (or start a new run from an exported final/)")
    differ = [k for k in current if k not in ("base_model", FROZEN_KEY, *FREEZE_FLAGS)
              and saved.get(k) != current[k]]
    if differ:
        details = ", ".join(f"{k} {saved.get(k)} vs {current[k]}" for k in differ)
        raise CheckpointError(f"{checkpoint}: written for another model or tokenizer "
                              f"({saved.get('base_model')}; {details})")
    if saved.get(FROZEN_KEY) not in (None, current[FROZEN_KEY]):
        raise CheckpointError(f"{checkpoint}: trained on the frozen weights of --base-model {saved['base_model']}; "
                              f"those of --base-model {current['base_model']} differ, and final/ would join the two. "
                              f"Use --base-model {saved['base_model']} and the same --train-encoder-layers / "
                              "--train-decoder-layers")
    if saved["base_model"] != current["base_model"]:
        log.warning("%s was written with --base-model %s; resuming with %s (the same frozen weights)",
                    checkpoint, saved["base_model"], current["base_model"])
