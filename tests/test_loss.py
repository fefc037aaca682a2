"""The loss of one optimizer step is token-weighted: the same gradient for any split of the
step into micro-batches and processes, and the same number as the evaluation loss."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_loop
from tests.conftest import make_sample
from tests.grad_probe import step_gradients
from tests.test_distributed import free_port

ROOT = Path(__file__).resolve().parents[1]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def one_batch_of_8(tiny_model, tmp_path_factory):
    return step_gradients(tiny_model, str(tmp_path_factory.mktemp("g8")), batch=8, accum=1)


@pytest.mark.parametrize("batch,accum", [(4, 2), (2, 4)])
def test_accumulated_micro_batches_give_the_gradient_of_one_batch_of_8(batch, accum, one_batch_of_8, tiny_model,
                                                                       tmp_path):
    # transcripts of 1 to ~60 tokens: the old mean of per-micro-batch means differed by 0.073 (4 x 2, measured)
    split = step_gradients(tiny_model, str(tmp_path), batch=batch, accum=accum)
    assert len(one_batch_of_8) > 100 and max(g.abs().max().item() for g in one_batch_of_8.values()) > 0.1
    assert max_diff(split, one_batch_of_8) <= 1e-5
    assert "model.decoder.embed_tokens.weight" not in one_batch_of_8  # the embedding is frozen whole
    assert (one_batch_of_8["model.decoder.embed_tokens.domain_rows"].abs().sum(dim=1) > 0).all()  # both rows train


@pytest.mark.slow
def test_two_processes_of_4_give_the_gradient_of_one_process_of_8(one_batch_of_8, tiny_model, tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / "cpu_ddp_2proc.yaml"), "--main_process_port", str(free_port()),
           str(ROOT / "tests" / "grad_probe.py"), tiny_model, str(tmp_path), "4", "1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert max_diff(load_file(tmp_path / "grads.safetensors"), one_batch_of_8) <= 1e-5


def test_logged_train_loss_equals_the_eval_loss_on_the_same_samples(tiny_model, make_split, tmp_path):
    # train == val_small; step 1 runs at learning rate 0 (first warm-up step), so the eval
    # after it sees the weights the train loss was computed with
    texts = ["네", "안녕하세요 오늘은 날씨가 맑고 따뜻합니다", "책을", "학교에 가는 길에 친구를 만났어요 " * 3,
             "하나 둘", "저는 사과와 배를 좋아해요 " * 5]
    samples = [make_sample(f"s{i}", seed=i, text=t, domain=("normal", "dyslexic")[i % 2], seconds=3.0)
               for i, t in enumerate(texts)]  # 3 s: room for 50 characters (wdx.data.pipeline.MAX_CHARS_PER_SECOND)
    make_split("train", samples)
    root = make_split("val_small", samples)
    argv = ["--dataset-root", root, "--base-model", tiny_model, "--output-dir", str(tmp_path), "--run-name", "r",
            "--max-steps", "1", "--per-device-train-batch-size", "3", "--grad-accum", "2", "--warmup-steps", "1",
            "--num-workers", "0", "--eval-steps", "1", "--save-steps", "1", "--generation-max-length", "2"]
    assert train_loop.main(argv) == 0
    rows = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")]
    (train,) = [r for r in rows if "train/loss" in r]
    (evaluation,) = [r for r in rows if "eval/loss" in r]
    assert train["train/lr"] == 0.0
    assert train["train/loss"] == pytest.approx(evaluation["eval/loss"], abs=1e-5)


def test_the_eval_loss_computes_no_gradient_under_no_grad():
    # issue 22.14: ctx.needs_input_grad is True under no_grad for a parameter that requires grad, so main
    # computed the hidden states' and domain rows' gradients at every evaluation (2.3x the work)
    from torch.utils._python_dispatch import TorchDispatchMode

    from wdx.model.lm_head import DomainProjection

    class CountMatmuls(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountMatmuls.n += func.__name__.startswith(("mm", "addmm", "matmul", "bmm"))
            return func(*args, **(kwargs or {}))

    weight = torch.nn.Parameter(torch.randn(50, 8), requires_grad=False)
    rows = torch.nn.Parameter(torch.randn(2, 8))
    head = DomainProjection(weight, rows, 48)
    hidden, targets = torch.randn(6, 8, requires_grad=True), torch.tensor([1, 2, 3, 48, 49, 5])
    with torch.no_grad(), CountMatmuls():
        loss = head(hidden, targets)
    assert CountMatmuls.n == 2  # the two logit products only; main: 5 (three more for the gradients)
    CountMatmuls.n = 0
    with CountMatmuls():
        loss_grad = head(hidden, targets)
    assert CountMatmuls.n == 5 and torch.equal(loss, loss_grad.detach())
    loss_grad.backward()
    assert rows.grad is not None and hidden.grad is not None
