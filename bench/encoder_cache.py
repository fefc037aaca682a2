"""The encoder cache's speed-up: seconds per epoch from audio, for building the cache, and from it.

    python -m bench.encoder_cache [--smoke] [--json bench/encoder_cache.json]

Two geometries, random init (speed depends on the shapes, not the weights), the default
freeze (last 4 encoder blocks, attention + MLP of the last 4 decoder blocks), fp32 on this
machine's CPU, 5-15 s espeak-ng clips in the wav/flac/mp3/m4a mix:
  base       whisper-base's shapes: d_model 512, 6 + 6 layers (2 frozen encoder blocks)
  32+32      large-v3's layer counts and 128 mel bins at d_model 512 (28 frozen blocks); at
             d_model 256 attention would be half the encoder's FLOPs (T = 1500 frames vs
             6 d_model), far more than large-v3's 16 %, and this CPU runs attention's
             backward well below its matmul rate, so 256 would measure the CPU, not the cache
Each is trained by `train_loop.py` for 2 epochs from audio, then for 2 epochs with a new
--encoder-cache (built in the first). An epoch's seconds come from the loop's own
throughput log (one record per epoch); the build's from metrics.jsonl. The FLOP bound is
bench.flops.cache_bound at the data's mean transcript length. --smoke: a tiny model and the
clips of `bench.run --smoke` (same --work), to check that it runs (CI); its numbers mean
nothing. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from bench.flops import cache_bound
from bench.gpu import label_tokens
from bench.inputs import make_dataset
from wdx import strictjson

REPO = Path(__file__).resolve().parents[1]
GEOMETRIES = {"base": dict(n_mels=80, d_model=512, layers=6, heads=8, vocab_size=51865),
              "32+32": dict(n_mels=128, d_model=512, layers=32, heads=8, vocab_size=51866)}
SMOKE = {"tiny": dict(n_mels=80, d_model=64, layers=6, heads=4)}


def train(data: Path, model: Path, out: Path, name: str, batch: int, steps_per_epoch: int, *extra: str) -> list[dict]:
    """Two epochs of `train_loop.py`, one throughput record per epoch; returns metrics.jsonl's rows."""
    cmd = [sys.executable, str(REPO / "train_loop.py"), "--dataset-root", str(data), "--base-model", str(model),
           "--output-dir", str(out), "--run-name", name, "--overwrite", "--num-train-epochs", "2",
           "--per-device-train-batch-size", str(batch), "--logging-steps", str(steps_per_epoch), "--eval-steps",
           str(2 * steps_per_epoch), "--save-steps", str(2 * steps_per_epoch), "--max-eval-samples", "1",
           "--generation-max-length", "4", "--warmup-steps", "1", "--num-workers", "1", *extra]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    if done.returncode:
        raise RuntimeError(f"{name}: train_loop.py failed\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in open(out / name / "metrics.jsonl")]


def epoch_seconds(rows: list[dict], samples_per_epoch: int) -> list[float]:
    return [samples_per_epoch / r["train/samples_per_s"] for r in rows if "train/samples_per_s" in r]


def bench_geometry(name: str, shape: dict, data: Path, work: Path, batch: int, n_train: int) -> dict:
    from wdx.model.tiny import build

    model = work / f"model-{name}"
    if not (model / "config.json").exists():
        build(model, **shape)
    from transformers import WhisperConfig

    config = WhisperConfig.from_pretrained(model)
    labels, _ = label_tokens(data, model)
    steps = n_train // batch
    audio = epoch_seconds(train(data, model, work / "runs", f"{name}-audio", batch, steps), n_train)
    cache = work / "runs" / f"{name}-cache"
    shutil.rmtree(cache, ignore_errors=True)  # the first cached epoch includes building it
    rows = train(data, model, work / "runs", f"{name}-cached", batch, steps, "--encoder-cache", str(cache))
    cached = epoch_seconds(rows, n_train)
    (stats,) = [r for r in rows if "encoder_cache/build_seconds" in r]
    bound = cache_bound(config, round(labels), 4, 4)
    return {"d_model": config.d_model, "layers": config.encoder_layers, "frozen_blocks": config.encoder_layers - 4,
            "label_tokens": labels, "epoch_s_audio": audio, "build_s": stats["encoder_cache/build_seconds"],
            "clips_built": stats["encoder_cache/clips_built"], "epoch_s_cached": cached,
            "mb_per_clip": stats["encoder_cache/mb_per_clip"],
            "speedup": audio[-1] / cached[-1], "flop_bound": bound, "of_bound": audio[-1] / cached[-1] / bound,
            "first_epoch_ratio": (stats["encoder_cache/build_seconds"] + cached[0]) / audio[-1]}


def table(results: dict) -> str:
    lines = [f"{'geometry':<10}{'frozen':>7}{'epoch audio s':>15}{'build s':>9}{'epoch 1 cached s':>18}"
             f"{'epoch 2 cached s':>18}{'speed-up':>10}{'bound':>7}{'of bound':>10}{'1st epoch':>11}{'MB/clip':>9}"]
    for name, r in results["geometries"].items():
        lines.append(f"{name:<10}{r['frozen_blocks']:>7}{r['epoch_s_audio'][-1]:>15.1f}{r['build_s']:>9.1f}"
                     f"{r['epoch_s_cached'][0]:>18.1f}{r['epoch_s_cached'][-1]:>18.1f}{r['speedup']:>9.2f}x"
                     f"{r['flop_bound']:>6.2f}x{r['of_bound']:>10.0%}{r['first_epoch_ratio']:>10.2f}x"
                     f"{r['mb_per_clip']:>9.2f}")
    lines.append("epoch audio: the second epoch from audio; speed-up: epoch 2 from audio / epoch 2 cached; "
                 "1st epoch: (build + epoch 1 cached) / an epoch from audio; build includes val_small's clips")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.encoder_cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, few clips: checks the benchmark runs")
    parser.add_argument("--work", type=Path, default=REPO / "bench" / ".work", help="cache for inputs and models")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args(argv)
    from wdx.data.shards import load_split

    # smoke: bench.run --smoke's clips when they are there (8 + 2)
    work = args.work / ("smoke" if args.smoke else "encoder_cache")
    data = make_dataset(work / "data", *((8, 2) if args.smoke else (16, 1)))
    n_train, batch = load_split(str(data), "train").total, 4
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU fp32",
               "mode": "smoke" if args.smoke else "full", "train_clips": n_train, "batch": batch, "geometries": {}}
    for name, shape in (SMOKE if args.smoke else GEOMETRIES).items():
        results["geometries"][name] = bench_geometry(name, shape, data, work, batch, n_train)
    print(f"\n== encoder cache, {n_train} training clips of 5-15 s, batch {batch}, {results['machine']}")
    print(table(results))
    sizes = {name: r["d_model"] for name, r in results["geometries"].items()}
    print("disk per clip at 1500 frames: large-v3 (d_model 1280) 3.84 MB in bf16, 7.68 MB in fp32; "
          + ", ".join(f"{n} (d_model {d}) {1500 * d * 4 / 1e6:.2f} MB in fp32" for n, d in sizes.items()))
    if args.json:
        args.json.write_text(strictjson.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
