"""Audio bytes -> mono float32 at the target rate; and the reverse, for packing and tests.

soundfile (libsndfile in its wheel) decodes wav/flac/ogg/mp3; PyAV (FFmpeg in its wheel)
decodes m4a/aac/opus/webm and anything libsndfile rejects. torchaudio >= 2.9 no longer decodes
files itself, so it is used for resampling only (DESIGN.md).
"""

from __future__ import annotations

import functools
import io
import tempfile
from pathlib import Path

import av
import numpy as np
import soundfile as sf

AUDIO_EXTENSIONS: tuple[str, ...] = ("wav", "flac", "mp3", "ogg", "m4a", "opus", "webm", "aac")
_SOUNDFILE_EXTENSIONS = {"wav", "flac", "mp3", "ogg"}
_SOUNDFILE_FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS"),
                      "mp3": ("MP3", "MPEG_LAYER_III")}


# encoded through PyAV (FFmpeg): container format and codec; opus takes 8/12/16/24/48 kHz only
_AV_FORMATS = {"m4a": ("mp4", "aac"), "aac": ("adts", "aac"), "opus": ("ogg", "libopus"), "webm": ("webm", "libopus")}


PCM = "pcm"  # headerless 16-bit little-endian mono (KsponSpeech): only its stated rate says what it is


class AudioDecodeError(ValueError):
    """The bytes are not audio that either decoder can read."""


def decode_pcm(data: bytes, rate: int) -> tuple[np.ndarray, int]:
    """Headerless 16-bit little-endian mono at `rate` -> float32 [1, frames], as decode_audio returns."""
    if len(data) % 2:
        raise AudioDecodeError(f"{len(data)} bytes of .pcm: an odd count cannot be 16-bit samples")
    return (np.frombuffer(data, "<i2").astype(np.float32) / 32768.0)[None, :], rate


def pcm_to_wav(data: bytes, rate: int) -> bytes:
    """The same samples with a WAV header (lossless), so every reader knows the rate."""
    if len(data) % 2:
        raise AudioDecodeError(f"{len(data)} bytes of .pcm: an odd count cannot be 16-bit samples")
    buf = io.BytesIO()
    sf.write(buf, np.frombuffer(data, "<i2"), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def decode_audio(data: bytes, ext: str) -> tuple[np.ndarray, int]:
    """Decode `data` to float32 of shape [channels, frames] and its sample rate."""
    if ext in _SOUNDFILE_EXTENSIONS:
        try:
            frames, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
            return np.ascontiguousarray(frames.T), int(rate)
        except (sf.LibsndfileError, RuntimeError, TypeError):
            pass  # e.g. a mislabelled m4a: let FFmpeg have a go before giving up
    return _decode_with_av(data, ext)


def _decode_with_av(data: bytes, ext: str) -> tuple[np.ndarray, int]:
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise AudioDecodeError(f"no audio stream in .{ext} bytes")
            stream = container.streams.audio[0]
            # Planar float keeps every codec's samples in one layout: [channels, frames].
            resampler = av.AudioResampler(format="fltp", layout=stream.layout.name, rate=stream.rate)
            chunks = [out.to_ndarray() for frame in container.decode(stream) for out in resampler.resample(frame)]
            chunks += [out.to_ndarray() for out in resampler.resample(None)]
            rate = stream.rate
    except (av.FFmpegError, ValueError, IndexError, EOFError) as exc:
        raise AudioDecodeError(f"cannot decode .{ext} bytes: {exc}") from None
    if not chunks:
        return np.zeros((1, 0), np.float32), int(rate)
    return np.concatenate(chunks, axis=1).astype(np.float32, copy=False), int(rate)


def to_mono(frames: np.ndarray) -> np.ndarray:
    """Average channels: [channels, n] -> [n]."""
    return frames[0] if frames.shape[0] == 1 else frames.mean(axis=0, dtype=np.float32)


SILENCE_PEAK = 1e-4  # -80 dBFS: a transcript paired with digital silence is a labelling error


def unusable(wave: np.ndarray) -> str | None:
    """Why a mono clip holds no speech to learn from or transcribe ("reason: detail"), or None.

    Non-finite samples would turn the log-mel into NaN; a clip whose every sample is within
    -80 dBFS of its mean is digital silence, a constant (DC) offset included.
    """
    if not np.isfinite(wave).all():
        return "nonfinite_audio: NaN or inf samples"
    if wave.size == 0 or np.abs(wave - wave.mean()).max() < SILENCE_PEAK:
        return "silent_audio: no signal above -80 dBFS (digital silence or a constant offset)"
    return None


@functools.lru_cache(maxsize=32)
def _resampler(orig_sr: int, new_sr: int):
    # Building the sinc kernel costs more than applying it to a short clip, so it is
    # built once per rate pair and per process (each loader worker has its own cache).
    import torchaudio  # here, not at the top: decoding (wdx.pack's workers) must not pay ~800 MB for torch

    return torchaudio.transforms.Resample(orig_sr, new_sr)


def resample(wave: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Resample a mono float32 signal; a no-op when the rates agree."""
    if orig_sr == new_sr:
        return wave
    import torch

    with torch.no_grad():
        return _resampler(orig_sr, new_sr)(torch.from_numpy(wave)).numpy()


def resample_ffmpeg(wave: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """`resample` without torch: FFmpeg's resampler (libswresample), as faster-whisper's
    decode_audio uses; for the torch-free ct2 backend (within ~1e-3 of torchaudio's)."""
    if orig_sr == new_sr:
        return wave
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave, dtype=np.float32)[None, :], format="flt",
                                       layout="mono")
    frame.sample_rate = orig_sr
    resampler = av.AudioResampler(format="flt", layout="mono", rate=new_sr)
    out = [f.to_ndarray()[0] for f in resampler.resample(frame) + resampler.resample(None)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def encode_audio(wave: np.ndarray, rate: int, ext: str) -> bytes:
    """Encode float32 audio ([n] or [channels, n]) in `ext` format, for packing and tests."""
    frames = wave[None, :] if wave.ndim == 1 else wave
    buf = io.BytesIO()
    if ext in _SOUNDFILE_FORMATS:
        fmt, subtype = _SOUNDFILE_FORMATS[ext]
        sf.write(buf, frames.T, rate, format=fmt, subtype=subtype)
        return buf.getvalue()
    if ext not in _AV_FORMATS:
        raise ValueError(f"cannot encode .{ext}: expected one of {', '.join(AUDIO_EXTENSIONS)}")
    container_format, codec = _AV_FORMATS[ext]
    if ext != "m4a":
        _encode_with_av(buf, frames, rate, container_format, codec)
        return buf.getvalue()
    # m4a: the index (moov) goes in front ("faststart"), or a reader that streams the file
    # (ffmpeg from a pipe, as transformers' pipeline reads a path) cannot decode it. The muxer
    # moves it by rewriting the file, which it cannot do in memory.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"audio.{ext}"
        _encode_with_av(str(path), frames, rate, container_format, codec, {"movflags": "+faststart"})
        return path.read_bytes()


def _encode_with_av(target, frames: np.ndarray, rate: int, container_format: str, codec: str,
                    options: dict | None = None) -> None:
    layout = "mono" if frames.shape[0] == 1 else "stereo"
    with av.open(target, mode="w", format=container_format, options=options or {}) as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(frames, np.float32), format="fltp", layout=layout)
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
