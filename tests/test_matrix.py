"""The shipped CPU configs in bf16: train, evaluate, save, resume, export; the freeze holds.

bf16 rows here, two runs each. The first is preempted: rank 0 alone gets SIGTERM while it
evaluates step 2, the last step of epoch 0, where no save is due; the stop is agreed by
every rank, step 2 is saved, every rank exits 0. The second resumes it, trains step 3,
evaluates, saves and writes final/. `cpu` runs in-process (what `cpu.yaml` launches: one
process, no DeepSpeed), the others under `accelerate launch`. The fp32 rows run elsewhere
with the same assertions (`check_final`): cpu in test_train_loop.py, DDP / ZeRO-2 / ZeRO-3
in test_distributed.py, which also pins their losses to a 1-process run.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import speechlike

ROOT = Path(__file__).resolve().parents[1]
# bf16 on 2-process DDP is left out: it is 1-process autocast (the "cpu" row) in each of the
# processes test_distributed runs in fp32; nothing in DDP depends on the precision. bf16 on
# ZeRO-3 is left out to keep the suite in its time budget: DeepSpeed's bf16 cast and save
# path is ZeRO-2's (this file), its ZeRO-3 partitioning and export test_distributed's (fp32).
CONFIGS = ["cpu", "cpu_zero2_2proc"]
TRAINED = 2  # --train-encoder-layers and --train-decoder-layers of the tiny 4 + 4 layer model


def trained_names(model_dir: str, layers: int) -> set[str]:
    from wdx.model.whisper import setup

    w, groups = setup(model_dir, language="ko", encoder_layers=layers, decoder_layers=layers)
    ids = {id(p) for name, ps in groups.items() if name != "domain_token_rows" for p in ps}
    return {n for n, p in w.model.named_parameters() if id(p) in ids}


def check_final(final: Path, base_model: str, layers: int) -> None:
    """final/ loads and transcribes; frozen weights are the base's (in the saved dtype), bit
    for bit; the domain-token rows moved; the trained blocks moved."""
    from wdx.scoring.inference import HFTranscriber

    got, base = load_file(final / "model.safetensors"), load_file(Path(base_model) / "model.safetensors")
    trained = trained_names(base_model, layers)
    emb = "model.decoder.embed_tokens.weight"
    vocab = base[emb].shape[0]
    for name, value in base.items():
        if name in trained:
            continue
        if name == emb:
            assert torch.equal(got[emb][:vocab], value.to(got[emb].dtype))
            start = value.mean(0).to(got[emb].dtype)
            assert not torch.equal(got[emb][vocab], start) and not torch.equal(got[emb][vocab + 1], start)
        else:
            assert torch.equal(got[name], value.to(got[name].dtype)), name
    assert sum(not torch.equal(got[n], base[n].to(got[n].dtype)) for n in trained) == len(trained)
    clip = speechlike(1.5, 16000, seed=5).astype(np.float32)
    out = HFTranscriber(final, max_new_tokens=4)([clip, clip], ["normal", "dyslexic"])
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    suppressed = json.loads((final / "generation_config.json").read_text())["suppress_tokens"]
    assert {vocab, vocab + 1} <= set(suppressed)


def free_port() -> int:
    import socket

    with socket.socket() as s:  # a fixed port can still be in TIME_WAIT from the previous launch
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: str, argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / f"{config}.yaml"), "--main_process_port", str(free_port()),
           str(ROOT / "train_loop.py"), *argv]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def eight_clips(tiny_dataset, tmp_path_factory) -> str:
    """8 training clips (2 steps per epoch for 2 processes x batch 2) and tiny_dataset's val_small."""
    from tests.conftest import FORMATS, TEXTS, make_sample
    from wdx.data.pack import write_split

    root = tmp_path_factory.mktemp("eight") / "data"
    write_split(root / "train", [make_sample(f"e{i}", seed=i, text=TEXTS[i % 4], domain=("normal", "dyslexic")[i % 2],
                                             ext=FORMATS[i % 5][0], rate=FORMATS[i % 5][1]) for i in range(8)],
                max_count=3)
    (root / "val_small").symlink_to(Path(tiny_dataset) / "val_small")
    return str(root)


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_bf16_trains_evaluates_saves_resumes_and_exports(config, eight_clips, tiny_model, tmp_path, monkeypatch,
                                                         capsys):
    argv = ["--dataset-root", eight_clips, "--base-model", tiny_model, "--output-dir", str(tmp_path), "--run-name",
            "m", "--max-steps", "3", "--per-device-train-batch-size", "2", "--num-workers", "0", "--learning-rate",
            "3e-3", "--warmup-steps", "0", "--logging-steps", "1", "--eval-steps", "2", "--save-steps", "4",
            "--generation-max-length", "4", "--train-encoder-layers", str(TRAINED), "--train-decoder-layers",
            str(TRAINED), "--bf16"]
    preempt = {"WDX_TEST_SIGTERM": "eval:2:0"}
    if config == "cpu":
        import train_loop

        monkeypatch.setenv("WDX_TEST_SIGTERM", preempt["WDX_TEST_SIGTERM"])
        assert train_loop.main(argv) == 0
        first = capsys.readouterr().out
        monkeypatch.delenv("WDX_TEST_SIGTERM")
        assert train_loop.main(argv + ["--resume-from-checkpoint", "latest"]) == 0
    else:
        done = launch(config, argv, preempt)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        first = done.stdout
        state = json.loads((tmp_path / "m" / "checkpoints" / "step-0000002" / "train_state.json").read_text())
        assert (state["epoch"], state["micro_in_epoch"]) == (1, 0)  # step 2 closed epoch 0
        resumed = launch(config, argv + ["--resume-from-checkpoint", "latest"])
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        # ds_configs/ ask for fp32 accumulation and reduction (DeepSpeed's default: the module's bf16)
        assert ("DeepSpeed ZeRO-2: module in torch.bfloat16; gradients accumulated in torch.float32, reduced in "
                "torch.float32") in first
    assert "precision          bf16 (--bf16" in first and "stopped by SIGTERM at step 2" in first
    run = tmp_path / "m"
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    assert [r["eval/all/n"] for r in rows if "eval/loss" in r] == [6, 6]  # steps 2 and 3
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]
    check_final(run / "final", tiny_model, TRAINED)
