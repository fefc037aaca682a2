"""GPU benchmark: the real loop on whisper-large-v3's geometry, bf16, through the shipped presets.

    python -m bench.gpu [--steps 20] [--batch 8] [--json bench/gpu_results.json]

A random-init model with large-v3's sizes (no download: wdx.model.tiny with d_model 1280, 32 + 32
layers, 20 heads, 128 mel bins, vocab 51866), the seed's freeze (last 4 encoder blocks;
attention + MLP of the last 4 decoder blocks; the two domain-token rows), espeak-ng Korean
clips of 5-15 s. `accelerate launch train_loop.py` runs once per preset (single_gpu.yaml,
zero2.yaml with 1 process), each in the precision its preset names (bf16). Reported:
samples/s (median step after the first 3), model TFLOP/s and MFU (bench/flops.py against
the card's dense bf16 peak), peak memory (torch.cuda.max_memory_allocated, logged by the
loop) next to --plan's figure, and evaluation (loss + greedy generation) samples/s.

Without CUDA it says so in one line and exits 0. --cpu-smoke runs the same code on the
CPU with the tiny geometry and the CPU stand-ins of the presets, so a machine without a
GPU (CI) checks that the benchmark works; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from bench.flops import train_flops_per_sample
from bench.inputs import make_dataset
from wdx import strictjson

REPO = Path(__file__).resolve().parents[1]
LARGE_V3 = dict(n_mels=128, d_model=1280, layers=32, heads=20, vocab_size=51866)
# dense bf16 peak, TFLOP/s, by a substring of torch.cuda.get_device_name() (vendor datasheets)
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.0,
                    "A10G": 70.0, "L4": 121.0}
WARMUP_STEPS = 3


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def build_model(path: Path, smoke: bool) -> Path:
    from wdx.model.tiny import build

    if not (path / "config.json").exists():
        build(path, **({} if smoke else LARGE_V3))
    return path


def label_tokens(data: Path, model: Path) -> tuple[float, int]:
    """Text tokens + <|endoftext|> per training clip (mean, max), with the tokenizer the loop uses."""
    import tarfile

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    counts = []
    for tar in sorted((data / "train").glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".txt"):
                    counts.append(len(tok.encode(tf.extractfile(m).read().decode(), add_special_tokens=False)) + 1)
    return statistics.mean(counts), max(counts)


def run_preset(preset: str, data: Path, model: Path, out: Path, steps: int, batch: int, smoke: bool) -> dict:
    """One `accelerate launch train_loop.py` run; its numbers read back from metrics.jsonl."""
    run = out / preset
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "accelerate_configs" / f"{preset}.yaml"), "--num_processes", "1", "--num_machines", "1",
           str(REPO / "train_loop.py"), "--dataset-root", str(data), "--base-model", str(model), "--output-dir",
           str(out), "--run-name", preset, "--overwrite", "--max-steps", str(steps), "--per-device-train-batch-size",
           str(batch), "--per-device-eval-batch-size", str(batch), "--logging-steps", "1", "--eval-steps",
           str(steps), "--save-steps", str(steps), "--warmup-steps", "1", "--num-workers", "0" if smoke else "4",
           "--generation-max-length", "8" if smoke else "128", *(["--bf16"] if smoke else [])]
    env = {**os.environ, "WANDB_MODE": "disabled", **({"DS_ACCELERATOR": "cpu"} if smoke else {})}
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{preset}: train_loop.py failed\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    train = [r for r in rows if "train/loss" in r]
    (evaluation,) = [r for r in rows if "eval/loss" in r]
    rates = [r["train/samples_per_s"] for r in train[WARMUP_STEPS:]] or [train[-1]["train/samples_per_s"]]
    precision = next(line.split()[1] for line in done.stdout.splitlines() if line.strip().startswith("precision "))
    return {"samples_per_s": statistics.median(rates), "precision": precision,
            "peak_mem_gib": max((r.get("train/peak_mem_gib", float("nan")) for r in train), default=float("nan")),
            "eval_samples_per_s": evaluation["eval/samples_per_s"], "final_loss": train[-1]["train/loss"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--work", type=Path, default=REPO / "bench" / ".work" / "gpu")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "gpu_results.json")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU: checks the benchmark runs")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("bench.gpu: no CUDA device on this machine; nothing measured (run it where a GPU is)")
        return 0
    smoke = args.cpu_smoke
    work = args.work / ("smoke" if smoke else "large-v3")
    model = build_model(work / ("tiny" if smoke else "model"), smoke)  # bench.run --smoke's, when it is there
    data = make_dataset(work / "data", n_train=args.batch * args.steps, n_val=args.batch * (1 if smoke else 4))
    from transformers import WhisperConfig

    from wdx.train.plan import plan_gib

    config = WhisperConfig.from_pretrained(model)
    labels, longest = label_tokens(data, model)
    flops = train_flops_per_sample(config, round(labels), 4, 4)
    device = torch.cuda.get_device_name(0) if not smoke else "CPU (smoke: numbers mean nothing)"
    peak = peak_tflops(device) if not smoke else None
    # the peak comes with the longest batch: planned at the longest transcript (+ 4 prompt inputs)
    plan = plan_gib(config, 4, 4, args.batch, longest + 4, "bf16", gpus=1)
    presets = {"single_gpu": ("cpu", "DDP"), "zero2": ("cpu_zero2_2proc", "ZeRO-2")}
    if smoke:  # the two presets share run_preset; one shows the benchmark runs (the test suite's time budget)
        presets.pop("zero2")
    results = {"device": device, "geometry": "tiny" if smoke else "whisper-large-v3 (random init)",
               "batch": args.batch, "steps": args.steps, "label_tokens_per_sample": labels,
               "train_tflop_per_sample": flops["total"] / 1e12, "peak_bf16_tflops": peak, "runs": {}}
    for preset, (cpu_preset, strategy) in presets.items():
        r = run_preset(cpu_preset if smoke else preset, data, model, work / "runs", args.steps, args.batch, smoke)
        r["model_tflops"] = r["samples_per_s"] * flops["total"] / 1e12
        r["mfu"] = r["model_tflops"] / peak if peak else None
        r["plan_gib"] = plan[strategy]
        results["runs"][preset] = r
    print(table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(strictjson.dumps(results, indent=1))
    return 0


def table(results: dict) -> str:
    lines = [f"== bench.gpu: {results['device']}, {results['geometry']}, batch {results['batch']}, "
             f"{results['steps']} steps, the seed's freeze",
             f"   {results['train_tflop_per_sample']:.2f} TFLOP per training clip "
             f"({results['label_tokens_per_sample']:.0f} label tokens); card's dense bf16 peak: "
             f"{results['peak_bf16_tflops'] or 'unknown'} TFLOP/s",
             f"{'preset (1 process)':<20}{'precision':>10}{'samples/s':>11}{'TFLOP/s':>9}{'MFU':>7}"
             f"{'peak GiB':>10}{'plan GiB':>10}{'eval samples/s':>16}"]
    for name, r in results["runs"].items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        lines.append(f"{name:<20}{r['precision']:>10}{r['samples_per_s']:>11.2f}{r['model_tflops']:>9.1f}{mfu:>7}"
                     f"{r['peak_mem_gib']:>10.2f}{r['plan_gib']:>10.2f}{r['eval_samples_per_s']:>16.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
