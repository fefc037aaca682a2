"""--debug-step: K optimizer steps on one fixed batch, timed phase by phase.

For opening the training step: where the time goes (data wait, forward, backward,
optimizer), which parameter groups receive gradient, peak memory, and whether the loss
falls when the model is asked to memorise a single batch (it should, quickly).
"""

from __future__ import annotations

import resource
import statistics
import time

import torch

from wdx.data.collate import IGNORE
from wdx.scoring.forward import model_input, token_loss_sum


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB (GPU, allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:,.0f} MiB (process RSS)"


def group_grad_norms(groups: dict[str, list[torch.nn.Parameter]]) -> dict[str, float]:
    return {name: float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in ps if p.grad is not None]))
                        if any(p.grad is not None for p in ps) else 0.0)
            for name, ps in groups.items() if ps}


def debug_step(accelerator, model, optimizer, loader, groups: dict, steps: int, n_mels: int, lr: float,
               dtype: torch.dtype = torch.float32) -> str:
    """Run `steps` steps at learning rate `lr` (no warm-up) on the loader's first batch; returns the report."""
    device = accelerator.device
    for group in optimizer.param_groups:
        group["lr"] = lr
    t0 = time.perf_counter()
    batch = next(iter(loader))
    data_wait = time.perf_counter() - t0
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    phases: dict[str, list[float]] = {"features": [], "forward": [], "backward": [], "optimizer": []}
    losses, norms = [], {}
    model.train()
    for _ in range(steps):
        marks = [time.perf_counter()]
        inputs = model_input(batch, n_mels, dtype)
        _sync(device)
        marks.append(time.perf_counter())
        loss = token_loss_sum(model, inputs, batch) / (batch["labels"] != IGNORE).sum()
        _sync(device)
        marks.append(time.perf_counter())
        accelerator.backward(loss)
        _sync(device)
        marks.append(time.perf_counter())
        norms = group_grad_norms(groups)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        marks.append(time.perf_counter())
        for name, a, b in zip(phases, marks, marks[1:]):
            phases[name].append(b - a)
        losses.append(loss.item())
    total = sum(statistics.median(v) for v in phases.values())
    start = "cached encoder states" if "encoder_states" in batch else "audio"
    lines = [f"debug step: {steps} steps on one batch of {len(batch['key'])} samples from {start}, device {device}",
             f"  data wait (first batch)  {data_wait * 1000:9.1f} ms",
             f"  {'phase':<22} {'median ms':>10} {'share':>7}"]
    lines += [f"  {name:<22} {statistics.median(v) * 1000:10.1f} {statistics.median(v) / total:7.1%}"
              for name, v in phases.items()]
    lines += ["  grad norm by group (last step):"] + [f"    {k:<20} {v:.4g}" for k, v in norms.items()]
    falls = "yes" if losses[-1] < losses[0] else "NO: check lr, masking, frozen params"
    lines += [f"  peak memory              {_peak_memory(device)}",
              f"  loss                     {' -> '.join(f'{x:.4f}' for x in losses)}",
              f"  loss falls               {falls}"]
    return "\n".join(lines)
