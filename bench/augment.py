"""Augmentation on small data: the demo's fine-tune with and without it, paired per clip.

    python -m bench.augment [--demo demo_out] [--json bench/augment.json]

Needs `make demo`'s output: its fine-tune is the baseline (OUT/runs/demo, evaluated as
OUT/eval_after_*.json). Trains the same command with FLAGS added, evaluates that final/ on both
held-out splits with wdx.evaluate, pairs every clip with wdx.scoring.metrics.compare (one Holm family
over both splits), and times the augmenter on the training clips. README's augmentation table
is rendered from the JSON (`python -m wdx.demo.readme`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from transformers import WhisperConfig

from wdx import strictjson
from wdx.config import parse_args
from wdx.data import augment
from wdx.demo.pipeline import BATCH, HELD_OUT, MAX_NEW_TOKENS, train_command
from wdx.demo.report import machine
from wdx.scoring import evaluate
from wdx.scoring.metrics import compare, mark_real

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--speed-perturb", "0.9,1.0,1.1", "--noise-snr-db", "10,30", "--spec-augment", "--mask-feature-prob", "0.05"]


def augmenter_cost(data: Path, base: Path) -> tuple[float, float]:
    """(ms per training sample, mean clip seconds): the run's augmenter on every training clip."""
    cfg = parse_args(["--dataset-root", str(data), "--base-model", str(base), "--run-name", "timing", *FLAGS])
    augmenter = augment.build(cfg, WhisperConfig.from_pretrained(base))
    samples = [dict(s, audio=np.asarray(s["audio"], np.float32))
               for batch in evaluate.dataset_batches(str(data), "train", BATCH, 0, None, Counter()) for s in batch]
    start = time.perf_counter()
    for s in samples:
        augmenter(s, epoch=0)
    seconds = time.perf_counter() - start
    return 1000 * seconds / len(samples), sum(len(s["audio"]) for s in samples) / 16000 / len(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.augment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=REPO / "demo_out", help="make demo's output directory")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "augment.json")
    args = parser.parse_args(argv)
    demo, runs = args.demo, args.demo / "augment"
    cmd = [*train_command(demo / "data", demo / "whisper-base", runs), "--run-name", "augmented", *FLAGS]
    if subprocess.run(cmd, cwd=REPO).returncode:
        raise SystemExit("bench.augment: training with augmentation failed")
    tables = {}
    for split, label in HELD_OUT.items():
        out = runs / f"eval_{split}.json"
        if evaluate.main([str(runs / "augmented" / "final"), "--dataset", str(demo / "data"), "--split", split,
                          "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", str(BATCH), "--json", str(out)]):
            raise SystemExit(f"bench.augment: evaluating on {split} failed")
        baseline = json.loads((demo / f"eval_after_{split}.json").read_text())["samples"]
        tables[label] = compare(baseline, json.loads(out.read_text())["samples"], correct=False)
    mark_real(list(tables.values()))
    ms, clip_s = augmenter_cost(demo / "data", demo / "whisper-base")
    run = {"date": time.strftime("%Y-%m-%d"), "machine": machine(),
           "baseline": "the fine-tune of `make demo` (bench/demo.json)", "augmented_flags": " ".join(FLAGS),
           "command": "`python -m bench.augment`: the demo's training command with these flags added; each final/ "
                      "evaluated with wdx.evaluate and paired per clip, one Holm family over both splits",
           "augmenter_ms_per_sample": ms, "mean_clip_s": clip_s,
           "splits": {label: {"compare": table} for label, table in tables.items()}}
    args.json.write_text(strictjson.dumps(run, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps({label: {d: {k: r.get(k) for k in ("cer_a", "cer_b", "diff", "real")} for d, r in t.items()}
                      for label, t in tables.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
