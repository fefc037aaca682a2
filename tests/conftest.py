"""Fixtures that build real audio bytes in real tar shards, in a temp dir."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wdx.data.audio import encode_audio
from wdx.data.pack import write_split


def speechlike(seconds: float, rate: int, seed: int = 0, channels: int = 1) -> np.ndarray:
    """A voiced, formant-shaped, syllable-modulated signal: a stand-in for speech in tests."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k * np.exp(-((k * 120 - 700) / 900) ** 2) for k in range(1, 30))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6)) ** 2
    wave = (0.3 * voiced * envelope + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)
    wave = np.clip(wave, -0.95, 0.95)
    return np.stack([wave, 0.5 * wave]) if channels == 2 else wave


def make_sample(key: str, *, ext: str = "flac", rate: int = 16000, seconds: float = 1.0, text: str = "안녕하세요",
                domain: str | None = "normal", channels: int = 1, seed: int = 0, domain_in: str = "json") -> dict:
    """Tar members for one sample; `domain_in` is "json", "member" or "" (none)."""
    members = {"__key__": key, ext: encode_audio(speechlike(seconds, rate, seed, channels), rate, ext),
               "txt": text.encode("utf-8")}
    if domain is not None and domain_in == "json":
        members["json"] = json.dumps({"domain": domain, "speaker": "s1"}).encode()
    elif domain is not None and domain_in == "member":
        members["domain"] = domain.encode()
    return members


@pytest.fixture
def make_split(tmp_path):
    """make_split(split, samples, max_count=..., domain=...) -> ROOT; writes ROOT/split/."""
    root = tmp_path / "data"

    def _make(split: str, samples: list[dict], max_count: int = 1000, domain: str | None = None) -> str:
        write_split(root / split, samples, max_count=max_count, domain=domain)
        return str(root)

    return _make


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny random Whisper + Whisper-style tokenizer (timestamps missing, like real ones)."""
    from wdx.model.tiny import build

    return str(build(tmp_path_factory.mktemp("tiny") / "model"))


TEXTS = ["안녕하세요 오늘은 날씨가 맑고 따뜻합니다", "학교에 가는 길에 친구를 만났어요",
         "책을 천천히 소리 내어 읽어 보세요", "저는 사과와 배를 좋아해요"]
FORMATS = [("wav", 16000), ("flac", 44100), ("mp3", 22050), ("ogg", 8000), ("m4a", 48000)]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> str:
    """ROOT with train (24 samples, 5 shards, every format) and val_small (6 samples), both domains."""
    root = tmp_path_factory.mktemp("ds") / "data"
    train = [make_sample(f"tr{i:03d}", seed=i, seconds=1.0 + i % 3, text=TEXTS[i % 4],
                         domain=("normal", "dyslexic")[i % 2], ext=FORMATS[i % 5][0], rate=FORMATS[i % 5][1])
             for i in range(24)]
    val = [make_sample(f"va{i:03d}", seed=100 + i, seconds=1.5, text=TEXTS[i % 4], domain=("normal", "dyslexic")[i % 2])
           for i in range(6)]
    write_split(root / "train", train, max_count=5)
    write_split(root / "val_small", val, max_count=4)
    return str(root)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons that refuse a second precision; in-process
    runs with another precision (or an injected grad scaler) need them cleared."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def varied_final(base: str, out: Path) -> Path:
    """final/ of a tiny model whose random weights are large enough for the domain token and
    the audio to change the transcript (a fresh tiny model repeats one token whatever it hears)."""
    import torch

    from wdx.model.whisper import setup

    w, _ = setup(base, language="ko", encoder_layers=0, decoder_layers=0, rows_init=0.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in w.model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    for part in (w.model, w.tokenizer, w.feature_extractor):
        part.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """final/ and its export: varied_final on a tiny model with large-v3's token ids
    (CTranslate2 decides 'multilingual' by them)."""
    from wdx.deploy import export_ct2
    from wdx.model.tiny import build

    root = tmp_path_factory.mktemp("deploy")
    final = varied_final(str(build(root / "base", real_ids=True)), root / "final")
    return final, export_ct2.export(final, root / "ct2")


def same_start(ours: str, theirs: str) -> bool:
    """The random model never ends a transcript, so each side stops at its own length cap: every
    token both decoded must match."""
    short, long = sorted((ours, theirs), key=len)
    return len(short) > 100 and long.startswith(short)
