"""The one source of every training setting: a dataclass the CLI is generated from.

Each field's `help` is its --help line; its default is the only default. Flag names are
the field names in kebab-case. `validate` rejects bad values and combinations at start-up,
naming the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field

from wdx.data.augment import SpecAugment
from wdx.data.conventions import CONVENTIONS, DUAL_SIDES, PLAIN, Convention
from wdx.model.domains import DOMAINS, ROWS_INIT, parse_domains

SCHEDULERS = ("cosine", "linear", "constant_with_warmup", "cosine_with_restarts", "polynomial")
PRECISIONS = ("no", "fp16", "bf16")
# What `accelerate launch` exports from its config file (or its --mixed_precision flag).
LAUNCHER_PRECISION = "ACCELERATE_MIXED_PRECISION"


def opt(default, help: str, **kw):  # noqa: A002 - mirrors argparse
    return field(default=default, metadata={"help": help, **kw})


class ConfigError(ValueError):
    """A flag value or combination that cannot work; the message starts with the flag."""


@dataclass
class TrainConfig:
    # --- data
    dataset_root: str | None = opt(None, "dataset root: ROOT/train and ROOT/val_small with shards + metadata.json "
                                  "(a directory, or a URL WebDataset can open)", group="data")
    target_sr: int = opt(16000, "sample rate audio is resampled to (Whisper expects 16000)", group="data")
    samples_per_shard: int | None = opt(None, "samples per shard to assume where metadata.json is missing",
                                        group="data")
    domains: str = opt(",".join(DOMAINS), "the speaker domains, comma-separated: one decoder token each; a sample "
                       "of another domain is skipped (unknown_domain). A --base-model with domains of its own keeps "
                       "them and gets the new ones after", group="data")
    default_domain: str | None = opt(None, "domain for samples whose sample and split name none (one of --domains)",
                                     group="data")
    text_convention: str | None = opt(None, "how the transcripts are written: plain (as is), or kspon (KsponSpeech "
                                      "/ AI Hub markup, converted: see wdx/data/conventions.py); default: as the train "
                                      "split's metadata.json records (wdx.pack --text-convention converts at packing "
                                      "time and records it), else plain", choices=CONVENTIONS, group="data")
    dual_transcription: str = opt("pronunciation", "kspon's (spelling)/(pronunciation) pairs: the side trained on",
                                  choices=DUAL_SIDES, group="data")
    train_split: str = opt("train", "training split directory under --dataset-root", group="data")
    # --- augmentation of training inputs (wdx/data/augment.py): per sample and epoch, from --seed; never evaluation
    speed_perturb: str = opt("", "speed factors, comma-separated, one drawn per sample and epoch (e.g. 0.9,1.0,1.1: "
                             "the usual three-way perturbation); empty: off", group="augmentation")
    noise_snr_db: str = opt("", "add noise at an SNR drawn from LOW,HIGH dB per sample and epoch (e.g. 10,30); "
                            "empty: off", group="augmentation")
    noise_dir: str | None = opt(None, "noise recordings for --noise-snr-db (any audio format, any rate); without "
                                "it, Gaussian noise", group="augmentation")
    spec_augment: bool | None = opt(None, "SpecAugment: time and mel-channel masks on the log-mel (transformers' "
                                    "own sampler); default: as --base-model's config (apply_spec_augment)",
                                    group="augmentation")
    mask_time_prob: float = opt(SpecAugment.mask_time_prob, "--spec-augment: share of frames masked "
                                "(transformers' Whisper default)", group="augmentation")
    mask_time_length: int = opt(SpecAugment.mask_time_length, "--spec-augment: frames per time mask",
                                group="augmentation")
    mask_feature_prob: float = opt(SpecAugment.mask_feature_prob, "--spec-augment: share of mel channels masked",
                                   group="augmentation")
    mask_feature_length: int = opt(SpecAugment.mask_feature_length, "--spec-augment: channels per feature mask",
                                   group="augmentation")
    eval_split: str = opt("val_small", "evaluation split directory under --dataset-root", group="data")
    shuffle_block: int = opt(256, "training samples shuffled together (raw bytes held per loader worker)",
                             group="data")
    open_shards: int = opt(4, "parts of its range each training loader worker reads side by side, one open shard "
                           "each, so a batch mixes shards written speaker by speaker or domain by domain",
                           group="data")
    num_workers: int = opt(2, "data loader worker processes per training process", group="data")
    persistent_workers: bool = opt(False, "keep loader workers alive between epochs", group="data")
    max_eval_samples: int | None = opt(None, "evaluate on at most this many samples (default: all)", group="data")
    encoder_cache: str | None = opt(None, "directory of the encoder cache: the frozen encoder blocks' output for every "
                                          "clip, built on first use, so later epochs skip audio decoding, log-mel and "
                                          "the frozen blocks (docs/encoder-cache.md)", group="data")
    rebuild_encoder_cache: bool = opt(False, "--encoder-cache built for another set-up: delete and build it again "
                                             "(default: refuse it, naming what differs)", group="data")
    # --- model
    base_model: str = opt("openai/whisper-large-v3", "hub id or local directory of a Whisper checkpoint",
                          group="model")
    language: str = opt("ko", "language token of the decoder prompt", group="model")
    domain_conditioning: str = opt("token", "token: the decoder prompt ends with the sample's domain token; none: "
                                            "the same recipe with the 4-token prompt and no domain rows (the "
                                            "baseline that measures what the token adds)", choices=("token", "none"),
                                   group="model")
    domain_rows_init: float = opt(ROWS_INIT, "the domain-token rows start at the embedding's mean row plus this many "
                                  "of its per-dimension standard deviations of seeded Gaussian noise, each row its "
                                  "own (0: both start identical)", group="model")
    domain_rows_lr_scale: float = opt(1.0, "learning rate of the domain-token rows: --learning-rate times this",
                                      group="model")
    train_encoder_layers: int = opt(4, "train the last N encoder blocks (whole blocks)", group="model")
    train_decoder_layers: int = opt(4, "train attention + MLP of the last N decoder blocks", group="model")
    dropout: float = opt(0.0, "dropout probability (set before the model is built)", group="model")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory", group="model")
    # --- optimisation
    learning_rate: float = opt(1e-4, "peak learning rate (AdamW)", group="optimisation")
    weight_decay: float = opt(0.0, "AdamW weight decay (never applied to the embedding)", group="optimisation")
    max_grad_norm: float = opt(1.0, "clip gradients to this global norm (0: no clipping)", group="optimisation")
    num_train_epochs: int = opt(3, "epochs to train (ignored when --max-steps is set)", group="optimisation")
    max_steps: int | None = opt(None, "optimizer steps to train (overrides --num-train-epochs)",
                                group="optimisation")
    per_device_train_batch_size: int = opt(8, "training batch per process", group="optimisation")
    per_device_eval_batch_size: int = opt(8, "evaluation batch per process", group="optimisation")
    grad_accum: int = opt(1, "micro-batches per optimizer step", group="optimisation")
    warmup_steps: int = opt(100, "linear warm-up steps before the schedule", group="optimisation")
    lr_scheduler_type: str = opt("cosine", "learning-rate schedule after warm-up", choices=SCHEDULERS,
                                 group="optimisation")
    mixed_precision: str | None = opt(None, "precision (Accelerate autocast, or DeepSpeed's bf16/fp16 mode); "
                                      "default: the accelerate config's mixed_precision, else no", choices=PRECISIONS,
                                      group="optimisation")
    bf16: bool = opt(False, "shortcut for --mixed-precision bf16", group="optimisation")
    fp16: bool = opt(False, "shortcut for --mixed-precision fp16", group="optimisation")
    max_nonfinite: int = opt(10, "stop after this many optimizer steps in a row with a NaN/inf loss or gradient",
                             group="optimisation")
    ddp_timeout: int = opt(1800, "seconds a process waits for the others at a collective before the run fails "
                                 "(transformers' default; Accelerate's own is 600, less than writing final/ of "
                                 "large-v3 on a slow disk takes)", group="optimisation")
    seed: int = opt(42, "seed for model init, shuffling and dropout", group="optimisation")
    # --- evaluation, logging, checkpoints
    eval_steps: int = opt(500, "evaluate every N optimizer steps (and at the end)", group="evaluation")
    generation_max_length: int = opt(225, "most new tokens generated per sample at evaluation", group="evaluation")
    num_examples: int = opt(4, "example transcripts logged per evaluation", group="evaluation")
    compare_domains: bool = opt(False, "at each evaluation also decode every clip with the other domain token(s): "
                                       "CER with the right token vs the wrong one (one more generation per domain)",
                                group="evaluation")
    logging_steps: int = opt(10, "log train metrics every N optimizer steps", group="evaluation")
    save_steps: int = opt(500, "save a checkpoint every N optimizer steps", group="checkpoints")
    save_total_limit: int = opt(3, "keep the newest N checkpoints (plus the best by --metric-for-best-model)",
                                group="checkpoints")
    metric_for_best_model: str = opt("cer", "what 'best' means, lower is better: CER or WER on all domains, or the "
                                            "eval loss", group="checkpoints", choices=("cer", "wer", "loss"))
    early_stopping_patience: int = opt(0, "stop after N evaluations in a row without improving "
                                          "--metric-for-best-model (0: never); final/ then holds the best checkpoint's "
                                          "weights", group="checkpoints")
    early_stopping_threshold: float = opt(0.0, "an evaluation resets the early-stopping patience only when it beats "
                                               "the best by more than this (absolute); any improvement is still "
                                               "the new best", group="checkpoints")
    run_name: str | None = opt(None, "name of this run: outputs go to OUTPUT_DIR/RUN_NAME", group="checkpoints")
    output_dir: str = opt("outputs", "parent directory of run directories", group="checkpoints")
    overwrite: bool = opt(False, "reuse a run directory that holds another run", group="checkpoints")
    resume_from_checkpoint: str | None = opt(None, "'latest' or a checkpoint directory to resume from",
                                             group="checkpoints")
    export: str | None = opt(None, "write final/ from this checkpoint directory and exit", group="checkpoints")
    # --- tracking and the Hub (credentials come from the environment / login stores only)
    login_wandb: bool = opt(False, "log metrics to Weights & Biases (WANDB_API_KEY or `wandb login`)",
                            group="tracking")
    wandb_project: str = opt("whisper-ko-domains", "W&B project", group="tracking")
    login_hf: bool = opt(False, "check Hugging Face credentials at start-up (HF_TOKEN or `hf auth login`)",
                         group="tracking")
    push_to_hub: bool = opt(False, "upload final/ to the Hub at the end", group="tracking")
    hub_model_id: str | None = opt(None, "Hub repo for --push-to-hub (default: RUN_NAME)", group="tracking")
    hub_private: bool = opt(True, "create the Hub repo private", group="tracking")
    # --- tools
    plan: bool = opt(False, "print the per-GPU memory plan for --base-model under DDP / ZeRO-2 / ZeRO-3 / offload "
                            "(two steps simulated on fake tensors: no GPU, no weights) and exit", group="tools")
    plan_tokens: int = opt(448, "--plan: decoder tokens per sample (5 prompt tokens + transcript); the default is "
                                "the decoder's whole context, the worst case", group="tools")
    print_config: bool = opt(False, "print the resolved plan (params, batches, steps, paths) and exit",
                             group="tools")
    debug_step: int = opt(0, "run K steps on one fixed batch, print a per-phase timing table, exit",
                          group="tools")
    detect_anomaly: bool = opt(False, "torch.autograd anomaly detection (slow)", group="tools")
    log_sample_keys: bool = opt(False, "append the keys of every trained batch to RUN/sample_keys.rankN.jsonl "
                                       "(audits what was trained on, across resumes)", group="tools")
    # --- resolved at start-up, not flags
    precision_source: str = field(default="", init=False)  # where the precision came from, for the log

    @property
    def run_dir(self) -> str:  # only meaningful once validate() has required --run-name
        return f"{self.output_dir.rstrip('/')}/{self.run_name}"

    @property
    def domain_names(self) -> tuple[str, ...]:
        return parse_domains(self.domains)

    @property
    def speeds(self) -> tuple[float, ...]:
        return tuple(float(x) for x in self.speed_perturb.split(",")) if self.speed_perturb.strip() else ()

    @property
    def snr_range(self) -> tuple[float, float] | None:
        if not self.noise_snr_db.strip():
            return None
        low, high = (float(x) for x in self.noise_snr_db.split(","))
        return low, high

    @property
    def convention(self) -> Convention:
        return Convention(self.text_convention or PLAIN.name, self.dual_transcription)

    def precision(self) -> str:
        """The precision to train in; after `validate`, the flag or the launcher's (see resolve_precision)."""
        return self.mixed_precision or ("bf16" if self.bf16 else "fp16" if self.fp16 else "no")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, ensure_ascii=False)


def check_augmentation(cfg: TrainConfig) -> None:
    """Augmentation flags that parse and can work together; the encoder cache serves none of them."""
    try:
        speeds, snr = cfg.speeds, cfg.snr_range
    except ValueError:
        raise ConfigError(f"--speed-perturb {cfg.speed_perturb!r} / --noise-snr-db {cfg.noise_snr_db!r}: comma-"
                          "separated numbers (e.g. 0.9,1.0,1.1 and 10,30)") from None
    if any(not 0.5 <= s <= 2.0 for s in speeds):
        raise ConfigError(f"--speed-perturb {cfg.speed_perturb}: factors between 0.5 and 2.0")
    if snr is not None and snr[0] > snr[1]:
        raise ConfigError(f"--noise-snr-db {cfg.noise_snr_db}: LOW,HIGH with LOW <= HIGH")
    if cfg.noise_dir and snr is None:
        raise ConfigError("--noise-dir: give the SNR range too (--noise-snr-db LOW,HIGH)")
    if not (0 <= cfg.mask_time_prob < 1 and 0 <= cfg.mask_feature_prob < 1):
        raise ConfigError("--mask-time-prob / --mask-feature-prob: between 0 and 1")
    if cfg.mask_time_length < 1 or cfg.mask_feature_length < 1:
        raise ConfigError("--mask-time-length / --mask-feature-length: at least 1")
    used = [flag for flag, on in (("--speed-perturb", speeds), ("--noise-snr-db", snr), ("--spec-augment",
                                                                                         cfg.spec_augment)) if on]
    if cfg.encoder_cache and used:
        raise ConfigError(f"--encoder-cache with {' and '.join(used)}: the cache holds the frozen blocks' output of "
                          "the clean audio, which augmentation changes every epoch; train from audio, or drop "
                          f"{' and '.join(used)}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Reject what cannot work, naming the flag; returns cfg."""
    if not cfg.plan:
        for name in ("dataset_root", "run_name"):
            if getattr(cfg, name) is None:
                raise ConfigError(f"--{flag(name)} is required")
        if "/" in cfg.run_name or cfg.run_name in ("", ".", ".."):
            raise ConfigError(f"--run-name {cfg.run_name!r}: must be a plain directory name")
    try:
        names = cfg.domain_names
    except ValueError as exc:
        raise ConfigError(f"--domains {cfg.domains!r}: {exc}") from None
    check_augmentation(cfg)
    if cfg.default_domain is not None and cfg.default_domain not in names:
        raise ConfigError(f"--default-domain {cfg.default_domain!r}: not one of --domains ({', '.join(names)})")
    for f in dataclasses.fields(cfg):  # argparse's float() takes "nan" and "inf"
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{flag(f.name)}: must be a finite number (got {value})")
    positive = ("target_sr", "per_device_train_batch_size", "per_device_eval_batch_size", "grad_accum",
                "num_train_epochs", "eval_steps", "save_steps", "logging_steps", "save_total_limit",
                "shuffle_block", "open_shards", "generation_max_length", "max_nonfinite", "ddp_timeout")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{flag(name)}: must be >= 1 (got {getattr(cfg, name)})")
    for name in ("max_steps", "samples_per_shard", "max_eval_samples"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ConfigError(f"--{flag(name)}: must be >= 1 (got {getattr(cfg, name)})")
    for name in ("num_workers", "warmup_steps", "train_encoder_layers", "train_decoder_layers", "num_examples",
                 "early_stopping_patience", "early_stopping_threshold"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{flag(name)}: must be >= 0 (got {getattr(cfg, name)})")
    if cfg.bf16 and cfg.fp16:
        raise ConfigError("--bf16/--fp16: choose one")
    if (cfg.bf16 or cfg.fp16) and cfg.mixed_precision not in (None, "bf16" if cfg.bf16 else "fp16"):
        raise ConfigError(f"--mixed-precision {cfg.mixed_precision} contradicts --{'bf16' if cfg.bf16 else 'fp16'}")
    resolve_precision(cfg, os.environ)
    if not 0 <= cfg.dropout < 1:
        raise ConfigError(f"--dropout: must be in [0, 1) (got {cfg.dropout})")
    if cfg.encoder_cache and cfg.dropout > 0:
        raise ConfigError(f"--dropout {cfg.dropout}: dropout in the frozen encoder blocks would change their output "
                          "every epoch, which --encoder-cache stores once; use --dropout 0 or no --encoder-cache")
    if cfg.domain_rows_init < 0 or cfg.domain_rows_lr_scale <= 0:
        raise ConfigError(f"--domain-rows-init {cfg.domain_rows_init} / --domain-rows-lr-scale "
                          f"{cfg.domain_rows_lr_scale}: the first must be >= 0, the second > 0")
    if cfg.learning_rate <= 0:
        raise ConfigError(f"--learning-rate: must be > 0 (got {cfg.learning_rate})")
    if cfg.save_steps % cfg.eval_steps:
        raise ConfigError(f"--save-steps {cfg.save_steps} must be a multiple of --eval-steps {cfg.eval_steps}: "
                          "the best checkpoint is chosen by the eval CER at save time")
    if cfg.compare_domains and cfg.domain_conditioning == "none":
        raise ConfigError("--compare-domains: --domain-conditioning none trains no domain token to compare")
    if cfg.push_to_hub and cfg.hub_model_id is None:
        cfg.hub_model_id = cfg.run_name
    return cfg


def resolve_precision(cfg: TrainConfig, environ: typing.Mapping[str, str]) -> None:
    """Set cfg.mixed_precision: this script's flag, else the launcher's config, else "no".

    `Accelerator(mixed_precision=X)` beats what `accelerate launch --config_file` exported,
    so the loop passes this resolved value and must never pass a default of its own: that
    is how the GPU presets' bf16 used to be dropped. A flag wins over the config file, and
    the log says so.
    """
    given = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else cfg.mixed_precision
    launcher, where = launcher_precision(environ)
    if given is not None:
        name = "--bf16" if cfg.bf16 else "--fp16" if cfg.fp16 else f"--mixed-precision {given}"
        overrides = f", overriding {launcher} in {where}" if launcher not in (None, given) else ""
        cfg.mixed_precision, cfg.precision_source = given, name + overrides
    elif launcher is not None:
        cfg.mixed_precision, cfg.precision_source = launcher, where
    else:
        cfg.mixed_precision, cfg.precision_source = "no", "default: no flag, no accelerate config"


def launcher_precision(environ: typing.Mapping[str, str]) -> tuple[str | None, str]:
    """(precision, where it is set) from `accelerate launch`'s environment, or (None, "").

    Under DeepSpeed an explicit bf16/fp16 "enabled" in the DeepSpeed JSON decides (Accelerate
    refuses mixed_precision in a yaml that names a deepspeed_config_file); "auto" there
    defers to the accelerate config's mixed_precision, which the launcher exports.
    """
    ds_file = deepspeed_json(environ)
    if ds_file:
        enabled = {name: read_json(ds_file).get(name, {}).get("enabled", "auto") for name in ("bf16", "fp16")}
        chosen = [name for name, on in enabled.items() if on is True]
        if chosen:
            return chosen[0], ds_file
        if all(on is False for on in enabled.values()):
            return "no", ds_file
    launcher = environ.get(LAUNCHER_PRECISION)
    if launcher is not None and launcher not in PRECISIONS:
        raise ConfigError(f"mixed_precision {launcher!r} in the accelerate config: this trainer supports "
                          f"{', '.join(PRECISIONS)}")
    return launcher, "the accelerate config"


def launched_with_deepspeed(environ: typing.Mapping[str, str]) -> bool:
    return environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def deepspeed_json(environ: typing.Mapping[str, str]) -> str | None:
    """The DeepSpeed JSON `accelerate launch` named (deepspeed_config_file), if any."""
    return environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") if launched_with_deepspeed(environ) else None


def read_json(path: str) -> dict:
    """A JSON object from `path`, or a one-line error naming the file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read this JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def flag(name: str) -> str:
    return name.replace("_", "-")


def _arg_type(tp) -> type:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union else tp


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_loop.py", description="Fine-tune Whisper on WebDataset shards, conditioned on a speaker "
        "domain token. Launch with `accelerate launch [--config_file accelerate_configs/...] train_loop.py ...`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(TrainConfig)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainConfig):
        if not f.init:
            continue
        meta = dict(f.metadata)
        group = groups.setdefault(meta.get("group", "other"), parser.add_argument_group(meta.get("group")))
        tp = _arg_type(hints[f.name])
        kwargs = dict(help=meta["help"], default=f.default)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=tp, choices=meta.get("choices"),
                          metavar=None if meta.get("choices") else {int: "N", float: "X"}.get(tp, "STR"))
        group.add_argument(f"--{flag(f.name)}", **kwargs)
        if "_" in f.name:  # the underscore spelling too (HfArgumentParser, the seed's scripts), not in --help
            group.add_argument(f"--{f.name}", **{**kwargs, "dest": f.name, "default": argparse.SUPPRESS,
                                                 "help": argparse.SUPPRESS})
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """CLI -> validated TrainConfig; bad values exit with the flag named (argparse style)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return validate(TrainConfig(**vars(args)))
    except ConfigError as exc:
        parser.error(str(exc))
