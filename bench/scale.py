"""Training on a corpus of KsponSpeech's shape and size class: does anything grow with it?

    python -m bench.scale [--utterances 20000 100000] [--steps 300] [--work DIR] [--json bench/scale.json]

For each size, a synthetic KsponSpeech tree (bench.pack.make_corpus: 1-3 s clips, the
corpus' markup, 1 in 500 rows broken) is packed with `wdx.pack` (train.trn -> ROOT/train,
plus a 64-clip val_small), and `train_loop.py` runs on it with the tiny model (wdx.model.tiny),
batch 8, 2 loader workers, as a user would, each run in a process of its own:
  first step    --max-steps 1: seconds from start to the end of the first step (set-up, model,
                the loaders' first batch) and peak RSS: what would grow if anything scanned the
                corpus before training
  run           (largest size) --steps steps, a checkpoint at half: seconds, peak RSS of the
                training process and of its largest loader worker, metrics.jsonl and log bytes
  resume        the run resumed from its half-way checkpoint in a new run directory: are the
                second half's losses the unbroken run's, exactly?
The model's numbers mean nothing (random tiny Whisper on noise); the set-up's are the point.
Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.pack import make_corpus
from wdx import strictjson

REPO = Path(__file__).resolve().parents[1]
# train_loop.main in the child, then its own peak RSS and its largest loader worker's (KiB on Linux)
CHILD = ("import resource, sys; sys.path.insert(0, {repo!r}); import train_loop; code = train_loop.main(sys.argv[1:]); "
         "print('BENCH', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
         "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True); sys.exit(code)")


def pack(trn: Path, root: Path, out: Path, split: str) -> None:
    done = subprocess.run([sys.executable, "-m", "wdx.pack", str(trn), str(out), "--audio-root", str(root),
                           "--domain", "normal", "--split", split, "--max-skip-fraction", "0.05"],
                          cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"wdx.pack failed: {done.stderr[-2000:]}")


def train(data: Path, model: Path, out: Path, run: str, *extra: str) -> dict:
    argv = ["--dataset-root", str(data), "--base-model", str(model), "--output-dir", str(out), "--run-name", run,
            "--per-device-train-batch-size", "8", "--num-workers", "2", "--learning-rate", "1e-3",
            "--warmup-steps", "10", "--generation-max-length", "8", "--max-eval-samples", "16",
            "--train-encoder-layers", "2", "--train-decoder-layers", "2", "--seed", "1", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO)), *argv], cwd=REPO, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"train_loop.py failed: {done.stderr[-3000:]}")
    _, main_kib, worker_kib = next(x for x in done.stdout.splitlines() if x.startswith("BENCH")).split()
    metrics = out / run / "metrics.jsonl"
    return {"seconds": seconds, "main_peak_mb": int(main_kib) / 1024, "worker_peak_mb": int(worker_kib) / 1024,
            "metrics_bytes": metrics.stat().st_size, "log_bytes": len(done.stdout) + len(done.stderr),
            "losses": {r["step"]: r["train/loss"] for r in map(json.loads, metrics.read_text().splitlines())
                       if "train/loss" in r}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--utterances", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--work", type=Path, default=REPO / "bench" / ".work" / "scale")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from wdx.model.tiny import build

    shutil.rmtree(args.work, ignore_errors=True)
    model = build(args.work / "tiny")
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "steps": args.steps, "first_step": {}}
    for n in sorted(args.utterances):
        corpus, data = args.work / f"kspon{n}", args.work / f"data{n}"
        trn, _ = make_corpus(corpus, n)
        pack(trn, corpus, data, "train")
        shutil.rmtree(corpus)  # the packed shards are what training reads
        val, _ = make_corpus(args.work / "val", 64, seed=1)
        pack(val, args.work / "val", data, "val_small")
        shutil.rmtree(args.work / "val")
        first = train(data, model, args.work / "runs", f"first{n}", "--max-steps", "1", "--eval-steps", "1",
                      "--save-steps", "1")
        first.pop("losses")
        results["first_step"][str(n)] = {"utterances": n, **first}
        print(f"{n:>8} rows: first step after {first['seconds']:.1f} s, peak RSS {first['main_peak_mb']:.0f} MB "
              f"(largest loader worker {first['worker_peak_mb']:.0f} MB)", flush=True)
        if n != max(args.utterances):
            shutil.rmtree(data)
    half = args.steps // 2
    # a logged loss averages the steps since the previous log: logs must fall on the checkpoint's step
    logging = "10" if half % 10 == 0 else "1"
    full = train(data, model, args.work / "runs", "full", "--max-steps", str(args.steps), "--logging-steps", logging,
                 "--eval-steps", str(half), "--save-steps", str(half))
    resumed_dir = args.work / "runs" / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(args.work / "runs" / "full" / "checkpoints" / f"step-{half:07d}", resumed_dir / f"step-{half:07d}")
    resumed = train(data, model, args.work / "runs", "resumed", "--max-steps", str(args.steps), "--logging-steps",
                    logging, "--eval-steps", str(half), "--save-steps", str(half), "--resume-from-checkpoint", "latest")
    second_half = {s: v for s, v in full["losses"].items() if s > half}
    results["run"] = {"utterances": max(args.utterances), **{k: v for k, v in full.items() if k != "losses"},
                      "seconds_per_step": full["seconds"] / args.steps}
    results["resume"] = {"from_step": half, "losses_equal": resumed["losses"] == second_half,
                         "max_abs_diff": max(abs(resumed["losses"].get(s, float("inf")) - v)
                                             for s, v in second_half.items())}
    print(f"{args.steps} steps on {max(args.utterances)} rows: {full['seconds']:.0f} s, peak RSS "
          f"{full['main_peak_mb']:.0f} MB (loader worker {full['worker_peak_mb']:.0f} MB), metrics.jsonl "
          f"{full['metrics_bytes']} B, log {full['log_bytes']} B; resumed from step {half}: second half's losses "
          f"equal: {results['resume']['losses_equal']}", flush=True)
    if args.json:
        args.json.write_text(strictjson.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
