"""Recordings longer than Whisper's 30 s window: cut at pauses, decode each piece, join.

Reading aloud pauses between phrases, so the cut goes to the quietest stretch of the last
`search` seconds before each 30 s limit. Pieces do not overlap: there is no seam to merge
and no word decoded twice. A piece with no pause in that stretch is cut at the limit (a
word may then be split; the log says so).
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

WINDOW_S = 30.0  # Whisper's encoder input
SEARCH_S = 10.0  # where a cut is looked for, before each limit
FRAME_S = 0.05  # energy resolution
QUIET_S = 0.3  # a pause: this long below the clip's quiet level


def split_at_pauses(audio: np.ndarray, rate: int = 16000, window_s: float = WINDOW_S,
                    search_s: float = SEARCH_S) -> list[tuple[int, int]]:
    """[start, stop) sample ranges, each at most `window_s` long, covering `audio` end to end."""
    if len(audio) <= window_s * rate:
        return [(0, len(audio))]
    frame = int(FRAME_S * rate)
    energy = np.sqrt(np.mean(np.reshape(audio[: len(audio) // frame * frame], (-1, frame)) ** 2, axis=1))
    run = max(1, int(QUIET_S / FRAME_S))
    smooth = np.convolve(energy, np.ones(run) / run, mode="same")  # quietest 0.3 s, not one quiet frame
    quiet = np.percentile(energy, 10) * 2 + 1e-6
    pieces, start = [], 0
    while len(audio) - start > window_s * rate:
        lo, hi = (start + int((window_s - search_s) * rate)) // frame, (start + int(window_s * rate)) // frame
        best = lo + int(np.argmin(smooth[lo:hi]))
        if smooth[best] > quiet:
            log.warning("no pause in %.0f-%.0f s: cut inside speech", start / rate + window_s - search_s,
                        start / rate + window_s)
        cut = best * frame
        pieces.append((start, cut))
        start = cut
    pieces.append((start, len(audio)))
    return pieces


def transcribe_long(transcriber, clips: list[np.ndarray], domains: list[str], batch_size: int,
                    rate: int = 16000) -> list[str]:
    """Like `transcriber(clips, domains)`, for clips of any length: every piece is decoded with
    its clip's domain prompt, `batch_size` pieces at a time, and a clip's texts are joined
    with a space."""
    pieces, owner = [], []
    for i, clip in enumerate(clips):
        for a, b in split_at_pauses(clip, rate):
            pieces.append(clip[a:b])
            owner.append(i)
    texts = []
    for k in range(0, len(pieces), batch_size):
        texts += transcriber(pieces[k: k + batch_size], [domains[i] for i in owner[k: k + batch_size]])
    joined = [[] for _ in clips]
    for i, text in zip(owner, texts):
        if text:
            joined[i].append(text)
    return [" ".join(parts) for parts in joined]
