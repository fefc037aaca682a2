"""Loading a trained model and transcribing batches with the domain prompt.

Accepts `final/` (a standard HF directory), a training checkpoint (`step-XXXXXXX`, written
by accelerate.save_state: weights only, rebuilt on the base model named in its
train_config.json), or with `backend="ct2"` a CTranslate2 export (`wdx.export_ct2`). A base
model without domain tokens is prompted without one. Both backends decode greedily from
the same five-token prompt, the same log-mel features and the same suppressed tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, WhisperForConditionalGeneration

from .collate import prompt_ids
from .domains import DOMAINS, model_domains, parse_domains
from .evaluation import generate
from .features import log_mel

BACKENDS = ("hf", "ct2")


class Transcriber:
    """model + tokenizer + prompts; `__call__` transcribes a batch of 16 kHz clips."""

    def __init__(self, model_dir: str | Path, language: str = "ko", device: str = "cpu",
                 max_new_tokens: int = 225, backend: str = "hf") -> None:
        self.backend = backend
        if backend == "ct2":
            self.tokenizer = load_ct2_tokenizer(Path(model_dir))
            self.model = CT2Whisper(Path(model_dir), device, self.tokenizer.convert_tokens_to_ids("<|notimestamps|>"))
        else:
            self.model, self.tokenizer = load(model_dir)
            self.model.to(device).eval()
        self.device, self.language, self.max_new_tokens = torch.device(device), language, max_new_tokens
        config = getattr(self.model, "config", None) or {}
        self.domains = model_domains(config, self.tokenizer.get_vocab())  # () for a base model: no domain token
        self.has_domains = bool(self.domains)

    def prompt(self, domain: str) -> list[int]:
        if self.has_domains and domain not in self.domains:
            raise ValueError(f"domain {domain!r}: this model knows {', '.join(self.domains)}")
        return prompt_ids(self.tokenizer, self.language, domain if self.has_domains else None)

    @torch.no_grad()
    def __call__(self, clips: list[np.ndarray], domains: list[str]) -> list[str]:
        audio = torch.zeros(len(clips), max(len(c) for c in clips))
        for i, c in enumerate(clips):
            audio[i, : len(c)] = torch.as_tensor(c)
        prompts = [self.prompt(d) for d in domains]
        if self.backend == "ct2":
            features = log_mel(audio, self.model.n_mels, torch.float32)
            new = self.model.generate(features.numpy(), prompts, self.max_new_tokens)
        else:
            features = log_mel(audio.to(self.device), self.model.config.num_mel_bins, self.model.dtype)
            new = generate(self.model, features, torch.tensor(prompts, device=self.device), self.max_new_tokens)
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


class CT2Whisper:
    """A CTranslate2 Whisper export, decoded greedily as `evaluation.generate` decodes.

    ctranslate2 returns the prompt tokens after <|notimestamps|> (here the domain token) at
    the start of each result, and caps a result at half of `max_length` (OpenAI's sample
    length rule, CTranslate2 issue #2074): hence max_length = 2 x (new tokens + 1), which
    limits one call to 223 new tokens.
    """

    def __init__(self, path: Path, device: str, no_timestamps: int) -> None:
        import ctranslate2

        self.model = ctranslate2.models.Whisper(str(path), device=device)
        self.n_mels = self.model.n_mels
        config = json.loads((path / "config.json").read_text())
        self.suppress_blank = bool(config.get("suppress_ids_begin"))  # HF's begin_suppress_tokens
        self.no_timestamps = no_timestamps
        prompts = path / "domain_prompts.json"  # wdx.export_ct2's record of the domains (or "none")
        names = list(json.loads(prompts.read_text())) if prompts.is_file() else []
        self.config = {"domain_conditioning": "none"} if names == ["none"] else {"domains": names}

    def generate(self, features: np.ndarray, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        import ctranslate2

        results = self.model.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(features)), prompts,
                                      beam_size=1, max_length=min(448, 2 * (max_new_tokens + 1)),
                                      suppress_blank=self.suppress_blank, suppress_tokens=[-1])
        out = []
        for prompt, result in zip(prompts, results):
            ids = result.sequences_ids[0]
            prefix = prompt[prompt.index(self.no_timestamps) + 1:] if self.no_timestamps in prompt else []
            out.append(ids[len(prefix):] if ids[:len(prefix)] == prefix else ids)
        return out


def load_ct2_tokenizer(path: Path):
    """The tokenizer.json a CTranslate2 export carries (wdx.export_ct2 copies it)."""
    from transformers import PreTrainedTokenizerFast

    if not (path / "model.bin").is_file():
        raise ValueError(f"{path}: no model.bin; not a CTranslate2 export (python -m wdx.export_ct2 FINAL OUT)")
    if not (path / "tokenizer.json").is_file():
        raise ValueError(f"{path}: no tokenizer.json next to the CTranslate2 model")
    return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), unk_token="<|endoftext|>")


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
        from .model import setup

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
