"""The `hf` backend: loading a trained model and transcribing batches with the domain prompt.

Accepts `final/` (a standard HF directory) or a training checkpoint (`step-XXXXXXX`, written
by accelerate.save_state: weights only, rebuilt on the base model named in its
train_config.json). A base model without domain tokens is prompted without one. The `ct2`
backend (wdx/scoring/ct2_inference.py) decodes an export greedily from the same prompt, the same
log-mel features and the same suppressed tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, WhisperForConditionalGeneration

from wdx.data.collate import prompt_ids
from wdx.data.features import log_mel
from wdx.model.domains import DOMAINS, check_prompt_domain, model_domains, parse_domains
from wdx.scoring.forward import generate


class HFTranscriber:
    """model + tokenizer + prompts; `__call__` transcribes a batch of 16 kHz clips."""

    def __init__(self, model_dir: str | Path, language: str = "ko", device: str = "cpu",
                 max_new_tokens: int = 225) -> None:
        self.model, self.tokenizer = load(model_dir)
        self.model.to(device).eval()
        self.device, self.language, self.max_new_tokens = torch.device(device), language, max_new_tokens
        self.domains = model_domains(self.model.config, self.tokenizer.get_vocab())  # () for a base model
        self.has_domains = bool(self.domains)

    def prompt(self, domain: str) -> list[int]:
        check_prompt_domain(self.domains, domain)
        return prompt_ids(self.tokenizer, self.language, domain if self.has_domains else None)

    @torch.no_grad()
    def __call__(self, clips: list[np.ndarray], domains: list[str]) -> list[str]:
        audio = torch.zeros(len(clips), max(len(c) for c in clips))
        for i, c in enumerate(clips):
            audio[i, : len(c)] = torch.as_tensor(c)
        prompts = [self.prompt(d) for d in domains]
        features = log_mel(audio.to(self.device), self.model.config.num_mel_bins, self.model.dtype)
        new = generate(self.model, features, torch.tensor(prompts, device=self.device), self.max_new_tokens)
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


def first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def check_model_files(path: Path) -> None:
    """A one-line ValueError for a model directory whose config.json or weights are damaged
    (a truncated copy or download), before transformers or safetensors raise from deep inside."""
    from safetensors import SafetensorError, safe_open

    try:
        json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot load the model (config.json: {first_line(exc)})") from None
    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(weights), "pt") as f:  # the header's offsets must cover the file exactly
                f.keys()
        except (OSError, SafetensorError) as exc:
            raise ValueError(f"{path}: cannot load the model ({weights.name}: {first_line(exc)})") from None


def load(model_dir: str | Path) -> tuple[WhisperForConditionalGeneration, object]:
    """final/ or any HF Whisper directory; or a non-DeepSpeed training checkpoint."""
    path = Path(model_dir)
    if (path / "config.json").exists():
        check_model_files(path)
        try:
            return WhisperForConditionalGeneration.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{path}: cannot load the model ({first_line(exc)})") from None
    if (path / "train_config.json").exists() and (path / "model.safetensors").exists():
        from wdx.model.whisper import setup

        cfg = json.loads((path / "train_config.json").read_text())
        whisper, _ = setup(cfg["base_model"], language=cfg["language"], encoder_layers=0, decoder_layers=0,
                           conditioning=cfg.get("domain_conditioning", "token"),
                           domains=parse_domains(cfg.get("domains", ",".join(DOMAINS))))
        missing, unexpected = whisper.model.load_state_dict(load_file(path / "model.safetensors"), strict=False)
        if unexpected or set(missing) - {"proj_out.weight", "proj_out.domain_rows"}:  # tied to the embedding
            raise ValueError(f"{path}: weights do not fit {cfg['base_model']} (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        return whisper.model, whisper.tokenizer
    if (path / "pytorch_model").is_dir():
        raise ValueError(f"{path}: a DeepSpeed checkpoint; export it first: train_loop.py ... --export {path}")
    raise ValueError(f"{path}: neither a model directory (config.json) nor a training checkpoint")
