"""One output channel: `logging` on the main process, metrics.jsonl, and Accelerate's trackers."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path


def quiet_libraries() -> None:
    """transformers' advisory warnings (generation length notices, ...) off; errors stay."""
    import transformers

    transformers.utils.logging.set_verbosity_error()


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


class MetricsLog:
    """Appends one JSON object per record to RUN/metrics.jsonl and forwards to trackers."""

    def __init__(self, accelerator, path: str | Path) -> None:
        self.accelerator, self.path = accelerator, Path(path)

    def write(self, step: int, metrics: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **clean}, ensure_ascii=False) + "\n")
        self.accelerator.log({k: v for k, v in clean.items() if isinstance(v, (int, float))}, step=step)


def flatten_eval(prefix: str, results: dict) -> dict:
    """{"eval/normal/cer": ..., "eval/all/wer": ..., "eval/dyslexic/n": ...}."""
    return {f"{prefix}/{domain}/{k}": v for domain, r in results.items() for k, v in r.items()}
