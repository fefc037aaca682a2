"""--plan: what a configuration needs per GPU, before any GPU or download is touched.

The plan is not a formula: it runs two steps of this trainer's own code (the same
model set-up, freezing, frozen-weight cast, log-mel, loss and AdamW) on fake tensors
(`FakeTensorMode`: shapes and dtypes, no storage) and counts the bytes of every live
tensor (wdx.train.memory.LiveBytes). Precision, autocast copies, the label length, the domain
rows and whatever changes in the loop are therefore priced as they are, for any model
size, in seconds on a CPU. The simulation runs on the CPU's autocast; on a GPU, the
attention kernels keep about as much (both use flash-style kernels that store the
output and a log-sum-exp only).

On top of one process's step, per strategy: DDP gradient buckets (the gradients are views
into them: one copy, kept between steps); DeepSpeed's fp32 master weights, fp32 gradient
partition and Adam moments (each / processes), the partition of gradients accumulated over
micro-batches (fp32 in ds_configs/), its reduce/all-gather buckets as set in ds_configs/
(plus an fp32 copy of the bucket being reduced), and ZeRO-3's sharded weights plus the ones
gathered around the running layer.
What no tensor count sees is added as CUDA_CONTEXT (CUDA/cuBLAS/NCCL, outside
`max_memory_allocated`) and ALLOCATOR_SLACK (the caching allocator reserves more than it
hands out). tests/test_plan.py checks the simulated step against the CPU allocator's own
peak on real steps; `python -m bench.gpu` sets it beside `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import WhisperConfig

GIB = 2**30
CARDS_GIB = (16, 24, 40, 80)
CUDA_CONTEXT = 0.6 * GIB
ALLOCATOR_SLACK = 0.10
N_DOMAIN_TOKENS = 2
DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"

# Offline configs of the official checkpoints, for planning without the Hub.
KNOWN = {
    "openai/whisper-tiny": dict(d_model=384, encoder_layers=4, decoder_layers=4, heads=6, num_mel_bins=80,
                                vocab_size=51865),
    "openai/whisper-base": dict(d_model=512, encoder_layers=6, decoder_layers=6, heads=8, num_mel_bins=80,
                                vocab_size=51865),
    "openai/whisper-small": dict(d_model=768, encoder_layers=12, decoder_layers=12, heads=12, num_mel_bins=80,
                                 vocab_size=51865),
    "openai/whisper-medium": dict(d_model=1024, encoder_layers=24, decoder_layers=24, heads=16, num_mel_bins=80,
                                  vocab_size=51865),
    "openai/whisper-large-v2": dict(d_model=1280, encoder_layers=32, decoder_layers=32, heads=20, num_mel_bins=80,
                                    vocab_size=51865),
    "openai/whisper-large-v3": dict(d_model=1280, encoder_layers=32, decoder_layers=32, heads=20,
                                    num_mel_bins=128, vocab_size=51866),
}


def load_config(base_model: str) -> WhisperConfig:
    """The model's config: a local directory, the built-in table above, else the Hub."""
    if os.path.isdir(base_model) or base_model not in KNOWN:
        return WhisperConfig.from_pretrained(base_model)
    k = KNOWN[base_model]
    return WhisperConfig(d_model=k["d_model"], encoder_layers=k["encoder_layers"], decoder_layers=k["decoder_layers"],
                         encoder_attention_heads=k["heads"], decoder_attention_heads=k["heads"],
                         encoder_ffn_dim=4 * k["d_model"], decoder_ffn_dim=4 * k["d_model"],
                         num_mel_bins=k["num_mel_bins"], vocab_size=k["vocab_size"])


@dataclass
class Step:
    """One process's simulated training step, in bytes."""

    params: int  # parameters: count
    trainable: int  # trained parameters: count
    largest: int  # the largest parameter: count (ZeRO-3 gathers at least this)
    weights: int  # parameter bytes as held
    peak: int  # everything live at the step's peak (weights, grads, optimizer, activations, temporaries)


def simulate(config: WhisperConfig, encoder_layers: int, decoder_layers: int, batch: int, tokens: int,
             precision: str, deepspeed: bool, fake: bool = True, checkpointing: bool = False) -> Step:
    """Two training steps of the loop's code (`training_step`); the peak of live tensor bytes.

    `fake`: on fake tensors, counted by LiveBytes (the plan). Otherwise on real tensors of a
    random-init model, the second step measured by the CPU allocator (the check of the plan).
    """
    return measure(lambda: training_step(config, encoder_layers, decoder_layers, batch, tokens, precision, deepspeed,
                                         checkpointing), config.num_mel_bins, fake)


def measure(build, n_mels: int, fake: bool = True) -> Step:
    """Peak bytes of two steps of `build()` -> (model, trainable, optimizer, run_step)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from wdx.data.features import mel_filters
    from wdx.train.memory import LiveBytes, measured_peak, tensor_bytes

    live = LiveBytes()
    # log-mel caches its filter bank: made real here, so a fake one never lands in the cache
    mel_filters(n_mels, torch.device("cpu"))
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
        model, trainable, optimizer, run_step = build()
        if fake:
            for p in model.parameters():
                live.add(p)
            with live:
                run_step()
                run_step()
            peak = live.peak
        else:
            run_step()
            states = [t for s in (optimizer.state.values() if optimizer else []) for t in s.values()]
            peak = tensor_bytes([*model.parameters(), *states]) + measured_peak(run_step)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        return Step(params=sum(p.numel() for p in model.parameters()), trainable=sum(p.numel() for p in trainable),
                    largest=max(p.numel() for p in model.parameters()), weights=weights, peak=peak)


def training_step(config: WhisperConfig, encoder_layers: int, decoder_layers: int, batch: int, tokens: int,
                  precision: str, deepspeed: bool, checkpointing: bool = False):
    """The model as the loop sets it up (random init), its trainable parameters, optimizer,
    and a closure running one training step on a batch of `tokens` decoder positions.

    `deepspeed`: the module is cast whole to 16 bits, there is no autocast, and each
    gradient leaves the parameter as soon as it is complete (DeepSpeed copies it into its
    reduce bucket); its optimizer and buckets are added by `per_gpu`. Otherwise: frozen
    weights in the compute dtype, trained ones fp32 under autocast, fused AdamW, as the loop.
    `checkpointing`: --gradient-checkpointing, enabled as the loop enables it.
    """
    from wdx.data.features import N_SAMPLES, log_mel
    from wdx.model.lm_head import DomainWhisper, install_domain_rows
    from wdx.model.whisper import cast_frozen, freeze_except, max_text_tokens
    from wdx.scoring.forward import token_loss_sum

    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    config = copy.deepcopy(config)
    vocab = config.vocab_size
    config.vocab_size = vocab + N_DOMAIN_TOKENS
    text = min(max(tokens - 5, 0), max_text_tokens(config.max_target_positions))
    model = DomainWhisper(config)
    install_domain_rows(model, vocab)
    groups = freeze_except(model, encoder_layers, decoder_layers)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for ps in groups.values() for p in ps]
    optimizer = None
    if deepspeed:
        for p in model.parameters():  # as DeepSpeed's engine casts its module (.to() cannot swap fake tensors)
            p.data = p.data.to(low or torch.float32)
        for p in trainable:
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    else:
        if low is not None:
            cast_frozen(model, low)
        optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=True)

    def run_step() -> None:
        ids = torch.zeros(batch, 5 + text, dtype=torch.long)
        positions = torch.arange(batch * (5 + text)).reshape(batch, -1)[:, 4:].flatten()
        features = log_mel(torch.zeros(batch, N_SAMPLES), config.num_mel_bins, model.dtype)
        with torch.autocast("cpu", dtype=low or torch.bfloat16, enabled=low is not None and not deepspeed):
            loss = token_loss_sum(model, {"input_features": features},
                                  dict(decoder_input_ids=ids, label_positions=positions,
                                       label_ids=torch.zeros_like(positions)))
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return model, trainable, optimizer, run_step


def ds_buckets(stage: int) -> dict[str, float]:
    """Bucket sizes (elements) of the shipped ds_configs/ preset for `stage`, and the bytes per
    element its gradients are accumulated (`accum`) and reduced (`comm`) in."""
    ds = json.loads((DS_CONFIGS / f"zero{stage}.json").read_text())
    zero = ds["zero_optimization"]
    out = {k: float(v) for k, v in zero.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    fp32 = {"fp32": 4.0, "float32": 4.0}
    out["accum"] = fp32.get(ds.get("data_types", {}).get("grad_accum_dtype"), 0.0)  # 0: the model's 16 bits
    out["comm"] = fp32.get(ds.get("communication_data_type"), 0.0)
    return out


def per_gpu(step: Step, strategy: str, gpus: int, half: int = 2) -> dict[str, float]:
    """Bytes per GPU by part: `states` (model states beyond the simulated step), `buckets`,
    and `host` (CPU RAM), added to the step's simulated peak."""
    T = step.trainable
    if strategy == "DDP":
        return dict(step=step.peak, states=0, buckets=4 * T if gpus > 1 else 0, host=0)
    sharded_states = (4 + 4 + 8) * T / gpus  # fp32 master, fp32 gradient partition, Adam moments
    if strategy == "ZeRO-2":
        b = ds_buckets(2)
        # reduce: double-buffered 16-bit buckets, plus an fp32 copy of the one in flight when reduced in fp32
        buckets = ((2 * b["reduce_bucket_size"] + b["allgather_bucket_size"]) * half
                   + b["reduce_bucket_size"] * b["comm"])
        grad_partition = (b["accum"] or half) * T / gpus  # the reduced gradients of its partition, accumulated
        return dict(step=step.peak, states=sharded_states + grad_partition, buckets=buckets, host=0)
    b = ds_buckets(3)
    grad_partition = (b["accum"] or half) * T / gpus
    gathered = 2 * max(b["stage3_prefetch_bucket_size"], step.largest) * half  # the running layer + prefetch
    weights = step.weights / gpus + gathered - step.weights  # replaces the whole 16-bit copy of the simulation
    buckets = 2 * b["reduce_bucket_size"] * half + b["reduce_bucket_size"] * b["comm"]
    if strategy == "ZeRO-3":
        return dict(step=step.peak + weights, states=sharded_states + grad_partition, buckets=buckets, host=0)
    return dict(step=step.peak + weights, states=0, buckets=buckets,  # ZeRO-3 + offload: states in host RAM
                host=sharded_states * gpus * 1.5)  # pinned buffers on top; all local processes share the host


def card_needs(allocated: float) -> float:
    """What a card must have for `allocated` bytes at peak."""
    return allocated * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT


def processes() -> int:
    """Processes per the launcher (WORLD_SIZE), else the default accelerate config, else 1."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    try:
        from accelerate.commands.config.config_args import default_config_file, load_config_from_file

        if os.path.isfile(default_config_file):
            return int(load_config_from_file(default_config_file).num_processes or 1)
    except (ImportError, ValueError, TypeError, AttributeError):
        pass
    return 1


STRATEGIES = ("DDP", "ZeRO-2", "ZeRO-3", "ZeRO-3+offload")


def simulated_steps(config: WhisperConfig, encoder_layers: int, decoder_layers: int, batch: int, tokens: int,
                    precision: str, checkpointing: bool = False) -> dict[str, Step]:
    """One simulated step per strategy: the loop's own for DDP, DeepSpeed's 16-bit module for ZeRO."""
    plain = simulate(config, encoder_layers, decoder_layers, batch, tokens, precision, deepspeed=False,
                     checkpointing=checkpointing)
    ds = simulate(config, encoder_layers, decoder_layers, batch, tokens, precision, deepspeed=True,
                  checkpointing=checkpointing)
    return {name: plain if name == "DDP" else ds for name in STRATEGIES}


def on_gpu(part: dict[str, float]) -> float:
    """Allocated bytes per GPU of a `per_gpu` breakdown (host RAM left out)."""
    return part["step"] + part["states"] + part["buckets"]


def plan_gib(config: WhisperConfig, encoder_layers: int, decoder_layers: int, batch: int, tokens: int,
             precision: str, gpus: int = 1, checkpointing: bool = False) -> dict[str, float]:
    """Allocated peak per GPU (GiB) for each strategy: what bench.gpu sets beside its measurement."""
    steps = simulated_steps(config, encoder_layers, decoder_layers, batch, tokens, precision, checkpointing)
    return {name: on_gpu(per_gpu(step, name, gpus)) / GIB for name, step in steps.items()}


def plan_table(base_model: str, encoder_layers: int, decoder_layers: int, batch: int, tokens: int,
               precision: str, gpus: int = 1, checkpointing: bool = False) -> str:
    steps = simulated_steps(load_config(base_model), encoder_layers, decoder_layers, batch, tokens, precision,
                            checkpointing)
    plain = steps["DDP"]
    lines = [f"memory plan for {base_model}: {plain.params:,} parameters, {plain.trainable:,} trained "
             f"({100 * plain.trainable / plain.params:.1f} %), {precision}, {gpus} process(es), batch {batch} "
             f"x {tokens} decoder tokens per GPU, gradient checkpointing {'on' if checkpointing else 'off'}",
             "  simulated: two steps of the loop's own code on fake tensors; GiB per GPU, allocated at the peak",
             f"  {'strategy':<15}{'step':>7}{'+states':>8}{'+buckets':>9}{'total':>7}{'card':>7}{'host RAM':>10}   "
             + "  ".join(f"{g} GB card" for g in CARDS_GIB)]
    for name, step in steps.items():
        part = per_gpu(step, name, gpus)
        total = on_gpu(part)
        fits = [f"{'no' if b < 1 else f'b<={b}':>10}" for b in largest_batches(step, name, gpus, batch)]
        lines.append(f"  {name:<15}{part['step'] / GIB:>7.2f}{part['states'] / GIB:>8.2f}{part['buckets'] / GIB:>9.2f}"
                     f"{total / GIB:>7.2f}{card_needs(total) / GIB:>7.2f}{part['host'] / GIB:>10.1f}   "
                     + "  ".join(fits))
    lines += [f"  'card': total x {1 + ALLOCATOR_SLACK:.2f} (allocator slack) + {CUDA_CONTEXT / GIB:.1f} GiB "
              "(CUDA context); 'b<=N': the largest per-GPU batch that fits the card (GB = 10^9 bytes)",
              "  DeepSpeed rows: 16-bit module, fp32 master/gradients/Adam and the accumulated gradient partition "
              "sharded over processes, buckets and accumulation/reduce dtypes from ds_configs/zero{2,3}.json"]
    return "\n".join(lines)


def largest_batches(step: Step, strategy: str, gpus: int, batch: int) -> list[int]:
    """The largest per-GPU batch that fits each of CARDS_GIB (0: none), from a step simulated
    at `batch`: activations and temporaries grow with the batch, model states do not."""
    total = on_gpu(per_gpu(step, strategy, gpus))
    per_sample = max(step.peak - _states_in_step(step, strategy), 1) / batch
    allowed = [(card * 10**9 - CUDA_CONTEXT) / (1 + ALLOCATOR_SLACK) for card in CARDS_GIB]
    return [max(0, math.floor((a - (total - per_sample * batch)) / per_sample)) for a in allowed]


def _states_in_step(step: Step, strategy: str) -> float:
    """Bytes of the simulated peak that do not grow with the batch: weights, and for the
    non-DeepSpeed step fp32 gradients and Adam moments of the trained parameters."""
    return step.weights + (0 if strategy != "DDP" else (4 + 8) * step.trainable)


def batch_table(base_model: str, precision: str, checkpointing: bool, tokens: tuple[int, ...] = (64, 128, 256, 448)
                ) -> str:
    """docs/performance.md's table: the largest per-GPU batch by card and decoder tokens, 1 GPU (DDP) and 4 (ZeRO-2)."""
    config = load_config(base_model)
    head = " | ".join(f"{g} GB" for g in CARDS_GIB)
    lines = [f"| decoder tokens | 1 GPU, DDP preset: {head} | 4 GPUs, ZeRO-2: {head} |",
             "|---:|" + "---:|" * 2 * len(CARDS_GIB)]
    for t in tokens:
        steps = simulated_steps(config, 4, 4, 8, t, precision, checkpointing)
        cells = largest_batches(steps["DDP"], "DDP", 1, 8) + largest_batches(steps["ZeRO-2"], "ZeRO-2", 4, 8)
        lines.append(f"| {t} | " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m wdx.train.plan [--gradient-checkpointing]: the largest-batch tables
    import sys

    print(batch_table("openai/whisper-large-v3", "bf16", "--gradient-checkpointing" in sys.argv[1:]))
