"""Evaluation inside the loop: teacher-forced loss plus generation-based CER/WER per domain.

Generation starts from exactly the training prompt, greedy (wdx.scoring.forward). Each process
evaluates its own samples (the eval split is cut so that every sample is read by exactly one
process); results are gathered as Python objects, so none is duplicated or dropped.
"""

from __future__ import annotations

import logging

import torch

from wdx.data.collate import IGNORE
from wdx.model.domains import DOMAINS, domain_token
from wdx.scoring.forward import decode, generate, model_input, token_loss_sum
from wdx.scoring.metrics import by_domain, prompt_table
from wdx.train.accel import gather_list, sum_counts

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(accelerator, model, loader, tokenizer, *, n_mels: int, max_new_tokens: int,
             max_batches: int | None = None, pad_to: int | None = None, compare_domains: bool = False) -> dict:
    """{"loss", "results" (by_domain), "rows" (ref/hyp/domain/key), "skips"} over the split,
    and "prompts" (CER of each domain's clips under every domain token) with `compare_domains`.

    The encoder runs once per batch: the loss and every generation share its output.

    `pad_to` (ZeRO-3): every process must join every forward, since each one gathers
    parameters from all; a process with fewer batches runs dummy ones (results dropped)
    up to `pad_to`, and generation runs with synced_gpus.
    """
    was_training = model.training
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    domains = tuple(getattr(unwrapped.config, "domains", None) or DOMAINS)  # the model's, as trained
    compared = domains if compare_domains else ()
    device = accelerator.device
    rows, skips = [], {}
    loss_sum = torch.zeros((), device=device)
    tokens = torch.zeros((), device=device)
    done, last = 0, None
    for batch in loader:
        if max_batches is not None and done >= max_batches:
            break
        for reason, n in batch["skips"].items():
            skips[reason] = skips.get(reason, 0) + n
        if batch.get("empty"):
            continue  # only the skips after a slot's last sample
        last = batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        loss, n, batch_rows = _eval_batch(accelerator, unwrapped, batch, tokenizer, n_mels, max_new_tokens, pad_to,
                                          compared)
        loss_sum += loss
        tokens += n
        rows += batch_rows
        done += 1
    while pad_to is not None and done < pad_to:
        _eval_batch(accelerator, unwrapped, last or _dummy_batch(tokenizer, device), tokenizer, n_mels,
                    max_new_tokens, pad_to, compared)
        done += 1
    totals = accelerator.reduce(torch.stack([loss_sum, tokens]), reduction="sum")
    rows = gather_list(accelerator, rows)
    all_skips = dict(sum_counts(accelerator, skips))
    model.train(was_training)
    loss = (totals[0] / totals[1].clamp(min=1)).item()
    out = {"loss": loss, "results": by_domain(rows, domains), "rows": rows, "skips": all_skips}
    if compare_domains:
        out["prompts"] = prompt_table(rows, domains)
    return out


def _eval_batch(accelerator, model, batch: dict, tokenizer, n_mels: int, max_new_tokens: int,
                pad_to: int | None, compared: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """The batch's loss sum, label count and rows; with `compared` (the model's domains) each
    clip is also decoded under every other domain's token."""
    inputs = model_input(batch, n_mels, model.dtype)  # fp32 log-mel maths outside autocast, as in training
    eos, synced = model.generation_config.eos_token_id, pad_to is not None
    with accelerator.autocast():
        encoded = model.encode(**inputs)  # once, for the loss and every generation
        loss = token_loss_sum(model, inputs, batch, encoded)  # the bare module: no DDP collectives
        new = generate(model, None, batch["prompt_ids"], max_new_tokens, synced, encoded)
        by_prompt = {}
        for shift in range(1, len(compared)):  # each clip under every other token
            domains = [compared[(compared.index(d) + shift) % len(compared)] for d in batch.get("domain", [])]
            prompts = batch["prompt_ids"].clone()
            if domains:
                prompts[:, -1] = torch.tensor(tokenizer.convert_tokens_to_ids([domain_token(d) for d in domains]),
                                              device=prompts.device)
            by_prompt[shift] = (domains, decode(tokenizer, generate(model, None, prompts, max_new_tokens, synced,
                                                                    encoded)))
    n = (batch["labels"] != IGNORE).sum()
    # cut off at the limit: no <|endoftext|> in max_new_tokens tokens (one host sync per eval batch)
    capped = ((new != eos).all(dim=1) & (new.shape[1] >= max_new_tokens)).tolist()
    rows = [dict(key=k, domain=d, ref=r, hyp=h, capped=c, target=t, fluent=f) for k, d, r, h, c, t, f in
            zip(batch.get("key", []), batch.get("domain", []), batch.get("text", []), decode(tokenizer, new), capped,
                batch.get("target", []), batch.get("fluent", []))]
    for i, row in enumerate(rows if compared else []):
        row["hyp_by_prompt"] = {row["domain"]: row["hyp"], **{ds[i]: hs[i] for ds, hs in by_prompt.values()}}
    return loss, n, rows


def _dummy_batch(tokenizer, device: torch.device) -> dict:
    """One second of silence with a bare prompt: only for keeping ZeRO-3 processes in step."""
    sot = tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    ids = torch.tensor([[sot, sot]], device=device)
    return dict(audio=torch.zeros(1, 16000, device=device), decoder_input_ids=ids, prompt_ids=ids,
                labels=torch.full_like(ids, -100))


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
