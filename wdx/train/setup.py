"""What the loop does once, before its first step: data, model, optimizer, run directory,
resume point, and the plan it logs. train_loop.py calls these in order; the loop itself
(steps, evaluation, checkpoints) stays there.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import Accelerator

from wdx.config import ConfigError, TrainConfig
from wdx.data import augment
from wdx.data.collate import Collator, make_text_encoder, max_text_tokens
from wdx.data.conventions import PLAIN, kspon_warning, looks_kspon
from wdx.data.pipeline import ShardedSamples, first_transcripts, make_loader
from wdx.data.shards import Split, load_split, split_convention
from wdx.model.domains import trained_domains
from wdx.model.whisper import Whisper, cast_frozen, count_trainable, frozen_sha256, setup
from wdx.train import checkpoint, rundir
from wdx.train.accel import agree, group_timeout, whole_model_init, zero_stage
from wdx.train.debug import debug_step
from wdx.train.export import check_hub_credentials, write_final

log = logging.getLogger("train_loop")  # the loop's own lines, under one name wherever they are written
KSPON_LOOK_SAMPLES = 200  # transcripts read at start-up to warn of Kspon markup read as plain text
COMPUTE_DTYPE = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # by --mixed-precision


def build_data(cfg: TrainConfig, accelerator: Accelerator, whisper: Whisper, splits: list[Split] | None = None,
               read_sample=None):
    """Train and eval loaders; each rank and worker reads its own samples (never prepare()d).
    `splits` and `read_sample`: the encoder cache's shards and reader, instead of the audio's."""
    # the model's domains: --domains plus those a --base-model final/ brought (train and score all, as wdx.evaluate)
    domains = trained_domains(whisper.model.config, cfg.domain_names)
    collate = Collator(whisper.tokenizer, cfg.language, cfg.domain_conditioning, domains)
    encode = make_text_encoder(whisper.tokenizer, whisper.model.config.max_target_positions)
    common = dict(rank=accelerator.process_index, world_size=accelerator.num_processes, num_workers=cfg.num_workers,
                  seed=cfg.seed, target_sr=cfg.target_sr, default_domain=cfg.default_domain, convention=cfg.convention,
                  domains=domains,
                  shuffle_block=cfg.shuffle_block, open_shards=cfg.open_shards, collate=collate, encode_text=encode,
                  read_sample=read_sample)
    train_split, eval_split = splits or [load_split(cfg.dataset_root, name, cfg.samples_per_shard, domains,
                                                                     cfg.convention)
                                         for name in (cfg.train_split, cfg.eval_split)]
    try:
        augmenter = None if read_sample else augment.build(cfg, whisper.model.config)
    except (OSError, ValueError) as exc:  # an unreadable --noise-dir: one line, as every flag
        raise ConfigError(str(exc)) from None
    train = ShardedSamples(train_split, train=True, batch_size=cfg.per_device_train_batch_size, augment=augmenter,
                           **common)
    val = ShardedSamples(eval_split, train=False, batch_size=cfg.per_device_eval_batch_size, **common)
    pin = accelerator.device.type == "cuda"
    return (train, make_loader(train, cfg.num_workers, cfg.persistent_workers, pin),
            val, make_loader(val, cfg.num_workers, cfg.persistent_workers, pin))


def prepare_run_dir(cfg: TrainConfig, accelerator: Accelerator) -> str:
    """Take the run directory (refusing one in use or holding another run, clearing it on
    --overwrite), check Hub credentials, log the config; returns the config as JSON."""
    problem = None
    if accelerator.is_main_process:
        try:
            rundir.check_output_dir(cfg.output_dir)
            rundir.acquire(cfg.run_dir, cfg.run_name)
        except (rundir.RunDirError, OSError) as exc:
            problem = str(exc)
    if agree(accelerator, problem is not None)[0]:  # every process leaves with the same one line
        raise rundir.RunDirError(problem or f"--run-name {cfg.run_name}: refused on the main process")
    check_run_dir(cfg)
    if (cfg.login_hf or cfg.push_to_hub) and accelerator.is_main_process:
        log.info("Hugging Face account: %s", check_hub_credentials(verify=cfg.login_hf))
    # --export writes final/ only: the checkpoint it exports usually lives in this very directory
    if cfg.overwrite and not (cfg.resume_from_checkpoint or cfg.export):
        problem = None
        if accelerator.is_main_process:
            try:
                rundir.clear(cfg.run_dir, {"--base-model": cfg.base_model, "--dataset-root": cfg.dataset_root,
                                           "--encoder-cache": cfg.encoder_cache, "--noise-dir": cfg.noise_dir})
            except rundir.RunDirError as exc:
                problem = str(exc)
        if agree(accelerator, problem is not None)[0]:
            raise rundir.RunDirError(problem or "--overwrite: refused on the main process")
    accelerator.wait_for_everyone()
    config_json = cfg.to_json()
    log.info("config:\n%s", config_json)
    return config_json


def resolve_convention(cfg: TrainConfig) -> None:
    """Without --text-convention, read the transcripts as the train split's metadata.json says
    wdx.pack converted them (else plain), before the run records its config anywhere; a flag
    that contradicts a split is refused when it is loaded (wdx.data.shards.check_convention)."""
    if cfg.text_convention is None:
        recorded = split_convention(cfg.dataset_root, cfg.train_split)
        cfg.text_convention, cfg.dual_transcription = recorded or (PLAIN.name, cfg.dual_transcription)
        if recorded:
            log.info("text convention %s, %s side (as %s/%s/metadata.json records)", recorded.name, recorded.dual,
                     cfg.dataset_root, cfg.train_split)
    if cfg.text_convention == PLAIN.name:  # a look at the first transcripts: Kspon markup trained as words?
        texts = first_transcripts(load_split(cfg.dataset_root, cfg.train_split, cfg.samples_per_shard, None),
                                  KSPON_LOOK_SAMPLES)
        marked = sum(map(looks_kspon, texts))
        if marked:
            log.warning(kspon_warning(marked, len(texts), f"{cfg.dataset_root}/{cfg.train_split}"))


def build_model(cfg: TrainConfig, accelerator: Accelerator) -> tuple[Whisper, dict]:
    """Whisper with the domain tokens, frozen as configured; checks what depends on its size."""
    with whole_model_init(accelerator):
        whisper, groups = setup(cfg.base_model, language=cfg.language, encoder_layers=cfg.train_encoder_layers,
                                decoder_layers=cfg.train_decoder_layers, dropout=cfg.dropout,
                                conditioning=cfg.domain_conditioning, rows_init=cfg.domain_rows_init, seed=cfg.seed,
                                domains=cfg.domain_names)
    config = whisper.model.config
    for name, flag, have in (("train_encoder_layers", "--train-encoder-layers", config.encoder_layers),
                             ("train_decoder_layers", "--train-decoder-layers", config.decoder_layers)):
        if getattr(cfg, name) > have:
            raise ConfigError(f"{flag} {getattr(cfg, name)}: {cfg.base_model} has {have} "
                              f"{name.split('_')[1]} blocks; at most {have}")
    room = max_text_tokens(whisper.model.config.max_target_positions)
    if cfg.generation_max_length > room:
        raise ConfigError(f"--generation-max-length {cfg.generation_max_length}: the decoder holds "
                          f"{whisper.model.config.max_target_positions} positions, the prompt takes "
                          f"{whisper.model.config.max_target_positions - room}; at most {room}")
    whisper.frozen_sha256 = frozen_sha256(whisper.model)  # before any cast: the same under every precision
    if cfg.gradient_checkpointing:
        whisper.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.precision() != "no" and not zero_stage(accelerator):  # DeepSpeed casts the whole module itself
        saved = cast_frozen(whisper.model, COMPUTE_DTYPE[cfg.precision()])
        log.info("frozen weights held in %s: %.2f GiB saved", cfg.precision(), saved / 2**30)
    return whisper, groups


def build_optimizer(cfg: TrainConfig, groups: dict, device: torch.device) -> torch.optim.AdamW:
    """AdamW on trainable parameters only; the domain-token rows get no weight decay (they
    start near the mean embedding and are pulled toward zero by nothing but the loss) and
    their own learning rate (--domain-rows-lr-scale)."""
    decay = [p for name, ps in groups.items() if name != "domain_token_rows" for p in ps]
    param_groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr": group_lr(cfg, "blocks"),
                     "name": "blocks"},
                    {"params": groups["domain_token_rows"], "weight_decay": 0.0, "lr": group_lr(cfg, "domain_rows"),
                     "name": "domain_rows"}]
    fused = device.type in ("cuda", "cpu", "xpu", "mps")
    return torch.optim.AdamW([g for g in param_groups if g["params"]], lr=cfg.learning_rate, fused=fused)


def group_lr(cfg: TrainConfig, name: str) -> float:
    """Peak learning rate of an optimizer group (`name` as build_optimizer tags it)."""
    return cfg.learning_rate * (cfg.domain_rows_lr_scale if name == "domain_rows" else 1.0)


def describe_plan(cfg: TrainConfig, accelerator: Accelerator, whisper: Whisper, groups: dict,
                  train: ShardedSamples, steps_per_epoch: int, total_steps: int) -> str:
    counts = count_trainable(groups)
    total = sum(p.numel() for p in whisper.model.parameters())
    world, accum, batch = accelerator.num_processes, cfg.grad_accum, cfg.per_device_train_batch_size
    lines = [
        "plan:",
        f"  model              {cfg.base_model}  ({total:,} parameters, {whisper.model.config.num_mel_bins} mel bins)",
        f"  trainable          {sum(counts.values()):,} ({100 * sum(counts.values()) / total:.2f} %)",
        *(f"    {name:<19}{n:,}" for name, n in counts.items()),
        f"  domain tokens      {whisper.domain_token_ids}",
        f"  processes          {world} x {max(1, cfg.num_workers)} loader workers, device {accelerator.device}, "
        f"distributed type {accelerator.distributed_type.value}"
        + (f", ZeRO-{zero_stage(accelerator)}" if zero_stage(accelerator) else "")
        + (f", collectives time out after {group_timeout(accelerator):.0f} s" if group_timeout(accelerator) else ""),
        f"  precision          {cfg.precision()} ({cfg.precision_source}): {precision_mode(cfg, accelerator)}",
        f"  effective batch    {batch} per process x {world} processes x {accum} accumulation"
        f" = {batch * world * accum}",
        f"  train samples      {train.split.total} ({train.samples_per_epoch()} per epoch)",
        *([f"  encoder cache      {cfg.encoder_cache}: steps start above the {whisper.model.frozen_prefix} frozen "
           f"encoder blocks"] if cfg.encoder_cache else []),
        f"  steps              {steps_per_epoch} per epoch, {total_steps} in total",
        f"  checkpoints        {checkpoint.checkpoints_dir(cfg.run_dir)} (every {cfg.save_steps} steps, "
        f"keep {cfg.save_total_limit} + best)",
        f"  final model        {Path(cfg.run_dir) / 'final'}",
    ]
    return "\n".join(lines)


def precision_mode(cfg: TrainConfig, accelerator: Accelerator) -> str:
    if cfg.precision() == "no":
        return "fp32 throughout"
    if zero_stage(accelerator):
        return f"DeepSpeed casts the model to {cfg.precision()}, keeps fp32 master weights of what trains"
    return f"{cfg.precision()} autocast; trained weights fp32, frozen ones {cfg.precision()}"


def check_run_dir(cfg: TrainConfig) -> None:
    """Refuse to mix two runs in one directory unless told to."""
    run = Path(cfg.run_dir)
    held = checkpoint.complete_checkpoints(run) or (run / "final").exists()
    if held and not cfg.resume_from_checkpoint and not cfg.export:
        if not cfg.overwrite:
            raise ConfigError(f"--run-name {cfg.run_name}: {run} already holds a run; pass "
                              "--resume-from-checkpoint latest to continue it or --overwrite to start over")


def data_layout(cfg: TrainConfig, accelerator: Accelerator, train: ShardedSamples) -> dict:
    """Everything the loader positions in a checkpoint depend on. --grad-accum is not among
    them: it only groups micro-batches into steps, so a resume maps it exactly."""
    return {"processes": accelerator.num_processes, "workers": cfg.num_workers,
            "batch_size": cfg.per_device_train_batch_size, "shuffle_block": cfg.shuffle_block,
            "open_shards": cfg.open_shards, "seed": cfg.seed, "train_shards": len(train.split.urls),
            "train_samples": train.split.total}


def resume_point(cfg: TrainConfig, accelerator: Accelerator, layout: dict) -> tuple[Path | None, checkpoint.TrainState]:
    """The checkpoint to resume (None: start from step 0) and the loop state to go on from,
    its data position mapped to this run's layout; loads no weights (see load_resume)."""
    fresh = checkpoint.TrainState(world_size=accelerator.num_processes, num_workers=cfg.num_workers,
                                  data_layout=layout)
    resume = checkpoint.resolve(cfg.run_dir, cfg.resume_from_checkpoint)
    if resume is None:
        return None, fresh
    state = checkpoint.TrainState.load(resume)
    check_world_size(accelerator, resume, state)
    saved = state.data_layout or {"processes": state.world_size, "workers": state.num_workers}  # older checkpoints
    changed = {k: (v, layout[k]) for k, v in saved.items() if layout.get(k) != v}
    if changed and state.micro_in_epoch:
        log.warning("the data position of %s cannot be mapped (changed: %s): epoch %d restarts from its first sample, "
                    "so the samples of that epoch trained before the checkpoint are trained again", resume,
                    ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()), state.epoch)
        state.positions, state.micro_in_epoch = [], 0
    elif "seed" in changed:
        log.warning("--seed %d: %s was trained with --seed %d; the data order of the epochs from here follows %d",
                    cfg.seed, resume, saved["seed"], cfg.seed)
    state.world_size, state.num_workers, state.data_layout = fresh.world_size, fresh.num_workers, layout
    return resume, state


def load_resume(cfg: TrainConfig, accelerator: Accelerator, scheduler, fingerprint: dict, resume: Path,
                state: checkpoint.TrainState) -> None:
    """Load model/optimizer/scheduler/RNG from the checkpoint `resume_point` chose; the
    learning rates and weight decay follow this run's flags."""
    checkpoint.check_fingerprint(resume, fingerprint)
    checkpoint.load(accelerator, resume)
    # the optimizer's lr was restored as the old schedule left it (0 at the end of a run resumed with a
    # larger --max-steps), its peak as the old --learning-rate: recompute both from this run's flags
    base = getattr(scheduler, "scheduler", scheduler)
    peaks = [group_lr(cfg, g.get("name", "blocks")) for g in base.optimizer.param_groups]
    if peaks != base.base_lrs:
        log.info("peak learning rates %s replace the checkpoint's %s (--learning-rate, --domain-rows-lr-scale)",
                 peaks, base.base_lrs)
    base.base_lrs = peaks
    for group in base.optimizer.param_groups:  # AdamW's state was saved with the groups: the flag wins
        decay = cfg.weight_decay if group.get("name", "blocks") == "blocks" else 0.0
        if group["weight_decay"] != decay:
            log.info("weight decay %g (--weight-decay) replaces the checkpoint's %g for %s", decay,
                     group["weight_decay"], group.get("name", "blocks"))
            group["weight_decay"] = decay
    base.last_epoch -= 1
    base.step()
    log.info("resumed from %s: step %d, epoch %d, %d micro-batches into it", resume, state.step, state.epoch,
             state.micro_in_epoch)


def check_world_size(accelerator: Accelerator, path: Path, state: checkpoint.TrainState) -> None:
    """DeepSpeed's sharded optimizer state loads only on the number of processes that wrote it."""
    if zero_stage(accelerator) and state.world_size != accelerator.num_processes:
        raise checkpoint.CheckpointError(
            f"{path}: written by {state.world_size} processes under DeepSpeed, whose optimizer shards only load "
            f"on as many; this run has {accelerator.num_processes}. Resume with {state.world_size} processes, or "
            f"write its weights with them (--export {path}) and start a new run with --base-model RUN/final")


def export(cfg: TrainConfig, accelerator: Accelerator, model, whisper: Whisper, fingerprint: dict,
           config_json: str) -> int:
    """--export CHECKPOINT: load it and write final/."""
    checkpoint.check_fingerprint(cfg.export, fingerprint)
    check_world_size(accelerator, Path(cfg.export), checkpoint.TrainState.load(cfg.export))
    checkpoint.load(accelerator, Path(cfg.export))
    write_final(accelerator, model, whisper.tokenizer, whisper.feature_extractor, Path(cfg.run_dir) / "final",
                config_json, None)
    return 0


def run_debug_step(cfg: TrainConfig, accelerator: Accelerator, model, optimizer, loader, groups: dict, n_mels: int,
                   dtype: torch.dtype) -> int:
    """--debug-step K (and --detect-anomaly): the timing table on one fixed batch."""
    if cfg.detect_anomaly:
        torch.autograd.set_detect_anomaly(True)
    report = debug_step(accelerator, model, optimizer, loader, groups, cfg.debug_step, n_mels, cfg.learning_rate,
                        dtype)
    if accelerator.is_main_process:
        print(report, flush=True)
    return 0
