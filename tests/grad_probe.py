"""The gradients of one optimizer step, through the loop's own forward_backward.

    [accelerate launch --config_file ...] tests/grad_probe.py MODEL OUT_DIR BATCH ACCUM

Eight fixed samples whose transcripts range from 1 to ~60 tokens; each process takes its
contiguous share and splits it into ACCUM micro-batches of BATCH. The main process saves
every parameter gradient (after DDP's all-reduce) to OUT_DIR/grads.safetensors. Used by
tests/test_loss.py: a token-weighted loss gives the same gradient for any split.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_loop  # noqa: E402
from tests.conftest import speechlike  # noqa: E402
from wdx.config import parse_args  # noqa: E402
from wdx.data.collate import Collator  # noqa: E402
from wdx.train.accel import build_accelerator  # noqa: E402

TEXTS = ["네", "하나 둘", "안녕하세요 오늘은 날씨가 맑고 따뜻합니다",
         "학교에 가는 길에 친구를 만났어요 " * 4, "책을", "저는 사과와 배를 좋아해요 " * 6,
         "버스를 타고 시장에 갔습니다", "도서관에서 조용히 공부합니다 " * 3]


def samples() -> list[dict]:
    return [dict(audio=speechlike(0.5 + 0.4 * i, 16000, seed=i).astype(np.float32), text=t,
                 domain=("normal", "dyslexic")[i % 2], key=f"p{i}", duration=0.5 + 0.4 * i)
            for i, t in enumerate(TEXTS)]


def step_gradients(model_dir: str, out_dir: str, batch: int, accum: int) -> dict[str, torch.Tensor] | None:
    cfg = parse_args(["--dataset-root", "unused", "--base-model", model_dir, "--run-name", "probe", "--output-dir",
                      out_dir, "--per-device-train-batch-size", str(batch), "--grad-accum", str(accum),
                      "--mixed-precision", "no"])
    accelerator = build_accelerator(cfg)
    set_seed(0)
    whisper, groups = train_loop.build_model(cfg, accelerator)
    optimizer = train_loop.build_optimizer(cfg, groups, accelerator.device)
    model, optimizer = accelerator.prepare(whisper.model, optimizer)
    per = len(TEXTS) // accelerator.num_processes
    mine = samples()[accelerator.process_index * per:(accelerator.process_index + 1) * per]
    collate = Collator(whisper.tokenizer, "ko")
    micro = [collate(mine[i:i + batch]) for i in range(0, per, batch)]
    assert len(micro) == accum, (len(micro), accum)
    model.train()
    train_loop.forward_backward(accelerator, model, micro, whisper.model.config.num_mel_bins, torch.float32)
    grads = {n: p.grad.detach().clone() for n, p in accelerator.unwrap_model(model).named_parameters()
             if p.grad is not None}
    optimizer.zero_grad(set_to_none=True)
    return grads if accelerator.is_main_process else None


if __name__ == "__main__":
    model_dir, out_dir, batch, accum = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    got = step_gradients(model_dir, out_dir, batch, accum)
    if got is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        save_file(got, str(Path(out_dir) / "grads.safetensors"))
