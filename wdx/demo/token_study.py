"""Does the domain token help? The study, sized to answer on synthetic data (what `make study` runs).

    python -m wdx.demo.token_study OUT_DIR

The demo's recipe (Whisper base from PyPI, 80 training clips, 20 steps of 8 at lr 1e-4) trained
with and without the domain token for each of three seeds, the loop evaluating on `val_small`
(seen voices) only, then both arms scored on `val_unseen`: 216 clips (108 dyslexic, about 270
misread words each time) read by twelve espeak-ng voices training never heard, every seed
pooled, intervals resampling the voices. Writes OUT_DIR/study (wdx.study's output) and
bench/study.json, which README's study block is rendered from (`python -m wdx.demo.readme`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from wdx import strictjson
from wdx.demo import data as demo_data
from wdx.demo import offline_model
from wdx.demo.pipeline import BATCH, MAX_NEW_TOKENS, N_TRAIN, N_VAL, REPO
from wdx.demo.report import machine
from wdx.scoring import study

N_UNSEEN, SEEDS, STEPS = 216, (1, 2, 3), 20
BENCH = REPO / "bench" / "study.json"


def flags(out: Path, data: Path, base: Path) -> list[str]:
    """wdx.study's command line: the demo's training recipe, arms at equal steps."""
    return ["--dataset-root", str(data), "--base-model", str(base), "--out", str(out / "study"),
            "--splits", "val_unseen", "--select-split", "val_small", "--seeds", *map(str, SEEDS),
            "--accelerate-config", str(REPO / "accelerate_configs" / "cpu.yaml"),
            "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", str(BATCH), "--",
            "--max-steps", str(STEPS), "--per-device-train-batch-size", str(BATCH), "--per-device-eval-batch-size",
            str(BATCH), "--learning-rate", "1e-4", "--warmup-steps", "3", "--eval-steps", str(STEPS), "--save-steps",
            str(STEPS), "--save-total-limit", "1", "--logging-steps", "5", "--num-workers", "0",
            "--generation-max-length", str(MAX_NEW_TOKENS), "--num-examples", "0"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wdx.demo.token_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    out, t0 = args.out, time.perf_counter()
    data, base = out / "data", out / "whisper-base"
    if not (data / "val_unseen" / "metadata.json").exists():
        demo_data.build(data, N_TRAIN, N_VAL, n_unseen=N_UNSEEN, unseen=demo_data.MANY_UNSEEN)
    if not (base / "model.safetensors").exists():
        offline_model.build(base)
    if study.main(flags(out, data, base)):
        return 1
    result = json.loads((out / "study" / "study.json").read_text())
    relative = [a.replace(f"{REPO}/", "").replace(str(out), "OUT") for a in flags(out, data, base)]
    result.update(date=time.strftime("%Y-%m-%d"), machine=machine(), total_minutes=(time.perf_counter() - t0) / 60,
                  command="python -m wdx.study " + " ".join(relative), voices=len(demo_data.MANY_UNSEEN.variants))
    BENCH.write_text(strictjson.dumps(result, indent=1) + "\n")
    print(f"wrote {BENCH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
