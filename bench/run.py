"""Benchmarks, side by side in one run: data path, training step, memory.

    python -m bench.run [--smoke] [--json bench/results.json]

Full mode: OpenAI Whisper base (wdx.demo.offline_model), 5-15 s espeak-ng utterances in the
wav/flac/mp3/m4a mix. --smoke: a tiny model and a handful of samples, to check that the
benchmarks run (CI does this); its numbers mean nothing. Medians over repeats; ratios are
wdx / other. Nothing here asserts a speed: these are measurements, not tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from bench import data_path, memory
from bench.inputs import make_dataset, make_raw_samples
from wdx import strictjson

REPO = Path(__file__).resolve().parents[1]


def train_step(variant: str, data: Path, model: Path, steps: int, batch: int, workers: int) -> dict:
    cmd = [sys.executable, "-m", "bench.train_step", variant, "--data", str(data), "--model", str(model),
           "--steps", str(steps), "--batch", str(batch), "--workers", str(workers)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH ")), None)
    if out.returncode or line is None:
        raise RuntimeError(f"bench.train_step {variant} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return json.loads(line[6:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, few samples: checks the benchmarks run")
    parser.add_argument("--work", type=Path, default=REPO / "bench" / ".work", help="cache for inputs and models")
    parser.add_argument("--json", type=Path, help="write all numbers here")
    args = parser.parse_args(argv)
    n_data, repeats, n_train, steps, batch = (8, 1, 8, 4, 2) if args.smoke else (48, 5, 32, 10, 4)
    work = args.work / ("smoke" if args.smoke else "full")
    work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        from wdx.model.tiny import build as build_tiny

        model = work / "tiny" if (work / "tiny" / "config.json").exists() else build_tiny(work / "tiny")
    else:
        from wdx.demo.offline_model import build as build_base

        model = work / "base" if (work / "base" / "config.json").exists() else build_base(work / "base")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch threads 1 per worker / default for steps"
    results = {"machine": machine, "mode": "smoke" if args.smoke else "full", "model": str(model)}

    # 1. data path: one worker process (one thread)
    raw = make_raw_samples(n_data)
    results["data_path"] = dp = data_path.bench(raw, repeats)
    results["data_path"]["max_abs_feature_difference"] = data_path.check_same_features(raw)
    print(f"\n== data path, one worker, {n_data} clips of 5-15 s (wav 44.1k stereo, flac 16k, mp3 22.05k, m4a 48k)")
    print(f"{'path':<10}{'samples/s':>11}   stages (s, median run)")
    for name in ("usual", "wdx"):
        stages = ", ".join(f"{k} {v:.3f}" for k, v in dp[name]["stages_s"].items())
        print(f"{name:<10}{dp[name]['samples_per_s']:>11.1f}   {stages}")
    worker_only = n_data / (dp["wdx"]["stages_s"]["decode+resample"] + dp["wdx"]["stages_s"]["collate"])
    dp["wdx_worker_only_samples_per_s"] = worker_only
    print(f"ratio wdx/usual: {dp['ratio']:.2f}x   (features identical to {dp['max_abs_feature_difference']:.1e})")
    print(f"wdx in the loader worker only (log-mel runs on the training device): {worker_only:.1f} samples/s, "
          f"{worker_only / dp['usual']['samples_per_s']:.2f}x the usual path")

    # 2. training step, 3. memory
    data = make_dataset(work / "data", n_train)
    # Loader workers are separate processes: on a 2-core machine they compete with the
    # model for the same cores, so both ways are measured with 0 and with 1 worker.
    runs = [("wdx", 0), ("wdx", 1), ("trainer", 0), ("trainer", 1), ("floor", 0)]
    if args.smoke:  # checks that each way runs; the worker count changes nothing in the code path
        runs = [r for r in runs if r[1] == 0]
    results["train_step"] = ts = {f"{v}/w{w}": train_step(v, data, model, steps, batch, w) for v, w in runs}
    print(f"\n== training step, {model.name}, batch {batch}, fp32, {steps} steps (median after 2)")
    print(f"{'way/workers':<13}{'samples/s':>11}{'steps/s':>9}{'peak RSS MiB':>14}{'worker RSS MiB':>16}")
    for v, r in ts.items():
        print(f"{v:<13}{r['samples_per_s']:>11.2f}{r['samples_per_s'] / batch:>9.3f}{r['peak_rss_mib']:>14.0f}"
              f"{r['peak_rss_children_mib']:>16.0f}")
    for w in sorted({w for _, w in runs}):
        ts[f"overhead_w{w}"] = ts["floor/w0"]["samples_per_s"] / ts[f"wdx/w{w}"]["samples_per_s"]
        ts[f"speedup_w{w}"] = ts[f"wdx/w{w}"]["samples_per_s"] / ts[f"trainer/w{w}"]["samples_per_s"]
        print(f"{w} workers: loop overhead (time per step, wdx / floor) {ts[f'overhead_w{w}']:.3f}x; "
              f"speed-up over Seq2SeqTrainer {ts[f'speedup_w{w}']:.2f}x")

    # 3. memory: one step's peak, before/after issue 12 (the model's own geometry; see bench/memory.py)
    mem_batch, mem_tokens = (1, 64) if args.smoke else (4, 448)
    results["memory"] = mem = memory.bench(str(model), mem_batch, mem_tokens, args.smoke)
    results["memory_shape"] = {"model": model.name, "batch": mem_batch, "tokens": mem_tokens}
    print(f"\n== memory of one training step (peak allocated, GiB), {model.name} geometry, batch {mem_batch} x "
          f"{mem_tokens} decoder tokens, last 4 + 4 blocks trained")
    print(f"{'':<44}{'before':>8}{'after':>8}{'ratio':>7}")
    for name, r in mem.items():
        print(f"{name:<44}{r['before_gib']:>8.2f}{r['after_gib']:>8.2f}{r['after_gib'] / r['before_gib']:>7.2f}")
    if not args.smoke:
        from wdx.train.plan import plan_table

        results["plan_large_v3"] = plan = plan_table("openai/whisper-large-v3", 4, 4, 8, 448, "bf16", gpus=1)
        print("\n== memory plan (train_loop.py --plan), large-v3, 1 GPU\n" + plan)
    if args.json:
        args.json.write_text(strictjson.dumps(results, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
