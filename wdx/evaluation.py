"""Evaluation: teacher-forced loss plus generation-based CER/WER per domain.

Generation starts from exactly the training prompt (<|startoftranscript|> <|ko|>
<|transcribe|> <|notimestamps|> <|domain:X|>), greedy. Each process evaluates its own
samples (the eval split is cut so that every sample is read by exactly one process);
results are gathered as Python objects, so none is duplicated or dropped.
"""

from __future__ import annotations

import logging

import torch
import transformers
from accelerate.utils import gather_object

from .features import log_mel
from .metrics import by_domain

log = logging.getLogger(__name__)


def generate(model, features: torch.Tensor, prompts: torch.Tensor, max_new_tokens: int,
             synced_gpus: bool = False) -> torch.Tensor:
    """Greedy decoding from `prompts`; returns only the new tokens.

    GenerationMixin.generate is called directly: Whisper's own `generate` rebuilds the
    prompt from its generation config and would drop the domain token.
    """
    out = transformers.GenerationMixin.generate(
        model, input_features=features, decoder_input_ids=prompts, max_new_tokens=max_new_tokens,
        do_sample=False, num_beams=1, synced_gpus=synced_gpus,
        attention_mask=torch.ones(features.shape[0], features.shape[-1], dtype=torch.long, device=features.device))
    return out[:, prompts.shape[1]:]


def batch_loss(model, features: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean token loss, number of label tokens) for one batch; the model's own cross-entropy."""
    out = model(input_features=features, decoder_input_ids=batch["decoder_input_ids"], labels=batch["labels"])
    return out.loss, (batch["labels"] != -100).sum()


@torch.no_grad()
def evaluate(accelerator, model, loader, tokenizer, *, n_mels: int, max_new_tokens: int,
             max_samples: int | None = None, synced_gpus: bool = False) -> dict:
    """{"loss", "results" (by_domain), "rows" (ref/hyp/domain/key), "skips"} over the whole split."""
    was_training = model.training
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    device = accelerator.device
    rows, skips = [], {}
    loss_sum = torch.zeros((), device=device)
    tokens = torch.zeros((), device=device)
    seen = 0
    limit = None if max_samples is None else -(-max_samples // accelerator.num_processes)
    for batch in loader:
        if limit is not None and seen >= limit:
            break
        for reason, n in batch["skips"].items():
            skips[reason] = skips.get(reason, 0) + n
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with accelerator.autocast():
            features = log_mel(batch["audio"], n_mels).to(unwrapped.dtype)
            loss, n = batch_loss(unwrapped, features, batch)  # the bare module: no DDP collectives
            new = generate(unwrapped, features, batch["prompt_ids"], max_new_tokens, synced_gpus)
        loss_sum += loss.float() * n
        tokens += n
        hyps = tokenizer.batch_decode(new, skip_special_tokens=True)
        rows += [dict(key=k, domain=d, ref=r, hyp=h.strip()) for k, d, r, h in
                 zip(batch["key"], batch["domain"], batch["text"], hyps)]
        seen += len(hyps)
    totals = accelerator.reduce(torch.stack([loss_sum, tokens]), reduction="sum")
    rows = gather_object(rows) if accelerator.num_processes > 1 else rows
    all_skips: dict[str, int] = {}
    for part in (gather_object([skips]) if accelerator.num_processes > 1 else [skips]):
        for reason, n in part.items():
            all_skips[reason] = all_skips.get(reason, 0) + n
    model.train(was_training)
    loss = (totals[0] / totals[1].clamp(min=1)).item()
    return {"loss": loss, "results": by_domain(rows), "rows": rows, "skips": all_skips}


def examples(rows: list[dict], n: int) -> list[dict]:
    """Up to `n` rows, alternating domains, for the log."""
    by = {}
    for r in rows:
        by.setdefault(r["domain"], []).append(r)
    picked, i = [], 0
    while len(picked) < n and any(i < len(v) for v in by.values()):
        picked += [v[i] for v in by.values() if i < len(v)][: n - len(picked)]
        i += 1
    return picked
