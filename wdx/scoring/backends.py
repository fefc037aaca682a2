"""The two decoding backends of wdx.transcribe and wdx.evaluate, imported only when chosen.

`hf` decodes final/ (or a training checkpoint) with torch and transformers; `ct2` decodes a
wdx.export_ct2 directory with ctranslate2, tokenizers and numpy, without importing torch or
transformers (a serving machine need not install them, and pays faster-whisper's memory, not
torch's). Both decode greedily from the same prompt and the same log-mel features.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

BACKENDS = ("hf", "ct2")


class Transcriber(Protocol):
    """What the tools need of a backend: the model's domains, its prompt, and batches of 16 kHz
    clips (at most 30 s each) to text."""

    domains: tuple[str, ...]  # () for a model without domain tokens
    has_domains: bool

    def prompt(self, domain: str) -> list[int]: ...

    def __call__(self, clips: list[np.ndarray], domains: list[str]) -> list[str]: ...


def open_transcriber(model: str | Path, backend: str = "hf", language: str = "ko", device: str = "cpu",
                     max_new_tokens: int = 225) -> Transcriber:
    if backend == "ct2":
        from wdx.scoring.ct2_inference import CT2Transcriber

        return CT2Transcriber(model, language, device, max_new_tokens)
    from wdx.model.whisper import quiet_libraries
    from wdx.scoring.inference import HFTranscriber

    quiet_libraries()  # the tools print their own lines: transformers' advisory warnings off, errors stay
    return HFTranscriber(model, language, device, max_new_tokens)


def default_device(backend: str) -> str:
    """cuda when the backend's library sees a GPU, else cpu (asked of ctranslate2 for ct2: no torch)."""
    if backend == "ct2":
        import ctranslate2

        return "cuda" if ctranslate2.get_cuda_device_count() else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
