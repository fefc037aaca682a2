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

from wdx.config import ConfigError, TrainConfig, parse_args
from wdx.data.collate import IGNORE
from wdx.data.pipeline import Position, ShardedSamples, check_domain_skips
from wdx.data.shards import DatasetError
from wdx.model.whisper import ModelLoadError, Whisper
from wdx.scoring.forward import model_input, token_loss_sum
from wdx.scoring.metrics import format_table
from wdx.train import checkpoint, encoder_cache, faults, rundir
from wdx.train.accel import (
    agree,
    build_accelerator,
    gather_list,
    schedule_the_stepping_optimizer,
    sum_counts,
    zero_stage,
)
from wdx.train.evaluation import evaluate, examples
from wdx.train.export import push, write_final
from wdx.train.plan import plan_table, processes
from wdx.train.setup import (
    COMPUTE_DTYPE,
    build_data,
    build_model,
    build_optimizer,
    data_layout,
    describe_plan,
    export,
    load_resume,
    prepare_run_dir,
    resolve_convention,
    resume_point,
    run_debug_step,
)
from wdx.train.signals import StopSignal
from wdx.train.tracking import MetricsLog, drop_after, flatten_eval, setup_logging

log = logging.getLogger("train_loop")


# ----------------------------------------------------------------------------- one step

def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class StepBatches:
    """The --grad-accum micro-batches of each optimizer step, epoch after epoch.

    Keeps the loop state's epoch and micro-batch count, each loader worker's resume position
    and the skip counts current. An epoch's last step takes the micro-batches left (fewer than
    --grad-accum when it does not divide the epoch), as Accelerate's sync_with_dataloader
    does: no sample sits out.
    """

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, dataset: ShardedSamples, loader,
                 state: checkpoint.TrainState, metrics: MetricsLog) -> None:
        self.cfg, self.accelerator, self.dataset, self.loader, self.state, self.metrics = (
            cfg, accelerator, dataset, loader, state, metrics)
        self.per_epoch = len(dataset)  # micro-batches
        starts = state.starts_for(accelerator.process_index) if state.micro_in_epoch else None
        self.positions = starts or self._fresh()
        self.left = 0  # micro-batches still to read in this epoch
        self.skips = Counter(state.skips if accelerator.is_main_process else {})
        self.epoch_skips: Counter = Counter()  # this process's, since the epoch (or the resume) began
        self.batches = None
        self.keys_log = None
        if cfg.log_sample_keys:
            path = Path(cfg.run_dir) / f"sample_keys.rank{accelerator.process_index}.jsonl"
            drop_after(path, state.step)  # keys logged after the checkpoint are trained (and logged) again
            self.keys_log = open(path, "a", buffering=1)

    def _fresh(self) -> list[Position]:
        return [Position()] * max(1, self.cfg.num_workers)

    def next(self) -> list[dict]:
        state = self.state
        while self.batches is None:  # start (or resume into) an epoch
            self.left = self.per_epoch - state.micro_in_epoch
            if self.left <= 0:  # a checkpoint written at an epoch's very end by an older version
                self._end_epoch()
                continue
            self.dataset.set_epoch(state.epoch, self.positions if state.micro_in_epoch else None)
            self.batches = itertools.islice(self.loader, self.left)
        group = [next(self.batches) for _ in range(min(self.cfg.grad_accum, self.left))]
        for batch in group:
            self.positions[batch["worker"]] = batch["resume"]
            self.skips.update(batch["skips"])
            self.epoch_skips.update(batch["skips"])
            if self.keys_log is not None:
                self.keys_log.write(json.dumps({"epoch": state.epoch, "step": state.step + 1,
                                                "keys": batch["key"]}) + "\n")
        state.micro_in_epoch += len(group)
        self.left -= len(group)
        if self.left == 0:
            self._end_epoch()
        return group

    def _end_epoch(self) -> None:
        check_domain_skips(self.cfg.train_split, sum_counts(self.accelerator, self.epoch_skips),
                           self.dataset.samples_per_epoch())
        self.epoch_skips = Counter()
        run_skips = sum_counts(self.accelerator, self.skips)
        log.info("epoch %d done; samples skipped so far: %s", self.state.epoch, dict(run_skips) or "none")
        self.metrics.write(self.state.step + 1, {"data/epochs_done": self.state.epoch + 1,
                                                 **{f"data/skipped/{k}": v for k, v in run_skips.items()}})
        self.state.epoch, self.state.micro_in_epoch = self.state.epoch + 1, 0
        self.positions, self.batches = self._fresh(), None


def forward_backward(accelerator: Accelerator, model, micro_batches: list[dict], n_mels: int,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over one optimizer step's micro-batches; returns this process's
    (sum of token losses, label tokens), on the device.

    The step's loss is the sum of token losses over all its micro-batches and processes
    divided by the step's label tokens (transformers' `num_items_in_batch` fix): a mean of
    per-batch means would weigh three short transcripts like eight long ones. Accelerate
    (or DeepSpeed) divides each backward by grad_accum and DDP/ZeRO average over processes;
    scaling by grad_accum * processes / tokens turns that into exactly the token mean, for
    an epoch's shorter last step too. The token count is all-reduced on the device: a
    collective, not a host sync.
    """
    accum = accelerator.gradient_accumulation_steps
    tokens = sum((b["labels"] != IGNORE).sum() for b in micro_batches).to(accelerator.device)
    scale = accum * accelerator.num_processes / accelerator.reduce(tokens, reduction="sum")
    # Accelerate syncs (and steps the optimizer, or DeepSpeed's engine) when its micro-step counter
    # reaches a multiple of grad_accum: start it so that this step's last micro-batch is the one
    accelerator.step = accum - len(micro_batches)
    loss_sum = torch.zeros((), device=accelerator.device)
    for batch in micro_batches:
        batch = to_device(batch, accelerator.device)
        with accelerator.accumulate(model):
            inputs = model_input(batch, n_mels, dtype)  # log-mel (fp32 maths) or cached states, in the model's dtype
            loss = token_loss_sum(model, inputs, batch)
            accelerator.backward(loss * scale)
        loss_sum += loss.detach().float()
    return loss_sum, tokens


def update(cfg: TrainConfig, accelerator: Accelerator, model, optimizer, scheduler, trainable: list,
           step_loss: torch.Tensor, state: checkpoint.TrainState, stop_requested: bool) -> tuple[torch.Tensor, bool]:
    """Clip, step the optimizer unless the step's loss or gradient is not finite, advance the
    schedule only if the weights really moved. Returns (grad norm, whether to stop).

    The non-finite verdict and the stop request are agreed by all processes in one
    collective: the loop's only host sync per optimizer step. Under fp16 the grad scaler
    was told about the gradients by `unscale_` (inside clip_grad_norm_); a skipped step
    still calls `scaler.update()`, which backs the scale off and closes the step, so the
    next `unscale_` does not raise. Under DeepSpeed the engine has already stepped inside
    backward: the loop can only read whether it applied the update.
    """
    grad_norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm or math.inf)
    grad_norm = torch.as_tensor(math.nan if grad_norm is None else grad_norm, device=accelerator.device).float()
    deepspeed = zero_stage(accelerator) > 0
    nonfinite_loss, nonfinite_grad, stopping = agree(
        accelerator, ~torch.isfinite(step_loss), not deepspeed and ~torch.isfinite(grad_norm), stop_requested)
    if deepspeed:
        applied = model.was_step_applied()
    elif nonfinite_loss or nonfinite_grad:
        applied = False
        if accelerator.scaler is not None:
            accelerator.scaler.update()
    else:
        optimizer.step()  # finite gradients: the fp16 scaler has nothing to skip
        applied = True
    if applied:
        scheduler.step()
    if nonfinite_loss or nonfinite_grad or not applied:
        state.nonfinite_in_a_row += 1
        what = "loss" if nonfinite_loss else "gradient" if nonfinite_grad else "gradient (DeepSpeed's loss scaler)"
        log.warning("step %d: non-finite %s; update %s (%d in a row)", state.step + 1, what,
                    "applied by the DeepSpeed engine all the same" if applied else "skipped",
                    state.nonfinite_in_a_row)
    else:
        state.nonfinite_in_a_row = 0
    optimizer.zero_grad(set_to_none=True)
    if state.nonfinite_in_a_row >= cfg.max_nonfinite:
        raise FloatingPointError(f"{state.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or "
                                 "gradient; lower --learning-rate, use --bf16 instead of --fp16, or check the data "
                                 "(see --max-nonfinite)")
    return grad_norm, stopping


class TrainMeter:
    """Token-weighted train loss and throughput since the last log, kept on the device."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(2, device=device)  # token losses, tokens
        self.samples, self.t0 = 0, time.perf_counter()

    def add(self, loss_sum: torch.Tensor, tokens: torch.Tensor, micro_batches: list[dict]) -> None:
        self.sums += torch.stack([loss_sum, tokens.float()])
        self.samples += sum(len(b["key"]) for b in micro_batches)

    def record(self, accelerator: Accelerator, grad_norm: torch.Tensor, lr: float, epoch: float) -> dict:
        loss, tokens = accelerator.reduce(self.sums, reduction="sum").tolist()
        record = {"train/loss": loss / max(tokens, 1), "train/lr": lr, "train/grad_norm": grad_norm.item(),
                  "train/samples_per_s": self.samples * accelerator.num_processes / (time.perf_counter() - self.t0),
                  "train/epoch": epoch}
        if accelerator.device.type == "cuda":
            record["train/peak_mem_gib"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
        self.sums.zero_()
        self.samples, self.t0 = 0, time.perf_counter()
        return record


# ----------------------------------------------------------------------------- training

def train(cfg: TrainConfig) -> int:
    accelerator = build_accelerator(cfg)
    setup_logging(accelerator.is_main_process)
    set_seed(cfg.seed)
    resolve_convention(cfg)
    config_json = prepare_run_dir(cfg, accelerator)
    whisper, groups = build_model(cfg, accelerator)
    train_ds, train_loader, eval_ds, eval_loader = build_data(cfg, accelerator, whisper)
    resume, state = resume_point(cfg, accelerator, data_layout(cfg, accelerator, train_ds))
    steps_per_epoch, total_steps = count_steps(cfg, len(train_ds), state)
    if cfg.warmup_steps >= total_steps:
        log.warning("--warmup-steps %d: the run has %d optimizer steps; the learning rate never reaches "
                    "--learning-rate %g", cfg.warmup_steps, total_steps, cfg.learning_rate)
    optimizer = build_optimizer(cfg, groups, accelerator.device)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=total_steps)
    log.info(describe_plan(cfg, accelerator, whisper, groups, train_ds, steps_per_epoch, total_steps))
    if cfg.print_config:
        return 0

    fingerprint = checkpoint.fingerprint(whisper, cfg.base_model, cfg.train_encoder_layers,
                                         cfg.train_decoder_layers)
    model, optimizer, scheduler = accelerator.prepare(whisper.model, optimizer, scheduler)
    schedule_the_stepping_optimizer(scheduler, optimizer)
    dtype = accelerator.unwrap_model(model).dtype  # bf16/fp16 when DeepSpeed cast the module
    if zero_stage(accelerator):  # what the engine really does with gradients (ds_configs/ asks for fp32)
        log.info("DeepSpeed ZeRO-%d: module in %s; gradients accumulated in %s, reduced in %s", zero_stage(accelerator),
                 dtype, getattr(model.optimizer, "gradient_accumulation_dtype", "?"), model.communication_data_type)
    n_mels = whisper.model.config.num_mel_bins
    if resume is not None:
        load_resume(cfg, accelerator, scheduler, fingerprint, resume, state)
    if cfg.export:
        return export(cfg, accelerator, model, whisper, fingerprint, config_json)
    cache_stats = {}
    if cfg.encoder_cache:  # the frozen encoder prefix's output, once per clip (built here on first use)
        splits, reader, cache_stats = encoder_cache.ensure(cfg, accelerator, accelerator.unwrap_model(model),
                                                           [train_ds.split, eval_ds.split],
                                                           COMPUTE_DTYPE[cfg.precision()])
        train_ds, train_loader, eval_ds, eval_loader = build_data(cfg, accelerator, whisper, splits, reader)
    if cfg.debug_step:
        return run_debug_step(cfg, accelerator, model, optimizer, train_loader, groups, n_mels, dtype)
    if cfg.login_wandb:
        accelerator.init_trackers(cfg.wandb_project, config=vars(cfg),
                                  init_kwargs={"wandb": {"name": cfg.run_name, "dir": cfg.run_dir}})

    trainable = [p for ps in groups.values() for p in ps]
    metrics = MetricsLog(accelerator, Path(cfg.run_dir) / "metrics.jsonl", state.step)
    if cache_stats:
        metrics.write(state.step, cache_stats)
    batches = StepBatches(cfg, accelerator, train_ds, train_loader, state, metrics)
    meter, stop, last_eval = TrainMeter(accelerator.device), StopSignal(), None
    # a checkpoint saved by an early stop resumes into the same verdict (unless --early-stopping-patience grew)
    early_stopped = 0 < cfg.early_stopping_patience <= state.evals_without_improvement
    if early_stopped:
        log.info("step %d: the run stopped early there (%d evaluations without improving); nothing more to train",
                 state.step, state.evals_without_improvement)
    files = {checkpoint.CONFIG_FILE: config_json, checkpoint.FINGERPRINT_FILE: json.dumps(fingerprint, indent=1)}
    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not accelerator.is_local_main_process)
    model.train()

    try:  # the bar is closed on every way out, so an error line starts on a line of its own
        while state.step < total_steps and not early_stopped:
            # ---- forward + backward over the step's micro-batches, then one update
            micro_batches = batches.next()
            lr = scheduler.get_last_lr()[0]
            loss_sum, tokens = forward_backward(accelerator, model, micro_batches, n_mels, dtype)
            grad_norm, stopping = update(cfg, accelerator, model, optimizer, scheduler, trainable, loss_sum, state,
                                         stop.received is not None)
            state.step += 1
            meter.add(loss_sum, tokens, micro_batches)
            bar.update()
            last = state.step == total_steps

            # ---- once in a while: log
            if state.step % cfg.logging_steps == 0 or last:
                epoch = state.epoch + state.micro_in_epoch / batches.per_epoch
                record = meter.record(accelerator, grad_norm, lr, epoch)
                metrics.write(state.step, record)
                bar.set_postfix(loss=f"{record['train/loss']:.4f}", lr=f"{lr:.2e}",
                                sps=f"{record['train/samples_per_s']:.1f}")

            # ---- once in a while: evaluate, checkpoint (and checkpoint on a stop request)
            evaluated = state.step % cfg.eval_steps == 0 or last
            saved = state.step % cfg.save_steps == 0 or last or stopping
            if evaluated:
                last_eval = run_eval(cfg, accelerator, model, eval_loader, whisper, metrics, state.step)
                improved, patience_spent = judge(cfg, state, last_eval, saved)
                saved = saved or improved  # with early stopping, every new best is saved
                if patience_spent and not last:
                    log.info("early stopping at step %d: %d evaluations without %s improving by more than %g on "
                             "%.4f (step %d)", state.step, state.evals_without_improvement, cfg.metric_for_best_model,
                             cfg.early_stopping_threshold, state.best_metric, state.best_step)
                    stopping = early_stopped = saved = True
            if saved:
                save_checkpoint(cfg, accelerator, state, batches, files)
            # a signal that arrived during this eval or save is agreed on before anyone leaves
            if (evaluated or saved) and not stopping and agree(accelerator, stop.received is not None)[0]:
                stopping = True
                if not saved:
                    save_checkpoint(cfg, accelerator, state, batches, files)
            if stopping:
                if not early_stopped:
                    stop.received = stop.received or "a signal on another process"
                break
    finally:
        bar.close()

    if stop.received:
        log.info("stopped by %s at step %d; checkpoint saved; resume with --resume-from-checkpoint latest",
                 stop.received, state.step)
    else:
        log.info("samples skipped over the run: %s", dict(sum_counts(accelerator, batches.skips)) or "none")
        finish(cfg, accelerator, model, whisper, config_json, last_eval, state)
    accelerator.end_training()
    return 0


def count_steps(cfg: TrainConfig, micro_per_epoch: int, state: checkpoint.TrainState) -> tuple[int, int]:
    """(optimizer steps per epoch, steps of the whole run, those done included).

    A step is --grad-accum micro-batches, except an epoch's last, which takes the rest, so
    every sample of every epoch trains once. An epoch run counts the steps still to take
    from the data position (epoch, micro-batches into it), not from the steps done: a resume
    with another --grad-accum regroups what is left and still ends where the unbroken run does.
    """
    if cfg.grad_accum > micro_per_epoch:
        raise ConfigError(f"--grad-accum {cfg.grad_accum}: larger than the {micro_per_epoch} micro-batches per epoch")
    per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    if cfg.max_steps:
        return per_epoch, cfg.max_steps
    if state.epoch >= cfg.num_train_epochs:
        return per_epoch, state.step
    in_epoch = math.ceil((micro_per_epoch - state.micro_in_epoch) / cfg.grad_accum)
    return per_epoch, state.step + in_epoch + (cfg.num_train_epochs - state.epoch - 1) * per_epoch


def finish(cfg: TrainConfig, accelerator: Accelerator, model, whisper: Whisper, config_json: str,
           last_eval: dict | None, state: checkpoint.TrainState) -> None:
    """final/ (full weights, tokenizer, feature extractor, model card), then the Hub upload if asked.
    With early stopping, final/ holds the best checkpoint's weights, not the last step's."""
    best = None
    if cfg.early_stopping_patience and state.best_step is not None and state.best_step != state.step:
        checkpoint.load(accelerator, checkpoint.step_dir(cfg.run_dir, state.best_step))
        best = {"step": state.best_step, "metric": cfg.metric_for_best_model, "value": state.best_metric}
        log.info("final/ gets the weights of step %d, the best by eval %s (%.4f), not of step %d", state.best_step,
                 cfg.metric_for_best_model, state.best_metric, state.step)
    final = write_final(accelerator, model, whisper.tokenizer, whisper.feature_extractor,
                        Path(cfg.run_dir) / "final", config_json,
                        state.best_results if best else last_eval["results"] if last_eval else None, best)
    log.info("final model: %s", final)
    if cfg.push_to_hub and accelerator.is_main_process:
        log.info("pushed to %s", push(final, cfg.hub_model_id, cfg.hub_private))


def run_eval(cfg: TrainConfig, accelerator: Accelerator, model, loader, whisper: Whisper, metrics: MetricsLog,
             step: int) -> dict:
    faults.reached("eval", step, accelerator.process_index)
    t0 = time.perf_counter()
    max_batches = None
    if cfg.max_eval_samples:
        max_batches = math.ceil(cfg.max_eval_samples / (cfg.per_device_eval_batch_size * accelerator.num_processes))
    pad_to = None
    if zero_stage(accelerator) == 3:  # every process must run as many forwards as the busiest one
        mine = min(len(loader.dataset), max_batches or len(loader.dataset))
        pad_to = int(accelerator.gather(torch.tensor([mine], device=accelerator.device)).max())
    out = evaluate(accelerator, model, loader, whisper.tokenizer, n_mels=whisper.model.config.num_mel_bins,
                   max_new_tokens=cfg.generation_max_length, max_batches=max_batches, pad_to=pad_to,
                   compare_domains=cfg.compare_domains)
    check_domain_skips(cfg.eval_split, out["skips"], len(out["rows"]) + sum(out["skips"].values()))
    if not out["rows"]:
        raise DatasetError(f"{cfg.eval_split}: no usable sample to evaluate (skipped: {out['skips'] or 'none'})")
    out["step"], seconds = step, time.perf_counter() - t0
    prompts = {f"eval/prompt/{true}/{k}": v for true, r in out.get("prompts", {}).items() for k, v in r.items()}
    metrics.write(step, {"eval/loss": out["loss"], **flatten_eval("eval", out["results"]), **prompts,
                         "eval/seconds": seconds, "eval/samples_per_s": len(out["rows"]) / seconds})
    log.info("eval at step %d: loss %.4f (%d samples, %.1f s)\n%s", step, out["loss"], len(out["rows"]), seconds,
             format_table(out["results"]))
    for true, r in out.get("prompts", {}).items():
        log.info("  %-9s clips: CER %s; the token changed %d of %d transcripts", true,
                 ", ".join(f"with <|domain:{p}|> {r[f'prompt_{p}']:.4f}" for p in out["prompts"]), r["changed"],
                 r["n"])
    for ex in examples(out["rows"], cfg.num_examples):
        log.info("  [%s] %s\n      ref: %s\n      hyp: %s", ex["domain"], ex["key"], ex["ref"], ex["hyp"])
    if out["skips"]:
        log.info("eval samples skipped: %s", out["skips"])
    return out


def judge(cfg: TrainConfig, state: checkpoint.TrainState, evaluation: dict, saved: bool) -> tuple[bool, bool]:
    """Track the best evaluation by --metric-for-best-model (lower is better); returns
    (a new best to save, --early-stopping-patience spent).

    As in transformers' EarlyStoppingCallback, any improvement makes a new best, and only
    --early-stopping-threshold decides whether it also resets the patience: the threshold
    must never keep a better model out of final/. Without early stopping only evaluations
    at a checkpoint's step can be the best (the best checkpoint is kept out of rotation);
    with it every new best is saved, so that final/ can hold the best weights. A CER or WER
    that is not a number (every reference empty once normalised) says nothing about the
    model: neither a best nor a spent patience. A loss that is not finite says the model
    diverged: never a best, and an evaluation without improvement.
    """
    early = cfg.early_stopping_patience > 0
    if not (saved or early):
        return False, False
    value = {"cer": evaluation["results"]["all"]["cer"], "wer": evaluation["results"]["all"]["wer"],
             "loss": evaluation["loss"]}[cfg.metric_for_best_model]
    diverged = not math.isfinite(evaluation["loss"])
    if not math.isfinite(value) and not diverged:
        log.warning("step %d: eval %s is %s; not judged (best and early-stopping patience unchanged)", state.step,
                    cfg.metric_for_best_model, value)
        return False, False
    previous = state.best_metric
    improved = not diverged and (previous is None or value < previous)
    if improved:
        state.best_metric, state.best_step, state.best_results = value, state.step, evaluation["results"]
    if early:
        significant = improved and (previous is None or value < previous - cfg.early_stopping_threshold)
        state.evals_without_improvement = 0 if significant else state.evals_without_improvement + 1
    return improved and early, early and state.evals_without_improvement >= cfg.early_stopping_patience


def save_checkpoint(cfg: TrainConfig, accelerator: Accelerator, state: checkpoint.TrainState,
                    batches: StepBatches, files: dict[str, str]) -> None:
    """Record the data position in the state, write atomically, rotate (keeping the best)."""
    faults.reached("save", state.step, accelerator.process_index)
    mine = [list(astuple(p)) for p in batches.positions]
    state.positions = gather_list(accelerator, [mine])
    state.skips = dict(sum_counts(accelerator, batches.skips))
    path = checkpoint.save(accelerator, cfg.run_dir, state.step, {**files, checkpoint.STATE_FILE: state.to_json()})
    if accelerator.is_main_process:
        removed = checkpoint.rotate(cfg.run_dir, cfg.save_total_limit, state.best_step)
        log.info("saved %s%s", path, f"; removed {', '.join(p.name for p in removed)}" if removed else "")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        if cfg.plan:  # before any Accelerator: no device, no weights
            print(f"precision {cfg.precision()} ({cfg.precision_source})")
            print(plan_table(cfg.base_model, cfg.train_encoder_layers, cfg.train_decoder_layers,
                             cfg.per_device_train_batch_size, cfg.plan_tokens, cfg.precision(), processes(),
                             cfg.gradient_checkpointing))
            return 0
        return train(cfg)
    except (ConfigError, DatasetError, ModelLoadError, checkpoint.CheckpointError, rundir.RunDirError) as exc:
        print(f"train_loop.py: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if cfg.run_name is not None:
            rundir.release(cfg.run_dir)


if __name__ == "__main__":
    sys.exit(main())
