"""Benchmark inputs: real (espeak-ng) Korean speech, 5-15 s, in the usual mix of formats."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from wdx.data.audio import encode_audio, resample
from wdx.data.pack import write_split
from wdx.demo import data as demo_data
from wdx.demo.tts import espeak

# (extension, sample rate, channels): the realistic mix named in the benchmark issue
MIX = [("wav", 44100, 2), ("flac", 16000, 1), ("mp3", 22050, 1), ("m4a", 48000, 1)]


def utterance(i: int, seconds_range=(5.0, 15.0)) -> tuple[np.ndarray, str]:
    """Sentences read one after another until the clip is 5-15 s long."""
    rng = random.Random(f"bench-{i}")
    target = rng.uniform(*seconds_range)
    pool = demo_data.sentences(seed=1)
    pieces, words, total = [], [], 0.0
    tts = espeak()
    while total < target:
        sentence = pool[rng.randrange(len(pool))]
        audio = tts.say(" ".join(sentence), voice=rng.choice(demo_data.SEEN.variants), rate=rng.randint(140, 180))
        if total + len(audio) / tts.rate > seconds_range[1]:
            break
        pieces.append(audio)
        words += sentence
        total += len(audio) / tts.rate
    return np.concatenate(pieces), " ".join(words)


def make_raw_samples(n: int) -> list[dict]:
    """n tar-member dicts, formats rotating through MIX."""
    samples = []
    for i in range(n):
        audio, text = utterance(i)
        ext, rate, channels = MIX[i % len(MIX)]
        audio = resample(audio, espeak().rate, rate)
        if channels == 2:
            audio = np.stack([audio, audio * 0.9])
        samples.append({"__key__": f"b{i:05d}", ext: encode_audio(audio, rate, ext), "txt": text.encode(),
                        "json": b'{"domain": "%s"}' % (b"normal" if i % 2 else b"dyslexic")})
    return samples


def make_dataset(root: Path, n_train: int, n_val: int = 4) -> Path:
    if not (root / "val_small" / "metadata.json").exists():
        samples = make_raw_samples(n_train + n_val)
        write_split(root / "train", samples[:n_train], max_count=max(4, n_train // 4))
        write_split(root / "val_small", samples[n_train:])
    return root
