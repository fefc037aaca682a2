"""Decoder prompt, labels and batches.

One example's decoder sequence (DESIGN.md):
    <|startoftranscript|> <|ko|> <|transcribe|> <|notimestamps|> <|domain:X|>  text...  <|endoftext|>
decoder_input_ids = sequence[:-1], labels = sequence[1:], with the positions that predict
prompt tokens and all padding set to -100. Exactly one <|startoftranscript|>: the common
`labels[:, 0] == tokenizer.bos_token_id` check never matches for Whisper (bos is
<|endoftext|>), which is how the usual scripts end up feeding it twice.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from wdx.data.pipeline import pad_audio
from wdx.model.domains import DOMAINS, prompt_tokens
from wdx.model.whisper import max_text_tokens

IGNORE = -100


def label_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat positions, token ids) of the labels that count: what the loss projects and scores.
    Computed with the batch on the host, so the device never syncs to learn their number."""
    flat = labels.flatten()
    positions = (flat != IGNORE).nonzero().squeeze(1)
    return positions, flat[positions]


def prompt_ids(tokenizer, language: str, domain: str | None) -> list[int]:
    """The prompt ids: the same at training, evaluation and inference. Five with the domain
    token; four for `domain=None` (a model trained with --domain-conditioning none)."""
    tokens = prompt_tokens(language, domain)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if tokenizer.unk_token_id in ids and tokenizer.unk_token not in tokens:
        raise ValueError(f"tokenizer lacks one of {tokens}")
    return ids


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def make_text_encoder(tokenizer, max_target_positions: int) -> Callable[[str], list[int] | str]:
    """For the data layer: text -> ids, or a skip reason when the decoder cannot hold it."""
    limit = max_text_tokens(max_target_positions)

    def encode(text: str) -> list[int] | str:
        ids = text_ids(tokenizer, text)
        return ids if len(ids) <= limit else f"transcript_too_long: {len(ids)} tokens > {limit}"

    return encode


def encoder_input(samples: list[dict]) -> dict[str, torch.Tensor]:
    """The padded audio, or the frozen encoder prefix's cached states (wdx.train.encoder_cache)."""
    if "states" in samples[0]:
        return {"encoder_states": torch.stack([s["states"] for s in samples])}
    out = {"audio": pad_audio(samples)}
    if "spec_masks" in samples[0]:  # wdx.data.augment's SpecAugment, drawn per sample
        for name in ("time", "feature"):
            out[f"spec_{name}_mask"] = torch.from_numpy(np.stack([s["spec_masks"][name] for s in samples]))
    return out


class Collator:
    """Samples -> {audio (or encoder_states), decoder_input_ids, labels, label_positions, label_ids, domain, text,
    key, ...}."""

    def __init__(self, tokenizer, language: str, conditioning: str = "token",
                 domains: tuple[str, ...] = DOMAINS) -> None:
        self.prompts = {d: prompt_ids(tokenizer, language, d if conditioning == "token" else None) for d in domains}
        self.eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.tokenizer = tokenizer

    def sequences(self, samples: list[dict]) -> list[list[int]]:
        return [self.prompts[s["domain"]] + (s.get("ids") or text_ids(self.tokenizer, s["text"])) + [self.eot]
                for s in samples]

    def __call__(self, samples: list[dict]) -> dict:
        seqs = self.sequences(samples)
        width = max(len(s) for s in seqs) - 1
        inputs = torch.full((len(seqs), width), self.eot, dtype=torch.long)
        labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
        n_prompt = len(next(iter(self.prompts.values())))
        for i, seq in enumerate(seqs):
            inputs[i, : len(seq) - 1] = torch.tensor(seq[:-1])
            labels[i, n_prompt - 1: len(seq) - 1] = torch.tensor(seq[n_prompt:])
        positions, targets = label_targets(labels)
        return dict(**encoder_input(samples), decoder_input_ids=inputs, labels=labels, label_positions=positions,
                    label_ids=targets,
                    prompt_ids=torch.tensor([self.prompts[s["domain"]] for s in samples]),
                    target=[s.get("target") for s in samples], fluent=[s.get("fluent") for s in samples],
                    **{k: [s[k] for s in samples] for k in ("text", "domain", "key", "duration")})
