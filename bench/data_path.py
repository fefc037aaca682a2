"""Data path, one worker process: this project's stages vs the usual per-sample path.

usual: soundfile (PyAV for m4a) -> mono -> torchaudio Resample built per sample ->
       WhisperFeatureExtractor per sample -> stack
wdx:   wdx.data.pipeline.decode_sample (cached resampling kernel) -> pad -> batched log-mel (torch)
"""

from __future__ import annotations

import io
import time

import numpy as np
import soundfile as sf
import torch
import torchaudio
from transformers import WhisperFeatureExtractor

from wdx.data.audio import decode_audio, to_mono
from wdx.data.features import log_mel
from wdx.data.pipeline import decode_sample, pad_audio


def usual(raw_samples: list[dict], fe: WhisperFeatureExtractor, timers: dict) -> torch.Tensor:
    feats = []
    for raw in raw_samples:
        ext = next(e for e in ("wav", "flac", "mp3", "ogg", "m4a") if e in raw)
        t0 = time.perf_counter()
        if ext == "m4a":  # soundfile cannot read AAC; the usual scripts reach for FFmpeg here
            frames, rate = decode_audio(raw[ext], ext)
            wave = torch.from_numpy(to_mono(frames))
        else:
            data, rate = sf.read(io.BytesIO(raw[ext]), dtype="float32", always_2d=True)
            wave = torch.from_numpy(data.mean(axis=1))
        t1 = time.perf_counter()
        if rate != 16000:
            wave = torchaudio.transforms.Resample(rate, 16000)(wave)
        t2 = time.perf_counter()
        feats.append(fe(wave.numpy(), sampling_rate=16000, return_tensors="pt").input_features[0])
        t3 = time.perf_counter()
        timers["decode"] += t1 - t0
        timers["resample"] += t2 - t1
        timers["log-mel"] += t3 - t2
    t = time.perf_counter()
    out = torch.stack(feats)
    timers["collate"] += time.perf_counter() - t
    return out


def ours(raw_samples: list[dict], n_mels: int, timers: dict, batch: int = 8) -> list[torch.Tensor]:
    outs = []
    for i in range(0, len(raw_samples), batch):
        t0 = time.perf_counter()
        samples = [decode_sample(r, target_sr=16000, split_domain=None, default_domain="normal")
                   for r in raw_samples[i: i + batch]]
        t1 = time.perf_counter()
        audio = pad_audio(samples)
        t2 = time.perf_counter()
        outs.append(log_mel(audio, n_mels))
        t3 = time.perf_counter()
        timers["decode+resample"] += t1 - t0
        timers["collate"] += t2 - t1
        timers["log-mel"] += t3 - t2
    return outs


def bench(raw_samples: list[dict], repeats: int, n_mels: int = 80) -> dict:
    """Median samples/s of each path over `repeats`, with the per-stage split of the median run."""
    torch.set_num_threads(1)  # one loader worker = one core
    fe = WhisperFeatureExtractor(feature_size=n_mels)
    results = {}
    for name, fn in (("usual", lambda t: usual(raw_samples, fe, t)), ("wdx", lambda t: ours(raw_samples, n_mels, t))):
        runs = []
        for _ in range(repeats):
            timers = {k: 0.0 for k in ("decode", "resample", "decode+resample", "log-mel", "collate")}
            t0 = time.perf_counter()
            fn(timers)
            runs.append((time.perf_counter() - t0, {k: v for k, v in timers.items() if v}))
        runs.sort(key=lambda r: r[0])
        seconds, stages = runs[len(runs) // 2]
        results[name] = {"samples_per_s": len(raw_samples) / seconds, "seconds": seconds,
                         "stages_s": stages}
    results["ratio"] = results["wdx"]["samples_per_s"] / results["usual"]["samples_per_s"]
    return results


def check_same_features(raw_samples: list[dict], n_mels: int = 80) -> float:
    """Both paths must compute the same thing: max abs difference of their log-mels."""
    fe = WhisperFeatureExtractor(feature_size=n_mels)
    a = usual(raw_samples[:4], fe, {k: 0.0 for k in ("decode", "resample", "log-mel", "collate")})
    b = torch.cat(ours(raw_samples[:4], n_mels, {k: 0.0 for k in ("decode+resample", "log-mel", "collate")}))
    return float((a - b).abs().max())


if __name__ == "__main__":
    from bench.inputs import make_raw_samples

    raw = make_raw_samples(8)
    print(check_same_features(raw), bench(raw, 1))
    np.set_printoptions()
