"""The files a user names on a tool's command line (audio, text, the --json output), read or
checked with a one-line error that names them.

Needs neither torch nor transformers: wdx.transcribe's ct2 backend runs on it. `read_clip`
resamples with torchaudio (as training does) or, with `lean=True`, with FFmpeg's resampler
(as faster-whisper does), importing no torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from wdx.data.audio import (
    AUDIO_EXTENSIONS,
    AudioDecodeError,
    decode_audio,
    resample,
    resample_ffmpeg,
    to_mono,
    unusable,
)


class InputError(ValueError):
    """An input file or list entry that cannot be evaluated (names it)."""


def read_clip(path: str | Path, target_sr: int = 16000, lean: bool = False):
    """A file's audio as mono float32 at `target_sr`, any length (wdx.scoring.longform cuts what is
    longer than Whisper's 30 s into pieces); `lean`: resampled without torch."""
    path = Path(path)
    ext = path.suffix.lower().lstrip(".")
    if ext not in AUDIO_EXTENSIONS:
        raise InputError(f"{path}: unsupported format .{ext} (expected {', '.join(AUDIO_EXTENSIONS)})")
    try:
        frames, rate = decode_audio(path.read_bytes(), ext)
    except (OSError, AudioDecodeError) as exc:
        raise InputError(f"{path}: {exc}") from None
    if frames.shape[1] == 0:
        raise InputError(f"{path}: no audio")
    wave = to_mono(frames)
    problem = unusable(wave)  # training skips such clips; a transcript of them would be noise
    if problem:
        raise InputError(f"{path}: {problem}")
    return (resample_ffmpeg if lean else resample)(wave, rate, target_sr)


def read_text(path: Path) -> str:
    """A UTF-8 text file (a byte-order mark dropped, as editors on Windows write it), or an InputError naming it."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror}") from None


def check_output(path: Path | None, flag: str = "--json") -> None:
    """Fail before any work when results could not be written at the end."""
    if path is None:
        return
    if path.is_dir():
        raise InputError(f"{flag} {path}: is a directory; name a file")
    if not path.parent.is_dir():
        raise InputError(f"{flag} {path}: directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise InputError(f"{flag} {path}: directory {path.parent} is not writable")


def check_domain_flags(transcriber, model, flags: list[str], domain: str | None = None) -> None:
    """A model without domain tokens (trained with --domain-conditioning none, or a plain
    Whisper) cannot be asked for a domain prompt, nor one for a domain it was not trained
    with: one line, not a silent 4-token prompt."""
    if flags and not transcriber.has_domains:
        raise InputError(f"{model}: has no domain token (trained with --domain-conditioning none, or not by "
                         f"train_loop.py); drop {' and '.join(flags)}")
    if domain is not None and transcriber.has_domains and domain not in transcriber.domains:
        raise InputError(f"--domain {domain}: {model} knows {', '.join(transcriber.domains)}")


def check_item_domains(transcriber, items: list[dict], where: Path) -> None:
    """Every listed clip's domain must be one the model was trained with (any, for a model without tokens)."""
    unknown = sorted({i["domain"] for i in items} - set(transcriber.domains)) if transcriber.has_domains else []
    if unknown:
        raise InputError(f"{where}: unknown domain {unknown[0]!r} (the model knows {', '.join(transcriber.domains)})")
