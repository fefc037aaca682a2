"""Memory of one training step, before and after issue 12, for the same model and batch.

"before" is the accounting this trainer had until then, kept here as the reference
(tests/test_model.py also trains it side by side with today's code: same losses):
the domain-token rows trained inside the tied embedding through a gradient mask (the
whole matrix gets gradients and AdamW state), frozen weights stayed fp32 under autocast,
and the loss upcast full batch x vocabulary logits to fp32. "after" is today's loop
(wdx.train.plan.training_step). Peaks are measured by the CPU allocator (torch.profiler) on
real fp32 steps, and simulated on fake tensors (wdx.train.plan) for bf16, which this CPU runs
far too slowly to measure at these sizes.
"""

from __future__ import annotations

import copy

import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from wdx.data.collate import IGNORE
from wdx.train.plan import GIB, N_DOMAIN_TOKENS, measure, training_step


def legacy_setup(model: WhisperForConditionalGeneration, encoder_layers: int, decoder_layers: int,
                 new_rows: list[int]) -> dict[str, list[torch.nn.Parameter]]:
    """The old freeze: blocks as today; the whole embedding trainable, its gradient masked
    to the new rows (the tied projection shares the Parameter, so one hook covers both)."""
    model.requires_grad_(False)
    encoder, decoder = model.model.encoder, model.model.decoder
    trained_encoder = list(encoder.layers)[len(encoder.layers) - encoder_layers:]
    groups = {"blocks": [p for b in trained_encoder for p in b.parameters()]}
    for block in list(decoder.layers)[len(decoder.layers) - decoder_layers:]:
        groups["blocks"] += [*block.self_attn.parameters(), *block.encoder_attn.parameters(),
                             *block.fc1.parameters(), *block.fc2.parameters()]
    weight = model.get_input_embeddings().weight
    for p in (*groups["blocks"], weight):
        p.requires_grad_(True)
    mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    mask[new_rows] = 1
    weight.register_hook(lambda grad: grad * mask.to(grad.device, grad.dtype))
    groups["embedding"] = [weight]
    return groups


def legacy_loss(model, features: torch.Tensor, batch: dict) -> torch.Tensor:
    """The old token loss: full logits, upcast to fp32, every position scored (-100 ignored)."""
    out = model(input_features=features, decoder_input_ids=batch["decoder_input_ids"], use_cache=False)
    return torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), batch["labels"].flatten(),
                                             ignore_index=IGNORE, reduction="sum")


def legacy_step(config: WhisperConfig, encoder_layers: int, decoder_layers: int, batch: int, tokens: int,
                precision: str):
    """wdx.train.plan.training_step, the old way (fp32 weights under autocast, no DeepSpeed)."""
    from wdx.data.features import N_SAMPLES, log_mel

    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    config = copy.deepcopy(config)
    config.vocab_size += N_DOMAIN_TOKENS
    model = WhisperForConditionalGeneration(config)
    groups = legacy_setup(model, encoder_layers, decoder_layers,
                          list(range(config.vocab_size - N_DOMAIN_TOKENS, config.vocab_size)))
    optimizer = torch.optim.AdamW([{"params": groups["blocks"]}, {"params": groups["embedding"], "weight_decay": 0.0}],
                                  lr=1e-5, fused=True)

    def run_step() -> None:
        ids = torch.zeros(batch, tokens, dtype=torch.long)
        labels = ids.clone()
        labels[:, :4] = IGNORE
        features = log_mel(torch.zeros(batch, N_SAMPLES), config.num_mel_bins)
        with torch.autocast("cpu", dtype=low or torch.bfloat16, enabled=low is not None):
            loss = legacy_loss(model, features, dict(decoder_input_ids=ids, labels=labels))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, [p for ps in groups.values() for p in ps], optimizer, run_step


def before_after(config: WhisperConfig, batch: int, tokens: int, precision: str, fake: bool) -> dict[str, float]:
    """Peak GiB of a step with the seed's freeze (last 4 + 4 blocks), the old way and today's."""
    layers = min(4, config.encoder_layers)
    old = measure(lambda: legacy_step(config, layers, layers, batch, tokens, precision), config.num_mel_bins, fake)
    new = measure(lambda: training_step(config, layers, layers, batch, tokens, precision, deepspeed=False),
                  config.num_mel_bins, fake)
    return {"before_gib": old.peak / GIB, "after_gib": new.peak / GIB, "trained_before": old.trainable,
            "trained_after": new.trainable}


def bench(model_dir: str, batch: int, tokens: int, smoke: bool) -> dict:
    """Rows: the bench's model measured in fp32 and simulated in bf16; large-v3 simulated in bf16."""
    from wdx.train.plan import load_config

    config = WhisperConfig.from_pretrained(model_dir)
    rows = {"fp32, measured (CPU allocator)": before_after(config, batch, tokens, "no", fake=False),
            "fp32, simulated": before_after(config, batch, tokens, "no", fake=True),
            "bf16, simulated": before_after(config, batch, tokens, "bf16", fake=True)}
    if not smoke:
        rows["large-v3, batch 8 x 448, bf16, simulated"] = before_after(
            load_config("openai/whisper-large-v3"), 8, 448, "bf16", fake=True)
    return rows
