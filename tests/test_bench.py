"""The benchmarks run and print their tables (smoke mode: tiny model; numbers not checked)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_smoke_prints_its_tables_and_bench_gpu_and_encoder_cache_run_on_the_cpu(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--work", str(tmp_path),
                           "--json", str(tmp_path / "r.json")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for heading in ("== data path", "== training step", "== memory of one training step"):
        assert heading in done.stdout
    assert "ratio wdx/usual" in done.stdout and "speed-up over Seq2SeqTrainer" in done.stdout
    assert (tmp_path / "r.json").exists()
    # bench.gpu's CPU smoke mode, on the same work dir (its tiny model and clips are reused)
    done = subprocess.run([sys.executable, "-m", "bench.gpu", "--cpu-smoke", "--steps", "4", "--batch", "2",
                           "--work", str(tmp_path), "--json", str(tmp_path / "g.json")], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "g.json").read_text())
    assert set(results["runs"]) == {"single_gpu"}  # zero2 only on a GPU (same code path, suite time)
    for run in results["runs"].values():
        assert run["precision"] == "bf16" and run["samples_per_s"] > 0 and run["eval_samples_per_s"] > 0
    # bench.encoder_cache's, on the same clips
    done = subprocess.run([sys.executable, "-m", "bench.encoder_cache", "--smoke", "--work", str(tmp_path), "--json",
                           str(tmp_path / "c.json")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (tiny,) = json.loads((tmp_path / "c.json").read_text())["geometries"].values()
    assert len(tiny["epoch_s_audio"]) == len(tiny["epoch_s_cached"]) == 2
    assert tiny["clips_built"] == 12  # bench.run's 8 training + 4 validation clips
    assert "== encoder cache" in done.stdout and "speed-up" in done.stdout


def test_bench_gpu_without_cuda_says_so_in_one_line_and_exits_0(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.gpu", "--json", str(tmp_path / "g.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines() == [
        "bench.gpu: no CUDA device on this machine; nothing measured (run it where a GPU is)"]
    assert not (tmp_path / "g.json").exists()


def test_training_flops_of_large_v3_follow_its_geometry():
    from bench.flops import train_flops_per_sample
    from wdx.train.plan import load_config

    f = train_flops_per_sample(load_config("openai/whisper-large-v3"), label_tokens=50, encoder_trained=4,
                               decoder_trained=4)
    # 28 frozen encoder blocks forward: 28 x (8 T d^2 + 4 T^2 d + 4 T d ffn) with T 1500, d 1280, ffn 5120
    assert f["encoder_frozen"] == 28 * (8 * 1500 * 1280**2 + 4 * 1500**2 * 1280 + 4 * 1500 * 1280 * 5120)
    assert f["encoder_trained"] == 3 * 4 / 28 * f["encoder_frozen"]
    assert 3.7e12 < f["total"] < 3.8e12


@pytest.mark.slow
def test_the_corpus_scale_benchmarks_run(tmp_path):
    # issue 32.3 / 32.5: bench.pack and bench.scale on small corpora (their numbers are bench/pack.json and
    # bench/scale.json, not checked here); what is checked is what they exist to show
    done = subprocess.run([sys.executable, "-m", "bench.pack", "--utterances", "300", "600", "--workers", "2",
                           "--work", str(tmp_path / "p"), "--json", str(tmp_path / "pack.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sizes = json.loads((tmp_path / "pack.json").read_text())["sizes"]
    assert not sizes["600"]["torch_imported"] and sizes["600"]["skipped"].startswith("1 of 600 rows")
    done = subprocess.run([sys.executable, "-m", "bench.scale", "--utterances", "100", "--steps", "4",
                           "--work", str(tmp_path / "s"), "--json", str(tmp_path / "scale.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((tmp_path / "scale.json").read_text())["resume"]["losses_equal"] is True
