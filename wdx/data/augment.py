"""Augmentation of training samples: speed perturbation, additive noise, SpecAugment masks.

Small datasets trained for many epochs see each clip dozens of times; these give each epoch
its own version of it. Everything is drawn from a generator seeded by (seed, epoch, shard/key),
so a sample's augmentation does not depend on which worker, batch or process read it, and an
exact resume reproduces it. Evaluation is never augmented (only the training loader gets an
`Augmenter`).

- speed: the clip resampled as if played `factor` times faster (pitch and tempo together, the
  usual 0.9 / 1.0 / 1.1 three-way perturbation), one factor drawn per sample and epoch.
- noise: a recording from `noise_dir` (a random stretch, looped if short), or Gaussian noise
  when no directory is given, added at an SNR drawn uniformly from the range.
- SpecAugment: time and mel-channel masks drawn with transformers' own `_compute_mask_indices`
  (its numpy randomness seeded per sample), time masks within the clip's own frames (as
  transformers draws them under the feature extractor's attention mask, never in the
  padding), and applied to the log-mel as Whisper's `_mask_input_features` does (masked
  values set to 0). This is the only place masks come from: wdx.model.lm_head.DomainWhisper
  switches transformers' own masking off, which `apply_spec_augment` in a base model's
  config would otherwise run a second time inside the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wdx.data.audio import AUDIO_EXTENSIONS, decode_audio, resample, to_mono

log = logging.getLogger(__name__)

RATE = 16000
MAX_SAMPLES = 30 * RATE


@dataclass(frozen=True)
class SpecAugment:
    """transformers' Whisper SpecAugment settings (config.json names), applied per sample."""

    mask_time_prob: float = 0.05
    mask_time_length: int = 10
    mask_time_min_masks: int = 2
    mask_feature_prob: float = 0.0
    mask_feature_length: int = 10
    mask_feature_min_masks: int = 0

    @classmethod
    def from_config(cls, config) -> SpecAugment | None:
        """The base model's own SpecAugment, when its config switches it on (None otherwise)."""
        if not getattr(config, "apply_spec_augment", False):
            return None
        spec = cls(**{f: getattr(config, f) for f in cls.__dataclass_fields__ if getattr(config, f, None) is not None})
        return spec if spec.mask_time_prob > 0 or spec.mask_feature_prob > 0 else None


@dataclass(frozen=True)
class Augmenter:
    seed: int
    speeds: tuple[float, ...] = ()
    snr_db: tuple[float, float] | None = None
    noise: tuple[np.ndarray, ...] = ()  # 16 kHz mono recordings; empty: Gaussian noise
    spec: SpecAugment | None = None
    n_mels: int = 80

    def rng(self, epoch: int, sample: dict) -> np.random.Generator:
        name = f"{self.seed}/{epoch}/{sample.get('shard', '')}/{sample['key']}"
        return np.random.default_rng(int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little"))

    def __call__(self, sample: dict, epoch: int) -> dict:
        """A training sample (16 kHz `audio`) -> its augmented version for `epoch`; labels untouched."""
        rng = self.rng(epoch, sample)
        audio = sample["audio"]
        if self.speeds:
            factor = float(rng.choice(self.speeds))
            if factor != 1.0 and len(audio) / factor <= MAX_SAMPLES:  # never past Whisper's 30 s (never trimmed)
                audio = resample(audio, round(RATE * factor), RATE)
        if self.snr_db is not None:
            audio = add_noise(audio, rng, rng.uniform(*self.snr_db), self.noise)
        out = {**sample, "audio": audio.astype(np.float32, copy=False)}
        if self.spec is not None:
            from wdx.data.features import (
                HOP_LENGTH,  # here: features imports torch, which the audio-only paths never need
            )

            out["spec_masks"] = spec_masks(self.spec, rng, self.n_mels, length=-(-len(audio) // HOP_LENGTH))
        return out


def add_noise(audio: np.ndarray, rng: np.random.Generator, snr_db: float, noise: tuple[np.ndarray, ...]) -> np.ndarray:
    """`audio` plus noise scaled to `snr_db` against the clip's power."""
    if noise:
        source = noise[int(rng.integers(len(noise)))]
        start = int(rng.integers(len(source)))
        n = np.resize(np.roll(source, -start), len(audio))  # a random stretch, looped
    else:
        n = rng.standard_normal(len(audio)).astype(np.float32)
    power = float(np.mean(audio.astype(np.float64) ** 2))
    noise_power = float(np.mean(n.astype(np.float64) ** 2)) or 1.0
    gain = np.sqrt(power / (noise_power * 10 ** (snr_db / 10)))
    return (audio + gain * n).astype(np.float32)


@contextlib.contextmanager
def _numpy_seeded(seed: int):
    """transformers' mask sampler draws from numpy's global generator: seed it for one call."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def spec_masks(spec: SpecAugment, rng: np.random.Generator, n_mels: int, frames: int = 3000,
               length: int | None = None) -> dict[str, np.ndarray]:
    """{"time": bool [frames], "feature": bool [n_mels]}: what to zero in this sample's log-mel.
    Time masks fall within the first `length` frames (the clip's; default: all)."""
    import torch
    from transformers.models.whisper.modeling_whisper import _compute_mask_indices

    out = {"time": np.zeros(frames, bool), "feature": np.zeros(n_mels, bool)}
    valid = torch.zeros(1, frames, dtype=torch.long)
    valid[0, : frames if length is None else max(1, min(length, frames))] = 1
    with _numpy_seeded(int(rng.integers(2**32))):
        if spec.mask_time_prob > 0:
            out["time"] = _compute_mask_indices((1, frames), spec.mask_time_prob, spec.mask_time_length,
                                                attention_mask=valid, min_masks=spec.mask_time_min_masks)[0]
        if spec.mask_feature_prob > 0:
            out["feature"] = _compute_mask_indices((1, n_mels), spec.mask_feature_prob, spec.mask_feature_length,
                                                   min_masks=spec.mask_feature_min_masks)[0]
    return out


def load_noise(directory: str | Path) -> tuple[np.ndarray, ...]:
    """Every audio file under `directory`, as 16 kHz mono float32; a ValueError names an empty one."""
    paths = sorted(p for p in Path(directory).rglob("*") if p.suffix.lower().lstrip(".") in AUDIO_EXTENSIONS)
    if not paths:
        raise ValueError(f"--noise-dir {directory}: no audio files ({', '.join(AUDIO_EXTENSIONS)})")
    clips = []
    for path in paths:
        frames, rate = decode_audio(path.read_bytes(), path.suffix.lower().lstrip("."))
        wave = resample(to_mono(frames), rate, RATE)
        if len(wave) and np.any(wave):
            clips.append(wave.astype(np.float32))
    if not clips:
        raise ValueError(f"--noise-dir {directory}: every file is empty or silent")
    return tuple(clips)


def build(cfg, model_config) -> Augmenter | None:
    """The run's augmentation from its flags (TrainConfig) and the base model's config; None
    when everything is off. A base config that switches SpecAugment on is honoured, and said."""
    spec = None
    if cfg.spec_augment:
        spec = SpecAugment(mask_time_prob=cfg.mask_time_prob, mask_time_length=cfg.mask_time_length,
                           mask_feature_prob=cfg.mask_feature_prob, mask_feature_length=cfg.mask_feature_length)
    elif cfg.spec_augment is None:
        spec = SpecAugment.from_config(model_config)
        if spec:
            log.info("SpecAugment from --base-model's config (apply_spec_augment): %s; --no-spec-augment turns it off",
                     spec)
    if not (cfg.speeds or cfg.snr_range or spec):
        return None
    noise = load_noise(cfg.noise_dir) if cfg.noise_dir else ()  # OSError, ValueError: name --noise-dir's file
    log.info("augmentation of training samples: speeds %s, noise %s, SpecAugment %s", cfg.speeds or "off",
             f"{cfg.snr_range} dB SNR, {len(noise) or 'Gaussian'}{' recordings' if noise else ''}"
             if cfg.snr_range else "off", spec or "off")
    return Augmenter(cfg.seed, cfg.speeds, cfg.snr_range, noise, spec, model_config.num_mel_bins)
