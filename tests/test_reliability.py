"""Crashes, bad input, exact resume and soak, with real processes on a tiny model."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

import train_loop
from tests.conftest import make_sample
from tests.test_distributed import free_port
from wdx.data.pack import write_split

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def argv(data, model, out, run="r", *extra):
    return ["--dataset-root", str(data), "--base-model", model, "--output-dir", str(out), "--run-name", run,
            "--max-steps", "6", "--per-device-train-batch-size", "4", "--learning-rate", "3e-3", "--warmup-steps",
            "1", "--logging-steps", "1", "--eval-steps", "2", "--save-steps", "2", "--save-total-limit", "1",
            "--num-workers", "2", "--generation-max-length", "8", "--seed", "7", *extra]


def start(args, env=None):
    return subprocess.Popen([sys.executable, str(ROOT / "train_loop.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})


def wait(predicate, proc, timeout=120):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read()[-3000:])
        assert time.time() - t0 < timeout
        time.sleep(0.02)


def kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def all_losses(run_dir):
    """Every logged train loss, repeats included (a step trained again after a resume logs again)."""
    out = defaultdict(list)
    for line in open(Path(run_dir) / "metrics.jsonl"):
        r = json.loads(line)
        if "train/loss" in r:
            out[r["step"]].append(r["train/loss"])
    return out


@pytest.fixture(scope="module")
def reference(tiny_dataset, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    assert train_loop.main(argv(tiny_dataset, tiny_model, out)) == 0
    return {k: v[0] for k, v in all_losses(out / "r").items()}


def resume_to_the_end(data, model, out):
    done = subprocess.run([sys.executable, str(ROOT / "train_loop.py"),
                           *argv(data, model, out, "r", "--resume-from-checkpoint", "latest")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def assert_every_logged_loss_matches(run_dir, reference):
    for step, values in all_losses(run_dir).items():
        for v in values:
            assert v == pytest.approx(reference[step], abs=1e-5), (step, values, reference[step])
    assert set(all_losses(run_dir)) == set(reference)


def test_kill_during_checkpoint_saving_keeps_the_last_complete_one(reference, tiny_dataset, tiny_model, tmp_path):
    proc = start(argv(tiny_dataset, tiny_model, tmp_path), env={"WDX_TEST_PAUSE_BEFORE_RENAME": "4:30"})
    ckpts = tmp_path / "r" / "checkpoints"
    wait(lambda: (ckpts / ".tmp-step-0000004").exists() and (ckpts / "step-0000002").exists(), proc)
    time.sleep(0.5)  # inside the pause: everything written, not yet renamed
    kill(proc)
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == [".tmp-step-0000004", "step-0000002"]  # save_total_limit 1 did not remove the good one
    resume_to_the_end(tiny_dataset, tiny_model, tmp_path)
    assert_every_logged_loss_matches(tmp_path / "r", reference)
    assert not any(p.name.startswith(".tmp") for p in ckpts.iterdir())


def test_kill_during_evaluation_then_resume(reference, tiny_dataset, tiny_model, tmp_path):
    run = tmp_path / "r"
    proc = start(argv(tiny_dataset, tiny_model, tmp_path, "r", "--generation-max-length", "120"))
    # step 4's loss is logged just before its evaluation starts
    wait(lambda: (run / "metrics.jsonl").exists() and 4 in all_losses(run), proc)
    kill(proc)
    assert 4 not in {json.loads(x)["step"] for x in open(run / "metrics.jsonl") if "eval/loss" in x}
    resume_to_the_end(tiny_dataset, tiny_model, tmp_path)
    assert_every_logged_loss_matches(run, reference)


def test_kills_at_random_points_never_change_the_losses(reference, tiny_dataset, tiny_model, tmp_path):
    rng = random.Random(1234)
    for _ in range(2):
        proc = start(argv(tiny_dataset, tiny_model, tmp_path, "r", "--resume-from-checkpoint", "latest"))
        wait(lambda: (tmp_path / "r" / "metrics.jsonl").exists(), proc)
        time.sleep(rng.uniform(0.2, 2.5))
        kill(proc)
    resume_to_the_end(tiny_dataset, tiny_model, tmp_path)
    assert_every_logged_loss_matches(tmp_path / "r", reference)


def test_sigterm_mid_run_saves_and_the_resumed_run_matches(reference, tiny_dataset, tiny_model, tmp_path):
    proc = start(argv(tiny_dataset, tiny_model, tmp_path, "r", "--save-steps", "100", "--eval-steps", "100"))
    wait(lambda: (tmp_path / "r" / "metrics.jsonl").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    resume_to_the_end(tiny_dataset, tiny_model, tmp_path)
    assert_every_logged_loss_matches(tmp_path / "r", reference)


def dataset_with_bad(root: Path, n: int, bad: set[int], per_shard: int) -> Path:
    samples = []
    for i in range(n):
        s = make_sample(f"s{i:04d}", seed=i, seconds=0.3, domain=("normal", "dyslexic")[i % 2])
        if i in bad:
            s["flac"] = b"not audio at all" * 8
        samples.append(s)
    write_split(root / "train", samples, max_count=per_shard)
    write_split(root / "val_small", samples[:2])
    return root


def run_and_read(data, model, out, *extra):
    args = ["--dataset-root", str(data), "--base-model", model, "--output-dir", str(out), "--run-name", "b",
            "--per-device-train-batch-size", "8", "--num-workers", "0", "--shuffle-block", "1", "--logging-steps",
            "1", "--eval-steps", "1000", "--save-steps", "1000", "--generation-max-length", "2", *extra]
    assert train_loop.main(args) == 0
    return [json.loads(x) for x in open(out / "b" / "metrics.jsonl")]


@pytest.mark.parametrize("cached", [False, True])
def test_a_few_bad_samples_are_skipped_and_counted_exactly(cached, tiny_model, tmp_path):
    # one bad sample in the middle of a shard: a refill (which re-reads a shard's start) never meets it;
    # from the encoder cache, the same skip is counted every epoch, as from audio
    data = dataset_with_bad(tmp_path / "d", 30, {15}, per_shard=10)
    cache = ["--encoder-cache", str(tmp_path / "cache"), "--train-encoder-layers", "2"] if cached else []
    rows = run_and_read(data, tiny_model, tmp_path, "--num-train-epochs", "2", *cache)
    epochs = [r for r in rows if "data/epochs_done" in r]
    assert [(r["data/epochs_done"], r["data/skipped/corrupt_audio"]) for r in epochs] == [(1, 1), (2, 2)]
    assert len([r for r in rows if "train/loss" in r]) == 2 * 4  # 30 per epoch: 3 batches of 8 and one of 6


def test_a_whole_shard_of_bad_samples_does_not_stop_the_run(tiny_model, tmp_path):
    data = dataset_with_bad(tmp_path / "d", 40, set(range(10, 20)), per_shard=10)
    rows = run_and_read(data, tiny_model, tmp_path, "--num-train-epochs", "1")
    (done,) = [r for r in rows if "data/epochs_done" in r]
    assert done["data/skipped/corrupt_audio"] >= 10
    assert len([r for r in rows if "train/loss" in r]) == 5


def test_fp16_on_a_cpu_fails_at_start_naming_the_flag(tiny_dataset, tiny_model, tmp_path, capsys):
    assert train_loop.main(argv(tiny_dataset, tiny_model, tmp_path, "r", "--fp16")) == 2
    err = capsys.readouterr().err
    # Accelerate 1.15 would silently train in fp32 (no autocast, no scaler on a CPU)
    assert err == "train_loop.py: error: --mixed-precision fp16 (--fp16): fp16 needs a GPU; on a CPU use bf16\n"


def test_resuming_with_another_model_is_refused(reference, tiny_dataset, tiny_model, tmp_path, capsys):
    from wdx.model.tiny import build

    assert train_loop.main(argv(tiny_dataset, tiny_model, tmp_path, "r", "--max-steps", "2")) == 0
    other = build(tmp_path / "other", d_model=32)
    assert train_loop.main(argv(tiny_dataset, str(other), tmp_path, "r", "--resume-from-checkpoint", "latest")) == 2
    assert "written for another model or tokenizer" in capsys.readouterr().err


def test_credentials_never_reach_logs_configs_or_checkpoints(tiny_dataset, tiny_model, tmp_path):
    secret_hf, secret_wandb = "hf_SECRETSECRETSECRET123", "wandbsecret0123456789abcdef0123456789abcd"
    done = subprocess.run([sys.executable, str(ROOT / "train_loop.py"),
                           *argv(tiny_dataset, tiny_model, tmp_path, "r", "--max-steps", "2", "--login-wandb")],
                          cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_TOKEN": secret_hf, "WANDB_API_KEY": secret_wandb,
                               "WANDB_MODE": "offline"})
    assert done.returncode == 0, done.stdout[-2000:]
    assert secret_hf not in done.stdout + done.stderr and secret_wandb not in done.stdout + done.stderr
    for path in (tmp_path / "r").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert secret_hf.encode() not in data and secret_wandb.encode() not in data, path


def epochs_of_keys(run_dirs_and_ranges) -> dict[int, Counter]:
    """Splice the key logs: from each run, the micro-batches of the steps in its range."""
    seen: dict[int, Counter] = defaultdict(Counter)
    for run_dir, steps in run_dirs_and_ranges:
        for log in Path(run_dir).glob("sample_keys.rank*.jsonl"):
            for line in open(log):
                r = json.loads(line)
                if r["step"] in steps:
                    seen[r["epoch"]].update(r["keys"])
    return seen


# One process: test_adversarial_runs checks every sample once per epoch across a resume in-process,
# and the kill tests above compare every loss of 2-worker runs across resumes.
@pytest.mark.parametrize("processes", [2])
def test_soak_every_sample_once_per_epoch_across_a_resume(processes, tiny_dataset, tiny_model, tmp_path):
    # 24 samples; 1 process x 2 workers (batch 4) or 2 processes x 2 workers (batch 3): 12 or 4 steps per epoch
    batch, per_epoch = (4, 6) if processes == 1 else (3, 4)
    total, cut = 3 * per_epoch, per_epoch + per_epoch // 2  # resume from the middle of epoch 2
    common = ["--dataset-root", tiny_dataset, "--base-model", tiny_model,
              "--per-device-train-batch-size", str(batch), "--num-workers", "2", "--logging-steps", "1",
              "--eval-steps", str(cut), "--save-steps", str(cut), "--save-total-limit", "5",
              "--generation-max-length", "2", "--max-eval-samples", "2", "--log-sample-keys"]

    def run(out, *extra):
        launch = ([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / "accelerate_configs" / "cpu_ddp_2proc.yaml"), "--main_process_port", str(free_port())]
                  if processes == 2 else [sys.executable])
        done = subprocess.run([*launch, str(ROOT / "train_loop.py"), *common, "--output-dir", str(out), "--run-name",
                               "s", *extra], cwd=ROOT, capture_output=True, text=True, env={**os.environ,
                                                                                           "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    run(tmp_path / "a", "--max-steps", str(cut))  # the interrupted run: only its first `cut` steps matter
    resumed = tmp_path / "b" / "s" / "checkpoints"
    resumed.mkdir(parents=True)
    os.rename(tmp_path / "a" / "s" / "checkpoints" / f"step-{cut:07d}", resumed / f"step-{cut:07d}")
    run(tmp_path / "b", "--max-steps", str(total), "--resume-from-checkpoint", "latest")
    seen = epochs_of_keys([(tmp_path / "a" / "s", range(1, cut + 1)),
                           (tmp_path / "b" / "s", range(cut + 1, total + 1))])
    everything = {f"tr{i:03d}" for i in range(24)}
    assert sorted(seen) == [0, 1, 2]
    for epoch, counts in seen.items():
        assert set(counts) == everything and set(counts.values()) == {1}, (epoch, counts)
