"""--plan: what a configuration needs per GPU, before any GPU or download is touched.

The model is built on the meta device from its config alone. Model-state bytes use the
per-parameter costs of DeepSpeed's own ZeRO estimators (16-bit weights 2 B; per trained
parameter 2 B 16-bit grad + 4 B fp32 grad + 4 B fp32 master + 8 B Adam moments = 18 B),
applied separately to frozen and trained parameters: DeepSpeed's estimators assume every
parameter trains, which overstates this project's case several-fold (their figure is
printed alongside). Activations are a rough per-sample estimate (34 * seq * d_model bytes
per stored block, SDPA attention, labels of LABEL_TOKENS tokens); measure before trusting
the last gigabyte.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from .model import freeze_except

GIB = 2**30
LABEL_TOKENS = 128
CONTEXT_OVERHEAD = 1.0 * GIB  # CUDA context, allocator slack, comm buffers
CARDS_GIB = (16, 24, 40, 80)

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
class Counts:
    total: int  # after adding the domain tokens
    trainable: int
    largest_layer: int
    config: WhisperConfig


def count_params(config: WhisperConfig, encoder_layers: int, decoder_layers: int, n_new_tokens: int = 2) -> Counts:
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    groups = freeze_except(model, encoder_layers, decoder_layers, new_rows=[])
    trainable = sum(p.numel() for ps in groups.values() for p in ps) + n_new_tokens * config.d_model
    total = sum(dict((id(p), p.numel()) for p in model.parameters()).values()) + n_new_tokens * config.d_model
    largest = max(p.numel() for p in model.parameters())
    return Counts(total, trainable, largest, config)


def activation_bytes(c: Counts, encoder_layers: int, decoder_layers: int) -> int:
    """Bytes kept for backward per sample (16-bit): trained encoder blocks; every decoder
    block when gradients must reach the embedding (new token rows), with its cross-attention
    keys/values of the 1500 encoder frames; fp32 logits for the loss."""
    d, frames, t = c.config.d_model, c.config.max_source_positions, LABEL_TOKENS
    encoder = encoder_layers * 34 * frames * d
    decoder_blocks = c.config.decoder_layers  # the embedding trains: gradients cross every block
    decoder = decoder_blocks * (34 * t * d + 2 * 2 * frames * d)
    logits = 2 * 4 * t * c.config.vocab_size
    return encoder + decoder + logits


def strategies(c: Counts, gpus: int) -> dict[str, dict[str, float]]:
    """Per-GPU bytes by part, for each strategy."""
    P, T, L = c.total, c.trainable, c.largest_layer
    frozen = P - T
    return {
        "DDP": dict(weights=4 * P, grads=4 * T, optimizer=8 * T, cpu=0),  # fp32 weights + autocast
        "ZeRO-2": dict(weights=2 * P, grads=(2 + 4) * T / gpus, optimizer=(4 + 8) * T / gpus, cpu=0),
        "ZeRO-3": dict(weights=2 * P / gpus + 4 * L, grads=(2 + 4) * T / gpus, optimizer=(4 + 8) * T / gpus, cpu=0),
        "ZeRO-3+offload": dict(weights=4 * L, grads=0, optimizer=0, cpu=(2 * frozen + 18 * T) * 1.5),
    }


def plan_gib(config: WhisperConfig, encoder_layers: int, decoder_layers: int, batch: int,
             gpus: int = 1) -> dict[str, float]:
    """The planned per-GPU total (GiB) for each strategy: what bench.gpu sets beside its measurement."""
    c = count_params(config, encoder_layers, decoder_layers)
    act = activation_bytes(c, encoder_layers, decoder_layers)
    return {name: (s["weights"] + s["grads"] + s["optimizer"] + batch * act + CONTEXT_OVERHEAD) / GIB
            for name, s in strategies(c, gpus).items()}


def plan_table(base_model: str, encoder_layers: int, decoder_layers: int, batch: int, gpus: int = 1) -> str:
    c = count_params(load_config(base_model), encoder_layers, decoder_layers)
    act = activation_bytes(c, encoder_layers, decoder_layers)
    lines = [f"memory plan for {base_model}: {c.total:,} parameters, {c.trainable:,} trained "
             f"({100 * c.trainable / c.total:.1f} %), {gpus} GPU(s), batch {batch} per GPU",
             f"  activations ~{act / GIB:.2f} GiB per sample (labels of {LABEL_TOKENS} tokens); "
             f"+{CONTEXT_OVERHEAD / GIB:.0f} GiB context/buffers",
             f"  {'strategy':<15}{'weights':>9}{'grads':>8}{'optim':>8}{'activ':>8}{'total':>8}{'host RAM':>10}   "
             + "  ".join(f"{g} GiB card" for g in CARDS_GIB)]
    for name, s in strategies(c, gpus).items():
        total = s["weights"] + s["grads"] + s["optimizer"] + batch * act + CONTEXT_OVERHEAD
        fits = []
        for card in CARDS_GIB:
            room = card * GIB - (total - batch * act)
            fits.append(f"{'no':>10}" if room < act else f"{'yes, b<=' + str(math.floor(room / act)):>10}")
        lines.append(f"  {name:<15}{s['weights'] / GIB:>9.2f}{s['grads'] / GIB:>8.2f}{s['optimizer'] / GIB:>8.2f}"
                     f"{batch * act / GIB:>8.2f}{total / GIB:>8.2f}{s['cpu'] / GIB:>10.1f}   " + "  ".join(fits))
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    z2 = estimate_zero2_model_states_mem_needs(c.total, gpus, 1, cpu_offload=False)[1]
    z3 = estimate_zero3_model_states_mem_needs(c.total, c.largest_layer, gpus, 1, cpu_offload=False)[1]
    lines.append(f"  DeepSpeed's estimators with every parameter trained (an upper bound): ZeRO-2 "
                 f"{z2 / GIB:.2f} GiB, ZeRO-3 {z3 / GIB:.2f} GiB of model states per GPU")
    lines.append("  GiB throughout; 'b<=N': the largest per-GPU batch that fits by this estimate.")
    return "\n".join(lines)
