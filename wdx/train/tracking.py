"""One output channel: `logging` on the main process, metrics.jsonl, and Accelerate's trackers."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from wdx import strictjson
from wdx.model.whisper import quiet_libraries


def setup_logging(is_main: bool) -> None:
    """INFO on the main process, warnings only elsewhere; libraries kept quiet."""
    quiet_libraries()
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)
    for noisy in ("accelerate", "deepspeed", "DeepSpeed", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING if is_main else logging.ERROR)
    # Whisper ties proj_out to the embedding; Accelerate warns on every save that it stored one copy.
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def drop_after(path: str | Path, step: int) -> None:
    """Keep only the records of a JSONL log up to `step` (none when starting at step 0).

    A run that crashed after its last checkpoint (or before its first) logged steps that
    the resumed run logs again; without this, metrics.jsonl would read 1..8, 1, 2, ...
    """
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line, at in zip(lines, map(_step_of, lines)) if step > 0 and at is not None and at <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut by the crash


class MetricsLog:
    """Appends one JSON object per record to RUN/metrics.jsonl and forwards to trackers; starts
    from what the checkpoint being resumed (if any) had logged."""

    def __init__(self, accelerator, path: str | Path, resumed_step: int) -> None:
        self.accelerator, self.path = accelerator, Path(path)
        if accelerator.is_main_process:
            drop_after(self.path, resumed_step)

    def write(self, step: int, metrics: dict) -> None:
        clean = strictjson.finite(metrics)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **clean}, ensure_ascii=False) + "\n")
        self.accelerator.log({k: v for k, v in clean.items() if isinstance(v, (int, float))}, step=step)


def flatten_eval(prefix: str, results: dict) -> dict:
    """{"eval/normal/cer": ..., "eval/all/wer": ..., "eval/dyslexic/n": ...}."""
    return {f"{prefix}/{domain}/{k}": v for domain, r in results.items() for k, v in r.items()}
