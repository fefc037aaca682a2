"""The Accelerator, and every DeepSpeed / multi-process quirk, handled in this one place.

- Several processes without GPUs: the gloo backend (and, for plain DDP, `cpu=True`) must
  be given, or each process silently trains alone (DESIGN.md; see build_accelerator).
- The WebDataset loader is never passed to `prepare()`, so DeepSpeed cannot read the
  micro-batch size from it: it is set from --per-device-train-batch-size.
- "auto" in a DeepSpeed JSON is filled from the CLI (batch, accumulation, clipping);
  an explicit value that disagrees with the CLI is an error naming both, where Accelerate
  would silently prefer one.
- Under DeepSpeed, `accelerator.backward` also runs the optimizer step (the engine owns
  gradient accumulation and clipping); `clip_grad_norm_` then reports DeepSpeed's norm.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs, InitProcessGroupKwargs, gather_object

from wdx.config import ConfigError, TrainConfig, deepspeed_json, launched_with_deepspeed, read_json


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    # Several processes, no GPU: plain DDP needs cpu=True, or Accelerate reports
    # DistributedType.NO and neither wraps the model nor reduces anything (each process
    # trains alone); but cpu=True also drops the DeepSpeed plugin, so DeepSpeed gets only
    # the gloo backend (measured with accelerate 1.15).
    cpu_distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    plugin = deepspeed_plugin(cfg)
    # the process-group timeout bounds how long a collective waits for the slowest rank: rank 0 writing
    # final/ of large-v3 (~6 GB) or one rank building a larger share of the encoder cache
    group = {"backend": "gloo"} if cpu_distributed else {}
    handlers = [process_group_kwargs(timeout=timedelta(seconds=cfg.ddp_timeout), **group)]
    # DDP's gradients become views into its all-reduce buckets instead of a second copy
    handlers.append(DistributedDataParallelKwargs(gradient_as_bucket_view=True))
    try:
        accelerator = Accelerator(cpu=cpu_distributed and plugin is None, mixed_precision=cfg.precision(),
                                  deepspeed_plugin=plugin, gradient_accumulation_steps=cfg.grad_accum,
                                  log_with="wandb" if cfg.login_wandb else None, project_dir=cfg.run_dir,
                                  step_scheduler_with_optimizer=False, kwargs_handlers=handlers)
    except ValueError as exc:
        raise ConfigError(f"--mixed-precision {cfg.precision()} ({cfg.precision_source}): "
                          f"{str(exc).splitlines()[0]}") from None
    if cfg.precision() == "fp16" and accelerator.device.type == "cpu":
        # Accelerate 1.15 accepts fp16 on a CPU and then neither autocasts nor scales: fp32, silently
        raise ConfigError(f"--mixed-precision fp16 ({cfg.precision_source}): fp16 needs a GPU; on a CPU use bf16")
    return accelerator


def process_group_kwargs(timeout: timedelta, **kwargs) -> InitProcessGroupKwargs:
    """InitProcessGroupKwargs that passes on exactly what it is given, `timeout` always.

    Its `to_kwargs()` drops every value equal to the class default's, and the default instance
    (backend "nccl") holds a 600 s timeout: --ddp-timeout 600 was dropped, and gloo then ran with
    torch's 30 minutes. Accelerate looks handlers up by their exact class, so the method is
    replaced on the instance rather than in a subclass.
    """
    handler = InitProcessGroupKwargs(timeout=timeout, **kwargs)
    given = {**kwargs, "timeout": timeout}
    object.__setattr__(handler, "to_kwargs", lambda: dict(given))
    return handler


def deepspeed_plugin(cfg: TrainConfig) -> DeepSpeedPlugin | None:
    """The DeepSpeed plugin `accelerate launch` asked for, reconciled with the flags; None
    without DeepSpeed. Built here rather than by Accelerate so that the resolved precision
    reaches the DeepSpeed JSON before Accelerate reads it."""
    if not launched_with_deepspeed(os.environ):
        return None
    path = deepspeed_json(os.environ)
    if path:
        ds = read_json(path)
        reconcile_deepspeed(cfg, ds)
        return DeepSpeedPlugin(hf_ds_config=ds)
    plugin = DeepSpeedPlugin()  # deepspeed_config written inline in the accelerate yaml: from the environment
    reconcile_deepspeed(cfg, plugin.deepspeed_config)
    return plugin


def reconcile_deepspeed(cfg: TrainConfig, ds: dict) -> None:
    """Fill "auto" from the CLI; refuse explicit values that contradict it; set the precision
    sections to the resolved precision (a flag wins over the JSON, see resolve_precision)."""
    wanted = {"train_micro_batch_size_per_gpu": ("--per-device-train-batch-size", cfg.per_device_train_batch_size),
              "gradient_accumulation_steps": ("--grad-accum", cfg.grad_accum),
              "gradient_clipping": ("--max-grad-norm", cfg.max_grad_norm)}
    for key, (flag, value) in wanted.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise ConfigError(f"{flag} {value} disagrees with \"{key}\": {ds[key]} in the DeepSpeed config; "
                              "set it to \"auto\" there or change the flag")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    total = cfg.per_device_train_batch_size * cfg.grad_accum * world
    if ds.get("train_batch_size", "auto") not in ("auto", total):
        raise ConfigError(f"\"train_batch_size\": {ds['train_batch_size']} in the DeepSpeed config disagrees with "
                          f"--per-device-train-batch-size x --grad-accum x processes = {total}")
    for name in ("bf16", "fp16"):
        ds.setdefault(name, {})["enabled"] = cfg.precision() == name


def group_timeout(accelerator: Accelerator) -> float | None:
    """Seconds the process group's collectives wait, as torch.distributed holds it (None: one process)."""
    if accelerator.num_processes == 1 or not torch.distributed.is_initialized():
        return None
    group = torch.distributed.distributed_c10d._get_default_group()
    try:
        return group._get_backend(accelerator.device).options._timeout.total_seconds()
    except (AttributeError, RuntimeError):  # torch internals: say nothing rather than fail the run
        return None


def stepping_optimizer(optimizer):
    """The optimizer that applies the update, under Accelerate's and DeepSpeed's wrappers."""
    while hasattr(getattr(optimizer, "optimizer", None), "param_groups"):
        optimizer = optimizer.optimizer
    return optimizer


def schedule_the_stepping_optimizer(scheduler, optimizer) -> None:
    """Point the learning-rate schedule at the optimizer that steps.

    The schedule was built on our AdamW; under ZeRO-Offload Accelerate swaps in a
    DeepSpeedCPUAdam made from the same param-group dicts, and its `load_state_dict` on resume
    replaces those dicts: the schedule would go on writing learning rates into the old ones,
    and training would keep the checkpoint's rate. LambdaLR reads `optimizer.param_groups`
    at every step, so pointing it at the stepping optimizer once follows any later load.
    """
    base = getattr(scheduler, "scheduler", scheduler)
    stepping = stepping_optimizer(optimizer)
    if base.optimizer is not stepping:
        base.optimizer = stepping


def zero_stage(accelerator: Accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return 0 if plugin is None else int(plugin.zero_stage)


def gather_list(accelerator: Accelerator, items: list) -> list:
    """Concatenate every process's Python list (in rank order); no collective for one process."""
    return gather_object(items) if accelerator.num_processes > 1 else list(items)


def sum_counts(accelerator: Accelerator, counts: dict[str, int]) -> Counter:
    """Per-reason counts summed over all processes."""
    total: Counter = Counter()
    for part in gather_list(accelerator, [dict(counts)]):
        total.update(part)
    return total


def agree(accelerator: Accelerator, *conditions) -> list[bool]:
    """Each condition OR-ed over all processes, in one collective: the loop's one host sync
    per optimizer step (NaN/inf guard and stop signal must be decided by every rank alike)."""
    flags = torch.stack([torch.as_tensor(c, device=accelerator.device).float().reshape(()) for c in conditions])
    return [v > 0 for v in accelerator.reduce(flags, reduction="sum").tolist()]


@contextmanager
def whole_model_init(accelerator: Accelerator) -> Iterator[None]:
    """Load and resize the model whole; ZeRO-3 partitions it later, in `prepare()`.

    Accelerate registers its DeepSpeed config with transformers whenever a DeepSpeed
    plugin exists, so under ZeRO-3 `from_pretrained` builds inside `deepspeed.zero.Init`.
    Whisper's weight init fails there in transformers 5.23 (it sizes its sinusoids from an
    already partitioned, empty tensor). The price: each process holds the full fp32 model
    in host RAM while loading (about 6 GB for large-v3).
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()
