"""The `ct2` backend: a wdx.export_ct2 directory decoded as the HF model is, without torch.

ctranslate2 runs the model, `tokenizers` reads the export's tokenizer.json, and the log-mel
is faster-whisper's numpy one over the clip padded to 30 s (the same numbers as
`wdx.data.features.log_mel`, within float32 rounding). Nothing here imports torch or transformers.

ctranslate2 returns the prompt tokens after <|notimestamps|> (here the domain token) at the
start of each result, and caps a result at half of `max_length` (OpenAI's sample length rule,
CTranslate2 issue #2074): hence max_length = 2 x (new tokens + 1), which limits one call to
223 new tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from wdx.model.domains import check_prompt_domain, model_domains, prompt_tokens


class CT2Transcriber:
    """A CTranslate2 Whisper export + its tokenizer; `__call__` transcribes a batch of 16 kHz clips greedily."""

    def __init__(self, model_dir: str | Path, language: str = "ko", device: str = "cpu",
                 max_new_tokens: int = 225) -> None:
        import ctranslate2
        import tokenizers
        from faster_whisper.feature_extractor import FeatureExtractor

        path = Path(model_dir)
        if not (path / "model.bin").is_file():
            raise ValueError(f"{path}: no model.bin; not a CTranslate2 export (python -m wdx.export_ct2 FINAL OUT)")
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"{path}: no tokenizer.json next to the CTranslate2 model")
        kind, _, index = device.partition(":")
        self.model = ctranslate2.models.Whisper(str(path), device=kind, device_index=int(index or 0))
        self.tokenizer = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        self.log_mel = FeatureExtractor(feature_size=self.model.n_mels)
        config = json.loads((path / "config.json").read_text())
        self.suppress_blank = bool(config.get("suppress_ids_begin"))  # HF's begin_suppress_tokens
        prompts = path / "domain_prompts.json"  # wdx.export_ct2's record of the domains (or "none")
        names = list(json.loads(prompts.read_text())) if prompts.is_file() else []
        recorded = {"domain_conditioning": "none"} if names == ["none"] else {"domains": names}
        self.domains = model_domains(recorded, self.tokenizer.get_vocab(with_added_tokens=True))
        self.has_domains = bool(self.domains)
        self.language, self.max_new_tokens = language, max_new_tokens
        self.no_timestamps = self.tokenizer.token_to_id("<|notimestamps|>")

    def prompt(self, domain: str) -> list[int]:
        check_prompt_domain(self.domains, domain)
        tokens = prompt_tokens(self.language, domain if self.has_domains else None)
        ids = [self.tokenizer.token_to_id(t) for t in tokens]
        if None in ids:
            raise ValueError(f"tokenizer lacks one of {tokens}")
        return ids

    def features(self, clip: np.ndarray) -> np.ndarray:
        window = self.log_mel.n_samples  # Whisper's 30 s, as faster-whisper's extractor holds it
        if len(clip) > window:
            raise ValueError(f"audio of {len(clip)} samples is longer than 30 s; it must be cut (wdx.scoring.longform)")
        return self.log_mel(np.pad(np.asarray(clip, np.float32), (0, window - len(clip))), padding=0)

    def __call__(self, clips: list[np.ndarray], domains: list[str]) -> list[str]:
        import ctranslate2

        prompts = [self.prompt(d) for d in domains]
        features = np.ascontiguousarray(np.stack([self.features(c) for c in clips]), dtype=np.float32)
        results = self.model.generate(ctranslate2.StorageView.from_array(features), prompts, beam_size=1,
                                      max_length=min(448, 2 * (self.max_new_tokens + 1)),
                                      suppress_blank=self.suppress_blank, suppress_tokens=[-1])
        new = []
        for prompt, result in zip(prompts, results):
            ids = result.sequences_ids[0]
            echoed = prompt[prompt.index(self.no_timestamps) + 1:]
            new.append(ids[len(echoed):] if ids[:len(echoed)] == echoed else ids)
        return [t.strip() for t in self.tokenizer.decode_batch(new, skip_special_tokens=True)]
