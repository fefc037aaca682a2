#!/usr/bin/env python
"""Fine-tune Whisper on WebDataset shards, conditioned on a speaker-domain token.

    accelerate launch [--config_file accelerate_configs/...] train_loop.py \
        --dataset-root ROOT --base-model openai/whisper-large-v3 --run-name NAME

One optimizer step is --grad-accum micro-batches of: log-mel on the device -> forward ->
backward; then clip, AdamW, learning-rate schedule. Once in a while: log, evaluate (loss,
CER/WER per domain), save an atomic resumable checkpoint. At the end: RUN/final/.
Everything reusable lives in `wdx/`; this file is the algorithm, top to bottom.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import astuple
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from wdx import checkpoint
from wdx.accel import agree, build_accelerator, gather_list, sum_counts, whole_model_init, zero_stage
from wdx.collate import Collator, make_text_encoder
from wdx.config import ConfigError, TrainConfig, parse_args
from wdx.data import Position, ShardedSamples, make_loader
from wdx.debug import debug_step
from wdx.evaluation import batch_loss, evaluate, examples
from wdx.export import check_hub_credentials, push, write_final
from wdx.features import log_mel
from wdx.metrics import format_table
from wdx.model import ModelLoadError, Whisper, count_trainable, setup
from wdx.plan import plan_table
from wdx.shards import DatasetError, load_split
from wdx.tracking import MetricsLog, flatten_eval, setup_logging

log = logging.getLogger("train_loop")


# ----------------------------------------------------------------------------- builders

def build_data(cfg: TrainConfig, accelerator: Accelerator, whisper: Whisper):
    """Train and eval loaders; each rank and worker reads its own samples (never prepare()d)."""
    collate = Collator(whisper.tokenizer, cfg.language)
    encode = make_text_encoder(whisper.tokenizer, whisper.model.config.max_target_positions)
    common = dict(rank=accelerator.process_index, world_size=accelerator.num_processes, num_workers=cfg.num_workers,
                  seed=cfg.seed, target_sr=cfg.target_sr, default_domain=cfg.default_domain,
                  shuffle_block=cfg.shuffle_block, collate=collate, encode_text=encode)
    train = ShardedSamples(load_split(cfg.dataset_root, cfg.train_split, cfg.samples_per_shard), train=True,
                           batch_size=cfg.per_device_train_batch_size, **common)
    val = ShardedSamples(load_split(cfg.dataset_root, cfg.eval_split, cfg.samples_per_shard), train=False,
                         batch_size=cfg.per_device_eval_batch_size, **common)
    pin = accelerator.device.type == "cuda"
    return (train, make_loader(train, cfg.num_workers, cfg.persistent_workers, pin),
            val, make_loader(val, cfg.num_workers, cfg.persistent_workers, pin))


def build_optimizer(cfg: TrainConfig, groups: dict, device: torch.device) -> torch.optim.AdamW:
    """AdamW on trainable parameters only; the embedding (new rows only, via a gradient
    mask) gets no weight decay, which would otherwise move every frozen row."""
    decay = [p for name, ps in groups.items() if name != "domain_token_rows" for p in ps]
    param_groups = [{"params": decay, "weight_decay": cfg.weight_decay},
                    {"params": groups["domain_token_rows"], "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu", "xpu", "mps")
    return torch.optim.AdamW([g for g in param_groups if g["params"]], lr=cfg.learning_rate, fused=fused)


def describe_plan(cfg: TrainConfig, accelerator: Accelerator, whisper: Whisper, groups: dict,
                  train: ShardedSamples, steps_per_epoch: int, total_steps: int) -> str:
    counts = count_trainable(groups, whisper.new_token_rows)
    total = sum(p.numel() for p in whisper.model.parameters())
    world, accum, batch = accelerator.num_processes, cfg.grad_accum, cfg.per_device_train_batch_size
    lines = [
        "plan:",
        f"  model              {cfg.base_model}  ({total:,} parameters, {whisper.model.config.num_mel_bins} mel bins)",
        f"  trainable          {sum(counts.values()):,} ({100 * sum(counts.values()) / total:.2f} %)",
        *(f"    {name:<19}{n:,}" for name, n in counts.items()),
        f"  domain tokens      {whisper.domain_token_ids}",
        f"  processes          {world} x {max(1, cfg.num_workers)} loader workers, device {accelerator.device}, "
        f"precision {cfg.precision()}, distributed type {accelerator.distributed_type.value}"
        + (f", ZeRO-{zero_stage(accelerator)}" if zero_stage(accelerator) else ""),
        f"  effective batch    {batch} per process x {world} processes x {accum} accumulation"
        f" = {batch * world * accum}",
        f"  train samples      {train.split.total} ({train.samples_per_epoch()} per epoch)",
        f"  steps              {steps_per_epoch} per epoch, {total_steps} in total",
        f"  checkpoints        {checkpoint.checkpoints_dir(cfg.run_dir)} (every {cfg.save_steps} steps, "
        f"keep {cfg.save_total_limit} + best)",
        f"  final model        {Path(cfg.run_dir) / 'final'}",
    ]
    return "\n".join(lines)


def check_run_dir(cfg: TrainConfig) -> None:
    """Refuse to mix two runs in one directory unless told to."""
    run = Path(cfg.run_dir)
    held = checkpoint.complete_checkpoints(run) or (run / "final").exists()
    if held and not cfg.resume_from_checkpoint and not cfg.export:
        if not cfg.overwrite:
            raise ConfigError(f"--run-name {cfg.run_name}: {run} already holds a run; pass "
                              "--resume-from-checkpoint latest to continue it or --overwrite to start over")


def resume_state(cfg: TrainConfig, accelerator: Accelerator, fingerprint: dict) -> checkpoint.TrainState:
    """Load model/optimizer/scheduler/RNG from the checkpoint to resume, if any, and return
    the loop state (a fresh one when starting from step 0)."""
    fresh = checkpoint.TrainState(world_size=accelerator.num_processes, num_workers=cfg.num_workers)
    resume = resolve_resume(cfg)
    if resume is None:
        return fresh
    checkpoint.check_fingerprint(resume, fingerprint)
    accelerator.load_state(str(resume))
    state = checkpoint.TrainState.load(resume)
    log.info("resumed from %s: step %d, epoch %d, %d micro-batches into it", resume, state.step, state.epoch,
             state.micro_in_epoch)
    if (state.world_size, state.num_workers) != (fresh.world_size, fresh.num_workers):
        log.warning("checkpoint was written by %d processes x %d workers, now %d x %d: the data position cannot be "
                    "mapped; epoch %d restarts from its first sample", state.world_size, state.num_workers,
                    fresh.world_size, fresh.num_workers, state.epoch)
        state.positions, state.micro_in_epoch = [], 0
        state.world_size, state.num_workers = fresh.world_size, fresh.num_workers
    return state


def resolve_resume(cfg: TrainConfig) -> Path | None:
    if cfg.resume_from_checkpoint is None:
        return None
    if cfg.resume_from_checkpoint == "latest":
        found = checkpoint.latest(cfg.run_dir)
        if found is None:
            log.info("--resume-from-checkpoint latest: no checkpoint in %s yet; starting from step 0", cfg.run_dir)
        return found
    path = Path(cfg.resume_from_checkpoint)
    if not path.is_dir():
        raise ConfigError(f"--resume-from-checkpoint {path}: no such checkpoint directory")
    return path


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop saves at the next step boundary and exits 0."""

    def __init__(self) -> None:
        self.received: str | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name


# ----------------------------------------------------------------------------- training

def train(cfg: TrainConfig) -> int:
    accelerator = build_accelerator(cfg)
    setup_logging(accelerator.is_main_process)
    set_seed(cfg.seed)
    check_run_dir(cfg)
    if (cfg.login_hf or cfg.push_to_hub) and accelerator.is_main_process:
        log.info("Hugging Face account: %s", check_hub_credentials(verify=cfg.login_hf))
    if accelerator.is_main_process and cfg.overwrite and not cfg.resume_from_checkpoint:
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    config_json = cfg.to_json()
    log.info("config:\n%s", config_json)

    with whole_model_init(accelerator):
        whisper, groups = setup(cfg.base_model, language=cfg.language, encoder_layers=cfg.train_encoder_layers,
                                decoder_layers=cfg.train_decoder_layers, dropout=cfg.dropout,
                                max_new_tokens=cfg.generation_max_length)
    if cfg.gradient_checkpointing:
        whisper.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    train_ds, train_loader, eval_ds, eval_loader = build_data(cfg, accelerator, whisper)
    steps_per_epoch = len(train_ds) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(f"--grad-accum {cfg.grad_accum}: larger than the {len(train_ds)} micro-batches per epoch")
    total_steps = cfg.max_steps or steps_per_epoch * cfg.num_train_epochs
    optimizer = build_optimizer(cfg, groups, accelerator.device)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=total_steps)
    log.info(describe_plan(cfg, accelerator, whisper, groups, train_ds, steps_per_epoch, total_steps))
    if cfg.print_config:
        return 0

    fingerprint = checkpoint.fingerprint(whisper.model, whisper.tokenizer, cfg.base_model)
    model, optimizer, scheduler = accelerator.prepare(whisper.model, optimizer, scheduler)
    state = resume_state(cfg, accelerator, fingerprint)
    if cfg.export:
        checkpoint.check_fingerprint(cfg.export, fingerprint)
        accelerator.load_state(cfg.export)
        write_final(accelerator, model, whisper.tokenizer, whisper.feature_extractor, Path(cfg.run_dir) / "final",
                    config_json, None)
        return 0
    if cfg.detect_anomaly:
        torch.autograd.set_detect_anomaly(True)
    if cfg.debug_step:
        report = debug_step(accelerator, model, optimizer, train_loader, groups, cfg.debug_step,
                            whisper.model.config.num_mel_bins, cfg.learning_rate)
        if accelerator.is_main_process:
            print(report, flush=True)
        return 0
    if cfg.login_wandb:
        accelerator.init_trackers(cfg.wandb_project, config=vars(cfg),
                                  init_kwargs={"wandb": {"name": cfg.run_name, "dir": cfg.run_dir}})

    n_mels = whisper.model.config.num_mel_bins
    trainable = [p for ps in groups.values() for p in ps]
    metrics = MetricsLog(accelerator, Path(cfg.run_dir) / "metrics.jsonl")
    stop = StopSignal()
    keys_log = (open(Path(cfg.run_dir) / f"sample_keys.rank{accelerator.process_index}.jsonl", "a", buffering=1)
                if cfg.log_sample_keys else None)
    usable = steps_per_epoch * cfg.grad_accum  # micro-batches per epoch; a remainder < grad_accum is dropped
    positions = [Position()] * max(1, cfg.num_workers)
    skips = Counter(state.skips if accelerator.is_main_process else {})
    loss_sum, micro_since_log, samples_since_log = torch.zeros((), device=accelerator.device), 0, 0
    last_eval: dict | None = None
    lr = scheduler.get_last_lr()[0]
    t_log = time.perf_counter()
    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not accelerator.is_local_main_process)
    model.train()

    while state.step < total_steps and not stop.received:
        starts = state.starts_for(accelerator.process_index) if state.micro_in_epoch else None
        positions = starts or [Position()] * max(1, cfg.num_workers)
        train_ds.set_epoch(state.epoch, starts)
        for batch in itertools.islice(train_loader, usable - state.micro_in_epoch):
            positions[batch["worker"]] = batch["resume"]
            skips.update(batch["skips"])
            if keys_log is not None:
                keys_log.write(json.dumps({"epoch": state.epoch, "step": state.step + 1, "keys": batch["key"]}) + "\n")
            state.micro_in_epoch += 1
            samples_since_log += len(batch["key"])
            batch = {k: v.to(accelerator.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                     for k, v in batch.items()}

            # ---- forward + backward; the optimizer acts on every grad_accum-th micro-batch
            with accelerator.accumulate(model):
                features = log_mel(batch["audio"], n_mels)
                loss, _ = batch_loss(model, features, batch)
                accelerator.backward(loss)
                loss_sum += loss.detach().float()
                micro_since_log += 1
                if accelerator.sync_gradients:
                    grad_norm, lr, stopping = update(cfg, accelerator, optimizer, scheduler, trainable, loss, state,
                                                     stop.received is not None, lr)
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            bar.update()
            if state.nonfinite_in_a_row >= cfg.max_nonfinite:
                raise FloatingPointError(f"{state.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss "
                                         "or gradient; lower --learning-rate, use --bf16 instead of --fp16, or "
                                         "check the data (see --max-nonfinite)")
            if state.micro_in_epoch >= usable:
                run_skips = sum_counts(accelerator, skips)
                log.info("epoch %d done; samples skipped so far: %s", state.epoch, dict(run_skips) or "none")
                metrics.write(state.step, {"data/epochs_done": state.epoch + 1,
                                           **{f"data/skipped/{k}": v for k, v in run_skips.items()}})
                state.epoch, state.micro_in_epoch = state.epoch + 1, 0
                positions = [Position()] * max(1, cfg.num_workers)

            # ---- once in a while: log
            if state.step % cfg.logging_steps == 0 or state.step == total_steps:
                mean_loss = accelerator.reduce(loss_sum / max(micro_since_log, 1), reduction="mean").item()
                elapsed = time.perf_counter() - t_log
                record = {"train/loss": mean_loss, "train/lr": lr,
                          "train/grad_norm": grad_norm.item(),
                          "train/samples_per_s": samples_since_log * accelerator.num_processes / elapsed,
                          "train/epoch": state.epoch + state.micro_in_epoch / usable}
                metrics.write(state.step, record)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{record['train/lr']:.2e}",
                                sps=f"{record['train/samples_per_s']:.1f}")
                loss_sum.zero_()
                micro_since_log, samples_since_log, t_log = 0, 0, time.perf_counter()

            # ---- once in a while: evaluate
            if state.step % cfg.eval_steps == 0 or state.step == total_steps:
                last_eval = run_eval(cfg, accelerator, model, eval_loader, whisper, metrics, state.step)

            # ---- once in a while: checkpoint (and on a stop signal)
            if state.step % cfg.save_steps == 0 or state.step == total_steps or stopping:
                save_checkpoint(cfg, accelerator, state, positions, skips, last_eval,
                                {checkpoint.CONFIG_FILE: config_json,
                                 checkpoint.FINGERPRINT_FILE: json.dumps(fingerprint, indent=1)})
            if stopping:
                stop.received = stop.received or "a signal on another process"
                break
            if state.step >= total_steps:
                break

    bar.close()
    if stop.received:
        log.info("stopped by %s at step %d; checkpoint saved; resume with --resume-from-checkpoint latest",
                 stop.received, state.step)
        accelerator.end_training()
        return 0
    log.info("samples skipped over the run: %s", dict(sum_counts(accelerator, skips)) or "none")
    final = write_final(accelerator, model, whisper.tokenizer, whisper.feature_extractor,
                        Path(cfg.run_dir) / "final", config_json, last_eval["results"] if last_eval else None)
    log.info("final model: %s", final)
    if cfg.push_to_hub and accelerator.is_main_process:
        log.info("pushed to %s", push(final, cfg.hub_model_id, cfg.hub_private))
    accelerator.end_training()
    return 0


def update(cfg: TrainConfig, accelerator: Accelerator, optimizer, scheduler, trainable: list, loss: torch.Tensor,
           state: checkpoint.TrainState, stop_requested: bool, lr: float) -> tuple[torch.Tensor, float, bool]:
    """Clip, then step optimizer and schedule unless the loss or gradient is not finite.

    Returns (grad norm, the learning rate this update used, whether any process was asked
    to stop). The NaN/inf verdict and the stop request are agreed by all processes in one
    collective: the loop's only host sync per optimizer step.
    """
    grad_norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm or math.inf)
    grad_norm = torch.as_tensor(math.nan if grad_norm is None else grad_norm).float()
    # fp16's grad scaler skips inf gradients itself (expected while it calibrates); under
    # DeepSpeed the engine has already stepped inside backward (wdx/accel.py)
    check_grad = cfg.precision() != "fp16" and zero_stage(accelerator) == 0
    nonfinite_loss, nonfinite_grad, stopping = agree(
        accelerator, ~torch.isfinite(loss.detach()), check_grad and ~torch.isfinite(grad_norm), stop_requested)
    if nonfinite_loss or nonfinite_grad:
        state.nonfinite_in_a_row += 1
        log.warning("step %d: non-finite %s; update skipped (%d in a row)", state.step + 1,
                    "loss" if nonfinite_loss else "gradient", state.nonfinite_in_a_row)
    else:
        state.nonfinite_in_a_row = 0
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr, stopping


def run_eval(cfg: TrainConfig, accelerator: Accelerator, model, loader, whisper: Whisper, metrics: MetricsLog,
             step: int) -> dict:
    max_batches = None
    if cfg.max_eval_samples:
        max_batches = math.ceil(cfg.max_eval_samples / (cfg.per_device_eval_batch_size * accelerator.num_processes))
    pad_to = None
    if zero_stage(accelerator) == 3:  # every process must run as many forwards as the busiest one
        mine = min(len(loader.dataset), max_batches or len(loader.dataset))
        pad_to = int(accelerator.gather(torch.tensor([mine], device=accelerator.device)).max())
    out = evaluate(accelerator, model, loader, whisper.tokenizer, n_mels=whisper.model.config.num_mel_bins,
                   max_new_tokens=cfg.generation_max_length, max_batches=max_batches, pad_to=pad_to)
    out["step"] = step
    metrics.write(step, {"eval/loss": out["loss"], **flatten_eval("eval", out["results"])})
    log.info("eval at step %d: loss %.4f\n%s", step, out["loss"], format_table(out["results"]))
    for ex in examples(out["rows"], cfg.num_examples):
        log.info("  [%s] %s\n      ref: %s\n      hyp: %s", ex["domain"], ex["key"], ex["ref"], ex["hyp"])
    if out["skips"]:
        log.info("eval samples skipped: %s", out["skips"])
    return out


def save_checkpoint(cfg: TrainConfig, accelerator: Accelerator, state: checkpoint.TrainState,
                    positions: list[Position], skips: Counter, last_eval: dict | None, files: dict[str, str]) -> None:
    """Record the data position and best CER in the state, write atomically, rotate."""
    mine = [list(astuple(p)) for p in positions]
    state.positions = gather_list(accelerator, [mine])
    state.skips = dict(sum_counts(accelerator, skips))
    if last_eval is not None and last_eval["step"] == state.step:
        cer = last_eval["results"]["all"]["cer"]
        if math.isfinite(cer) and (state.best_cer is None or cer < state.best_cer):
            state.best_cer, state.best_step = cer, state.step
    path = checkpoint.save(accelerator, cfg.run_dir, state.step, {**files, checkpoint.STATE_FILE: state.to_json()})
    if accelerator.is_main_process:
        removed = checkpoint.rotate(cfg.run_dir, cfg.save_total_limit, state.best_step)
        log.info("saved %s%s", path, f"; removed {', '.join(p.name for p in removed)}" if removed else "")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        if cfg.plan:  # before any Accelerator: no device, no weights
            print(plan_table(cfg.base_model, cfg.train_encoder_layers, cfg.train_decoder_layers,
                             cfg.per_device_train_batch_size, int(os.environ.get("WORLD_SIZE", "1"))))
            return 0
        return train(cfg)
    except (ConfigError, DatasetError, ModelLoadError, checkpoint.CheckpointError) as exc:
        print(f"train_loop.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
