"""wdx.scoring.longform: recordings longer than 30 s, cut at pauses, every piece prompted."""

import numpy as np

from tests.conftest import speechlike
from wdx.data.audio import encode_audio
from wdx.scoring import transcribe
from wdx.scoring.longform import split_at_pauses, transcribe_long

RATE = 16000


def reading(phrases_s: list[float], pause_s: float = 0.8) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Phrases of speech-like sound separated by silent pauses; returns audio and the pauses."""
    parts, pauses, at = [], [], 0
    for i, seconds in enumerate(phrases_s):
        parts.append(speechlike(seconds, RATE, seed=i))
        at += len(parts[-1])
        parts.append(np.zeros(int(pause_s * RATE), dtype=np.float32))
        pauses.append((at, at + len(parts[-1])))
        at += len(parts[-1])
    return np.concatenate(parts), pauses


def test_a_long_reading_is_cut_inside_pauses_into_pieces_whisper_takes():
    audio, pauses = reading([4.0, 7.5, 6.0, 9.0, 5.5, 8.0, 6.5, 7.0, 5.0, 8.5])  # 77 s
    pieces = split_at_pauses(audio, RATE)
    assert pieces[0][0] == 0 and pieces[-1][1] == len(audio)
    assert all(a == prev_b for (_, prev_b), (a, _) in zip(pieces, pieces[1:]))  # no gap, no overlap
    assert all(b - a <= 30 * RATE for a, b in pieces) and len(pieces) == 3
    for _, cut in pieces[:-1]:
        assert any(lo <= cut <= hi for lo, hi in pauses), cut / RATE  # never inside a phrase


def test_speech_without_any_pause_is_still_cut_to_the_window():
    audio = speechlike(65.0, RATE)
    pieces = split_at_pauses(audio, RATE)
    assert all(b - a <= 30 * RATE for a, b in pieces) and pieces[-1][1] == len(audio)


def test_every_piece_gets_its_clips_domain_and_texts_join_in_order():
    calls = []

    def fake(clips, domains):
        calls.append(domains)
        return [f"{d}:{len(c) // RATE}" for c, d in zip(clips, domains)]

    long_clip, _ = reading([8.0] * 6)  # 52.8 s: 2 pieces
    short_clip = speechlike(2.0, RATE)
    out = transcribe_long(fake, [long_clip, short_clip], ["dyslexic", "normal"], batch_size=2)
    assert [d for batch in calls for d in batch] == ["dyslexic", "dyslexic", "normal"]
    assert len(out) == 2 and out[0].count("dyslexic:") == 2 and out[1] == "normal:2"


def test_transcribe_takes_a_68_second_file(tiny_model, tmp_path, capsys):
    from wdx.model.whisper import setup

    audio, _ = reading([6.0] * 10)
    path = tmp_path / "long.flac"
    path.write_bytes(encode_audio(audio, RATE, "flac"))
    final = tmp_path / "final"
    w, _ = setup(tiny_model, language="ko", encoder_layers=0, decoder_layers=0)
    w.model.save_pretrained(final)
    w.tokenizer.save_pretrained(final)
    assert transcribe.main([str(final), str(path), "--max-new-tokens", "2"]) == 0  # main: "68.0 s of audio", exit 1
    assert capsys.readouterr().out.startswith(f"{path}\t[normal] ")
