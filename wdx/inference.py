"""Loading a trained model and transcribing batches with the domain prompt.

Accepts `final/` (a standard HF directory) or a training checkpoint (`step-XXXXXXX`,
written by accelerate.save_state: weights only, rebuilt on the base model named in its
train_config.json). A base model without domain tokens is prompted without one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, WhisperForConditionalGeneration

from .collate import prompt_ids
from .domains import DOMAIN_TOKENS
from .evaluation import generate
from .features import log_mel
from .model import PROMPT_TOKENS


class Transcriber:
    """model + tokenizer + prompts; `__call__` transcribes a batch of 16 kHz clips."""

    def __init__(self, model_dir: str | Path, language: str = "ko", device: str = "cpu",
                 max_new_tokens: int = 225) -> None:
        self.model, self.tokenizer = load(model_dir)
        self.model.to(device).eval()
        self.device, self.language, self.max_new_tokens = torch.device(device), language, max_new_tokens
        vocab = self.tokenizer.get_vocab()
        self.has_domains = all(t in vocab for t in DOMAIN_TOKENS)

    def prompt(self, domain: str) -> list[int]:
        if self.has_domains:
            return prompt_ids(self.tokenizer, self.language, domain)
        return self.tokenizer.convert_tokens_to_ids([t.format(language=self.language) for t in PROMPT_TOKENS])

    @torch.no_grad()
    def __call__(self, clips: list[np.ndarray], domains: list[str]) -> list[str]:
        audio = torch.zeros(len(clips), max(len(c) for c in clips))
        for i, c in enumerate(clips):
            audio[i, : len(c)] = torch.as_tensor(c)
        features = log_mel(audio.to(self.device), self.model.config.num_mel_bins, self.model.dtype)
        prompts = torch.tensor([self.prompt(d) for d in domains], device=self.device)
        new = generate(self.model, features, prompts, self.max_new_tokens)
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


def load(model_dir: str | Path) -> tuple[WhisperForConditionalGeneration, object]:
    """final/ or any HF Whisper directory; or a non-DeepSpeed training checkpoint."""
    path = Path(model_dir)
    if (path / "config.json").exists():
        return WhisperForConditionalGeneration.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    if (path / "train_config.json").exists() and (path / "model.safetensors").exists():
        from .model import setup

        cfg = json.loads((path / "train_config.json").read_text())
        whisper, _ = setup(cfg["base_model"], language=cfg["language"], encoder_layers=0, decoder_layers=0)
        missing, unexpected = whisper.model.load_state_dict(load_file(path / "model.safetensors"), strict=False)
        if unexpected or set(missing) - {"proj_out.weight"}:  # proj_out is tied to the embedding
            raise ValueError(f"{path}: weights do not fit {cfg['base_model']} (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        return whisper.model, whisper.tokenizer
    if (path / "pytorch_model").is_dir():
        raise ValueError(f"{path}: a DeepSpeed checkpoint; export it first: train_loop.py ... --export {path}")
    raise ValueError(f"{path}: neither a model directory (config.json) nor a training checkpoint")
