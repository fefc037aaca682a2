"""Issue 14, run side: resume, checkpoints, the run directory and launchers under faults."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import accelerate
import pytest
import torch

import train_loop
from tests.conftest import make_sample
from wdx.data.pack import write_split
from wdx.train import checkpoint, rundir

ROOT = Path(__file__).resolve().parents[1]


def argv(data, model, out, run="r", *extra):
    return ["--dataset-root", str(data), "--base-model", model, "--output-dir", str(out), "--run-name", run,
            "--per-device-train-batch-size", "2", "--learning-rate", "1e-3", "--warmup-steps", "1",
            "--logging-steps", "1", "--eval-steps", "2", "--save-steps", "2", "--save-total-limit", "3",
            "--num-workers", "0", "--generation-max-length", "4", "--max-eval-samples", "2", "--seed", "3",
            "--log-sample-keys", *extra]


@pytest.fixture(scope="module")
def four_steps(tiny_dataset, tiny_model, tmp_path_factory):
    """A run stopped after 4 of its 12 micro-batches per epoch: checkpoints step 2 and step 4."""
    out = tmp_path_factory.mktemp("runs")
    assert train_loop.main(argv(tiny_dataset, tiny_model, out, "r", "--max-steps", "4")) == 0
    shutil.rmtree(out / "r" / "final")
    return out / "r"


def copy_run(run_dir, tmp_path) -> Path:
    shutil.copytree(run_dir, tmp_path / "r")
    return tmp_path


def epoch_keys(run_dir, epoch) -> Counter:
    rows = [json.loads(line) for line in open(Path(run_dir) / "sample_keys.rank0.jsonl")]
    return Counter(k for r in rows if r["epoch"] == epoch for k in r["keys"])


def resume(tiny_dataset, tiny_model, out, *extra):
    return train_loop.main(argv(tiny_dataset, tiny_model, out, "r", "--resume-from-checkpoint", "latest", *extra))


def test_a_run_leaves_no_lock_and_a_manifest_per_checkpoint(four_steps):
    assert not (four_steps / rundir.LOCK_FILE).exists()
    for ck in checkpoint.complete_checkpoints(four_steps):
        assert checkpoint.verify(ck) is None and (ck / checkpoint.MANIFEST_FILE).exists()


def test_a_larger_grad_accum_on_resume_maps_the_position_exactly(four_steps, tiny_dataset, tiny_model, tmp_path):
    out = copy_run(four_steps, tmp_path)
    assert resume(tiny_dataset, tiny_model, out, "--grad-accum", "4", "--max-steps", "6") == 0
    assert epoch_keys(out / "r", 0) == Counter({f"tr{i:03d}": 1 for i in range(24)})  # 4 + 2 x 4 micro-batches


def test_a_resume_with_fewer_micro_batches_left_than_a_step_trains_them(four_steps, tiny_dataset, tiny_model,
                                                                         tmp_path):
    out = copy_run(four_steps, tmp_path)
    # 12 micro-batches per epoch, 4 done; steps of 8: step 5 takes the 8 left (issue 31.14: they sat out)
    assert resume(tiny_dataset, tiny_model, out, "--grad-accum", "8", "--max-steps", "5") == 0
    assert epoch_keys(out / "r", 0) == Counter({f"tr{i:03d}": 1 for i in range(24)})
    assert not epoch_keys(out / "r", 1)


def last_step(run_dir) -> int:
    return max(json.loads(line)["step"] for line in open(Path(run_dir) / "metrics.jsonl"))


def test_an_epoch_run_trains_every_sample_once_an_epoch_fresh_or_resumed_with_another_grad_accum(
        four_steps, tiny_dataset, tiny_model, tmp_path):
    every = Counter({f"tr{i:03d}": 1 for i in range(24)})
    # issue 31.2: 4 steps at accum 1 of 2 epochs x 12 micro-batches, resumed at accum 5: the 8 left of epoch 0
    # as 5 + 3, epoch 1 as 5 + 5 + 2 (main recounted the run's steps at accum 5 and stopped early)
    out = copy_run(four_steps, tmp_path / "resumed")
    assert resume(tiny_dataset, tiny_model, out, "--grad-accum", "5", "--num-train-epochs", "2",
                  "--eval-steps", "3", "--save-steps", "3") == 0
    assert epoch_keys(out / "r", 0) == every and epoch_keys(out / "r", 1) == every
    assert last_step(out / "r") == 4 + 2 + 3
    # issue 31.14: a fresh run whose accumulation does not divide the epoch (12 micro-batches at accum 5)
    fresh = tmp_path / "fresh"
    assert train_loop.main(argv(tiny_dataset, tiny_model, fresh, "r", "--grad-accum", "5", "--num-train-epochs", "1",
                                "--eval-steps", "1", "--save-steps", "1")) == 0
    assert epoch_keys(fresh / "r", 0) == every and last_step(fresh / "r") == 3  # main: 2 steps, 20 of 24 samples
    steps = [trained_tensor(fresh / "r" / "checkpoints" / f"step-000000{s}") for s in (2, 3)]
    assert not torch.equal(*steps)  # the short last step updates the weights


def test_export_with_overwrite_never_deletes_the_checkpoint_it_exports(four_steps, tiny_dataset, tiny_model,
                                                                       tmp_path, capsys):
    out = copy_run(four_steps, tmp_path)
    ckpt = out / "r" / "checkpoints" / "step-0000004"
    # issue 31.1: main cleared the run directory, this checkpoint included, then failed to load it
    assert train_loop.main(argv(tiny_dataset, tiny_model, out, "r", "--export", str(ckpt), "--overwrite")) == 0
    assert checkpoint.verify(ckpt) is None and (out / "r" / "final" / "model.safetensors").exists()
    # the same class of input: --base-model RUN/final with --overwrite of that run
    final = out / "r" / "final"
    assert train_loop.main(argv(tiny_dataset, str(final), out, "r", "--overwrite", "--max-steps", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"train_loop.py: error: --overwrite would delete --base-model {final}, which lies inside the run "
                   f"directory {out / 'r'}; move it out first, or choose another --run-name")
    assert (final / "model.safetensors").exists() and checkpoint.verify(ckpt) is None


def test_a_resume_with_another_seed_or_weight_decay_is_taken_and_said(four_steps, tiny_dataset, tiny_model, tmp_path,
                                                                      capsys):
    out = copy_run(four_steps, tmp_path)
    # issue 31.4: the domain rows' seeded start made main refuse this as "other frozen weights"
    assert resume(tiny_dataset, tiny_model, out, "--seed", "4", "--weight-decay", "0.01", "--max-steps", "5") == 0
    log = capsys.readouterr().out
    assert "cannot be mapped (changed: seed 3 -> 4): epoch 0 restarts" in log
    assert "weight decay 0.01 (--weight-decay) replaces the checkpoint's 0 for blocks" in log


def test_another_batch_size_on_resume_restarts_the_epoch_with_a_warning(four_steps, tiny_dataset, tiny_model,
                                                                        tmp_path, capsys):
    out = copy_run(four_steps, tmp_path)
    assert resume(tiny_dataset, tiny_model, out, "--per-device-train-batch-size", "3", "--max-steps", "5") == 0
    log = capsys.readouterr().out
    assert "cannot be mapped (changed: batch_size 2 -> 3): epoch 0 restarts from its first sample" in log
    assert sum(epoch_keys(out / "r", 0).values()) == 8 + 3  # the restart is said, not silent


def test_a_truncated_latest_checkpoint_falls_back_to_the_newest_good_one(four_steps, tiny_dataset, tiny_model,
                                                                         tmp_path, capsys):
    out = copy_run(four_steps, tmp_path)
    damaged = out / "r" / "checkpoints" / "step-0000004"
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert resume(tiny_dataset, tiny_model, out, "--max-steps", "5") == 0
    log = capsys.readouterr().out
    assert f"skipping checkpoint {damaged}: model.safetensors has 1000 bytes" in log
    assert "resumed from" in log and "step-0000002: step 2" in log
    # naming the damaged one is refused in one line
    shutil.copytree(four_steps / "checkpoints" / "step-0000004", tmp_path / "bad")
    (tmp_path / "bad" / checkpoint.STATE_FILE).write_text('{"step": 4, "epo')
    code = train_loop.main(argv(tiny_dataset, tiny_model, out, "r", "--resume-from-checkpoint",
                                str(tmp_path / "bad")))
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"train_loop.py: error: --resume-from-checkpoint {tmp_path / 'bad'}: damaged (train_state.json has 16 bytes, "
        f"{(four_steps / 'checkpoints' / 'step-0000004' / checkpoint.STATE_FILE).stat().st_size} were written); "
        "name an older checkpoint or use 'latest'")


def test_verify_names_each_damaged_file(four_steps, tmp_path):
    ck = shutil.copytree(four_steps / "checkpoints" / "step-0000004", tmp_path / "ck")
    assert checkpoint.verify(ck) is None
    size = (ck / "optimizer.bin").stat().st_size
    (ck / "optimizer.bin").write_bytes(b"")
    assert checkpoint.verify(ck) == f"optimizer.bin has 0 bytes, {size} were written"
    (ck / "optimizer.bin").unlink()
    assert checkpoint.verify(ck) == "optimizer.bin is missing"


def test_a_second_run_in_a_directory_in_use_is_refused(tiny_dataset, tiny_model, tmp_path, capsys):
    owner = subprocess.Popen(["sleep", "60"])
    try:
        lock = tmp_path / "r" / rundir.LOCK_FILE
        lock.parent.mkdir()
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": owner.pid,
                                    "start": rundir._start_time(owner.pid)}))
        assert train_loop.main(argv(tiny_dataset, tiny_model, tmp_path, "r", "--max-steps", "1")) == 2
        assert capsys.readouterr().err.strip() == (
            f"train_loop.py: error: --run-name r: {tmp_path}/r is in use by a running process (pid {owner.pid}); "
            "wait for it, stop it, or choose another --run-name")
    finally:
        owner.kill()
        owner.wait()
    rundir.acquire(tmp_path / "r", "r")  # the owner is gone: its lock is stale and replaced
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    rundir.release(tmp_path / "r")
    assert not lock.exists()
    lock.write_text(json.dumps({"host": "node-7", "pid": 1, "start": "1"}))
    with pytest.raises(rundir.RunDirError, match=f"in use by pid 1 on host node-7; if that run is gone, delete {lock}"):
        rundir.acquire(tmp_path / "r", "r")


def test_an_output_dir_that_is_a_file_is_named(tiny_dataset, tiny_model, tmp_path, capsys):
    (tmp_path / "outputs").write_text("not a directory")
    assert train_loop.main(argv(tiny_dataset, tiny_model, tmp_path / "outputs" / "x", "r")) == 2
    assert capsys.readouterr().err.strip() == (f"train_loop.py: error: --output-dir {tmp_path}/outputs/x: "
                                               f"{tmp_path}/outputs is a file, not a directory")


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(four_steps, tiny_dataset, tiny_model, tmp_path,
                                                                 capsys, monkeypatch):
    out = copy_run(four_steps, tmp_path)
    real = accelerate.Accelerator.save_state

    def full_disk(self, output_dir=None, **kw):
        if output_dir.endswith("step-0000006"):
            (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 100)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")  # torch's
        return real(self, output_dir, **kw)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", full_disk)
    assert resume(tiny_dataset, tiny_model, out, "--max-steps", "8") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"train_loop.py: error: saving checkpoint step 6 in {out}/r/checkpoints failed "
                          "([enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534); ")
    assert err.endswith("step-0000004 is intact; resume from it") and "GiB free, a checkpoint takes" in err
    assert sorted(p.name for p in (out / "r" / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    assert checkpoint.latest(out / "r").name == "step-0000004" and not (out / "r" / rundir.LOCK_FILE).exists()


def bad_eval_dataset(tiny_dataset, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(Path(tiny_dataset) / "train", root / "train")
    write_split(root / "val_small", [dict(make_sample(f"v{i}"), flac=b"junk") for i in range(3)])
    return root


def test_an_eval_split_without_one_usable_sample_is_an_error(tiny_dataset, tiny_model, tmp_path, capsys):
    data = bad_eval_dataset(tiny_dataset, tmp_path)
    assert train_loop.main(argv(data, tiny_model, tmp_path, "r", "--max-steps", "2")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # main: eval/loss 0.0, an empty table, exit 0
    assert err == "train_loop.py: error: val_small: no usable sample to evaluate (skipped: {'corrupt_audio': 3})"


def launch(*args, quiet=False):
    return [sys.executable, "-m", "accelerate.commands.launch", *(["--quiet"] if quiet else []), "--num_processes",
            "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu",
            str(ROOT / "train_loop.py"), *args]


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_training_with_a_checkpoint(tiny_dataset, tiny_model, tmp_path):
    run_dir = tmp_path / "r"
    cmd = launch(*argv(tiny_dataset, tiny_model, tmp_path, "r", "--max-steps", "1000", "--eval-steps", "500",
                       "--save-steps", "1000"))
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while not (run_dir / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.5)
    trainer = json.loads((run_dir / rundir.LOCK_FILE).read_text())["pid"]
    launcher.send_signal(signal.SIGTERM)  # what a scheduler or `kill PID` does
    launcher.wait(timeout=30)
    while Path(f"/proc/{trainer}").exists() and time.time() < deadline:  # main: it trained on, unsupervised
        time.sleep(0.5)
    assert not Path(f"/proc/{trainer}").exists()
    saved = checkpoint.latest(run_dir)
    assert saved is not None and 1 <= checkpoint.step_of(saved) < 1000
    assert not (run_dir / rundir.LOCK_FILE).exists()


@pytest.mark.slow
def test_quiet_launch_shows_only_the_one_line_error(tiny_dataset, tiny_model, tmp_path):
    r = subprocess.run(launch(*argv(tiny_dataset, tiny_model, tmp_path, "r", "--learning-rate", "nan"), quiet=True),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1  # the launcher's own status, as the README says (train_loop.py exits 2)
    assert "Traceback" not in r.stderr and "CalledProcessError" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("train_loop.py: error: --learning-rate: must be a finite number "
                                                 "(got nan)")


# ---- issue 22: resumes that ended with exit 0 and a wrong model

def trained_tensor(ck: Path):
    from safetensors.torch import load_file

    return load_file(ck / "model.safetensors")["model.decoder.layers.3.fc1.weight"]


def test_a_grad_accum_that_does_not_divide_the_steps_taken_still_updates(four_steps, tiny_dataset, tiny_model,
                                                                        tmp_path):
    # 4 steps at accum 1, resumed at accum 3: main's restored micro-step counter (4) never lined up with
    # a step's end again, so optimizer.step() was a no-op for the rest of the run
    out = copy_run(four_steps, tmp_path)
    assert resume(tiny_dataset, tiny_model, out, "--grad-accum", "3", "--max-steps", "6", "--save-steps", "1",
                  "--eval-steps", "1") == 0
    steps = [trained_tensor(out / "r" / "checkpoints" / f"step-000000{s}") for s in (4, 5, 6)]
    assert not torch.equal(steps[0], steps[1]) and not torch.equal(steps[1], steps[2])


def test_resuming_with_another_base_or_freeze_is_refused_and_the_blocks_are_counted(four_steps, tiny_dataset,
                                                                                    tiny_model, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    out = copy_run(four_steps, tmp_path)
    other = Path(shutil.copytree(tiny_model, tmp_path / "other-base"))  # same shape, other frozen weights
    weights = load_file(other / "model.safetensors")
    weights["model.encoder.conv1.weight"] += 0.01
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    assert train_loop.main(argv(tiny_dataset, str(other), out, "r", "--resume-from-checkpoint", "latest")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"train_loop.py: error: {out / 'r' / 'checkpoints' / 'step-0000004'}: trained on the "
                          f"frozen weights of --base-model {tiny_model}; those of --base-model {other} differ")
    assert resume(tiny_dataset, tiny_model, out, "--train-encoder-layers", "1") == 2
    assert "trained with --train-encoder-layers 4, this run has 1" in capsys.readouterr().err
    assert train_loop.main(argv(tiny_dataset, tiny_model, tmp_path, "new", "--train-encoder-layers", "99")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"train_loop.py: error: --train-encoder-layers 99: {tiny_model} has 4 encoder blocks; at most 4")


def test_resuming_an_early_stopped_run_trains_nothing_more(four_steps, tiny_dataset, tiny_model, tmp_path):
    out = copy_run(four_steps, tmp_path)
    ck = out / "r" / "checkpoints" / "step-0000004"
    state = json.loads((ck / checkpoint.STATE_FILE).read_text())
    state.update(best_step=2, best_metric=0.5, evals_without_improvement=2)  # as an early stop at step 4 saves it
    (ck / checkpoint.STATE_FILE).write_text(json.dumps(state))
    (ck / checkpoint.MANIFEST_FILE).unlink()
    checkpoint.write_manifest(ck)
    assert resume(tiny_dataset, tiny_model, out, "--early-stopping-patience", "2", "--max-steps", "8") == 0
    steps = [json.loads(line)["step"] for line in open(out / "r" / "metrics.jsonl")]
    assert max(steps) == 4  # main: trained on to step 6 and wrote final/ from it
    assert torch.equal(trained_tensor(out / "r" / "final"), trained_tensor(out / "r" / "checkpoints" / "step-0000002"))


def test_a_restart_before_the_first_checkpoint_starts_a_fresh_metrics_log(four_steps, tiny_dataset, tiny_model,
                                                                         tmp_path):
    out = copy_run(four_steps, tmp_path)
    shutil.rmtree(out / "r" / "checkpoints")  # a crash before the first save leaves only the logs
    assert train_loop.main(argv(tiny_dataset, tiny_model, out, "r", "--max-steps", "2")) == 0
    train_steps = [r["step"] for r in map(json.loads, open(out / "r" / "metrics.jsonl")) if "train/loss" in r]
    assert train_steps == [1, 2]  # main: 1, 2, 3, 4, 1, 2
    assert [json.loads(line)["step"] for line in open(out / "r" / "sample_keys.rank0.jsonl")] == [1, 2]


def test_a_deepspeed_checkpoint_of_another_world_size_is_refused_naming_what_works(four_steps, tmp_path):
    # issue 22.11: main loaded it, failed inside DeepSpeed and advised "resume from an older checkpoint"
    from types import SimpleNamespace

    from wdx.config import TrainConfig

    out = copy_run(four_steps, tmp_path)
    ck = out / "r" / "checkpoints" / "step-0000004"
    state = json.loads((ck / checkpoint.STATE_FILE).read_text())
    (ck / checkpoint.STATE_FILE).write_text(json.dumps({**state, "world_size": 2}))
    cfg = TrainConfig(dataset_root="x", run_name="r", output_dir=str(out), resume_from_checkpoint=str(ck))
    zero2 = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=2))
    accelerator = SimpleNamespace(num_processes=1, state=zero2)
    (ck / checkpoint.MANIFEST_FILE).unlink()
    checkpoint.write_manifest(ck)
    with pytest.raises(checkpoint.CheckpointError) as err:
        train_loop.resume_point(cfg, accelerator, {})
    assert str(err.value) == (f"{ck}: written by 2 processes under DeepSpeed, whose optimizer shards only load on as "
                              "many; this run has 1. Resume with 2 processes, or write its weights with them "
                              f"(--export {ck}) and start a new run with --base-model RUN/final")


def test_warmup_beyond_the_run_is_said_and_a_pipe_root_without_braces_is_named(tiny_dataset, tiny_model, tmp_path,
                                                                                capsys):
    assert train_loop.main(argv(tiny_dataset, tiny_model, tmp_path, "w", "--warmup-steps", "50", "--max-steps", "4",
                                "--print-config")) == 0
    out = capsys.readouterr().out
    assert "--warmup-steps 50: the run has 4 optimizer steps; the learning rate never reaches" in out
    assert train_loop.main(argv("pipe:cat data/train.tar", tiny_model, tmp_path, "p")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "train_loop.py: error: --dataset-root 'pipe:cat data/train.tar': a pipe: root must contain '{}' where the "
        "file path goes (e.g. 'pipe:aws s3 cp s3://bucket/data/{} -')")


def test_a_resume_follows_this_run_s_learning_rate_and_schedule(four_steps, tiny_dataset, tiny_model, tmp_path):
    # the checkpoint's scheduler held the old peak lr and the old schedule's last lr (0 at the end of 4 steps)
    out = copy_run(four_steps, tmp_path)
    assert resume(tiny_dataset, tiny_model, out, "--max-steps", "6", "--learning-rate", "5e-4",
                  "--lr-scheduler-type", "constant_with_warmup") == 0
    lrs = {r["step"]: r["train/lr"] for r in map(json.loads, open(out / "r" / "metrics.jsonl")) if "train/lr" in r}
    assert lrs[5] == lrs[6] == 5e-4
