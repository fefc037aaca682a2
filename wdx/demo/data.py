"""A small Korean two-domain dataset, spoken by espeak-ng, in the documented format.

    python -m wdx.demo.data OUT_ROOT [--train 160] [--val 40] [--seed 0]

Three splits: `train`; `val_small`, new sentences read by the training voices; and
`val_unseen`, other new sentences read by voices never used in training (other espeak-ng
variants, pitch and speed outside the training ranges): what the model learnt about the
speech, not about a voice.

Sentences are drawn from word pools written for this project (time, subject, place,
object, verb), so held-out sentences in val_small are new combinations of known words.
"dyslexic" samples simulate reading errors reported for Korean dyslexic readers, at the
text level, and the transcript is what was *said*: syllable repetitions, hesitations and
fillers, substitutions of similar-looking or similar-sounding letters, dropped final
consonants, self-corrections; they are also read word by word, slower and unevenly.
Formats and sample rates rotate (wav 44.1 kHz stereo, flac 16 kHz, mp3 22.05 kHz,
ogg 24 kHz, m4a 48 kHz) so the demo exercises every decoder and the resampler.
Deterministic from --seed.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from wdx.data.audio import encode_audio, resample
from wdx.data.pack import write_split
from wdx.demo.tts import espeak

TIMES = ["오늘", "어제", "아침에", "주말에", "저녁에", "방학에"]
SUBJECTS = ["저는", "우리 형은", "선생님께서", "내 친구가", "동생이", "할머니께서"]
PLACES = ["학교에서", "공원에서", "도서관에서", "시장에서", "집에서", "바닷가에서"]
OBJECTS = ["책을", "사과를", "그림을", "편지를", "숙제를", "노래를"]
VERBS = ["읽었어요", "샀어요", "그렸어요", "썼어요", "했어요", "불렀어요"]
FILLERS = ["음", "어", "그", "저"]


@dataclass(frozen=True)
class Voices:
    """Who reads a split: espeak-ng variants, pitch (0-100) and speed (words/min) ranges."""

    variants: tuple[str, ...]
    pitch: tuple[int, int]
    normal_rate: tuple[int, int]
    dyslexic_rate: tuple[int, int]


SEEN = Voices(("ko", "ko+m1", "ko+f1", "ko+f2"), (35, 65), (150, 185), (90, 130))
UNSEEN = Voices(("ko+m3", "ko+f4"), (70, 85), (190, 210), (135, 150))
# the token study's unseen readers (wdx.demo.token_study): twelve voices, so that its intervals resample speakers
MANY_UNSEEN = Voices(("ko+m2", "ko+m3", "ko+m4", "ko+m5", "ko+m6", "ko+m7", "ko+f3", "ko+f4", "ko+f5", "ko+adam",
                      "ko+linda", "ko+david"), (70, 85), (190, 210), (135, 150))
SPLITS = {"train": SEEN, "val_small": SEEN, "val_unseen": UNSEEN}
FORMATS = [("wav", 44100, 2), ("flac", 16000, 1), ("mp3", 22050, 1), ("ogg", 24000, 1), ("m4a", 48000, 1)]

# Letters readers confuse by shape or sound: initial consonant and vowel swaps (jamo indices).
_INITIAL_SWAPS = {7: 17, 17: 7, 3: 16, 16: 3, 12: 14, 14: 12, 0: 15, 15: 0, 9: 12}  # ㅂ-ㅍ ㄷ-ㅌ ㅈ-ㅊ ㄱ-ㅋ ㅅ-ㅈ
_VOWEL_SWAPS = {0: 4, 4: 0, 8: 13, 13: 8, 2: 6, 6: 2}  # ㅏ-ㅓ ㅗ-ㅜ ㅑ-ㅕ


def _syllable(ch: str) -> tuple[int, int, int] | None:
    code = ord(ch) - 0xAC00
    return (code // 588, (code % 588) // 28, code % 28) if 0 <= code < 11172 else None


def _compose(initial: int, vowel: int, final: int) -> str:
    return chr(0xAC00 + initial * 588 + vowel * 28 + final)


def substitute(word: str, rng: random.Random) -> str:
    """Swap one letter for a similar-looking or similar-sounding one."""
    spots = [i for i, ch in enumerate(word)
             if (s := _syllable(ch)) and (s[0] in _INITIAL_SWAPS or s[1] in _VOWEL_SWAPS)]
    if not spots:
        return word
    i = rng.choice(spots)
    ini, vow, fin = _syllable(word[i])
    if ini in _INITIAL_SWAPS and (vow not in _VOWEL_SWAPS or rng.random() < 0.6):
        ini = _INITIAL_SWAPS[ini]
    else:
        vow = _VOWEL_SWAPS[vow]
    return word[:i] + _compose(ini, vow, fin) + word[i + 1:]


def drop_final(word: str, rng: random.Random) -> str:
    """Omit one final consonant (batchim)."""
    spots = [i for i, ch in enumerate(word) if (s := _syllable(ch)) and s[2]]
    if not spots:
        return word
    i = rng.choice(spots)
    ini, vow, _ = _syllable(word[i])
    return word[:i] + _compose(ini, vow, 0) + word[i + 1:]


def dyslexic_reading(words: list[str], rng: random.Random) -> list[str]:
    """What a dyslexic reader might say for `words`: 2-3 errors of the reported kinds."""
    said = list(words)
    kinds = rng.sample(["repeat", "filler", "substitute", "drop_final", "self_correct"], k=rng.choice((2, 3)))
    for kind in kinds:
        i = rng.randrange(len(said))
        w = said[i]
        if kind == "repeat":
            said[i] = f"{w[0]} {w}"
        elif kind == "filler":
            said.insert(i, rng.choice(FILLERS))
        elif kind == "substitute":
            said[i] = substitute(w, rng)
        elif kind == "drop_final":
            said[i] = drop_final(w, rng)
        else:
            said[i] = f"{substitute(w, rng)} {w}"
    return said


def sentences(seed: int) -> list[list[str]]:
    """Every combination, in a seeded order."""
    rng = random.Random(f"sentences-{seed}")
    combos = [[t, s, p, o, v] for t in TIMES for s in SUBJECTS for p in PLACES for o in OBJECTS for v in VERBS]
    rng.shuffle(combos)
    return combos


def speak(words: list[str], domain: str, rng: random.Random, voices: Voices) -> tuple[np.ndarray, int, str]:
    """normal: one fluent utterance; dyslexic: word by word, slower, uneven pauses. Returns
    (audio, rate, voice)."""
    tts = espeak()
    voice, pitch = rng.choice(voices.variants), rng.randint(*voices.pitch)
    if domain == "normal":
        audio = tts.say(" ".join(words), voice=voice, rate=rng.randint(*voices.normal_rate), pitch=pitch)
        return audio, tts.rate, voice
    pieces = []
    for w in words:
        pieces.append(tts.say(w, voice=voice, rate=rng.randint(*voices.dyslexic_rate),
                              pitch=min(100, pitch + rng.randint(-5, 5))))
        pieces.append(np.zeros(int(tts.rate * rng.uniform(0.15, 0.7)), np.float32))
    return np.concatenate(pieces), tts.rate, voice


def make_sample(index: int, words: list[str], domain: str, seed: int, voices: Voices = SEEN) -> dict:
    rng = random.Random(f"sample-{seed}-{index}")
    said = dyslexic_reading(words, rng) if domain == "dyslexic" else words
    audio, rate, voice = speak(said, domain, rng, voices)
    ext, target_rate, channels = FORMATS[index % len(FORMATS)]
    audio = resample(audio, rate, target_rate)
    if channels == 2:
        audio = np.stack([audio, audio * 0.8])
    meta = json.dumps({"domain": domain, "speaker": f"espeak-{voice}", "target_text": " ".join(words)},
                      ensure_ascii=False)
    return {"__key__": f"{domain}_{index:05d}", ext: encode_audio(audio, target_rate, ext),
            "txt": " ".join(said).encode("utf-8"), "json": meta.encode("utf-8")}


def build(out: str | Path, n_train: int = 160, n_val: int = 40, seed: int = 0, n_unseen: int | None = None,
          unseen: Voices = UNSEEN) -> Path:
    """Write OUT/train, OUT/val_small (`n_val`) and OUT/val_unseen (`n_unseen`, default `n_val`,
    read by `unseen`); half of each split per domain; no sentence in two splits."""
    out = Path(out)
    pool = sentences(seed)
    sizes = {"train": n_train, "val_small": n_val, "val_unseen": n_val if n_unseen is None else n_unseen}
    voices = {**SPLITS, "val_unseen": unseen}
    offset = 0
    for split, size in sizes.items():
        chosen = pool[offset: offset + size]
        samples = [make_sample(offset + i, words, ("normal", "dyslexic")[i % 2], seed, voices[split])
                   for i, words in enumerate(tqdm(chosen, desc=f"speaking {split}", unit="utt"))]
        write_split(out / split, samples, max_count=max(8, len(chosen) // 4))
        offset += size
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m wdx.demo.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--train", type=int, default=160, help="training utterances (half per domain)")
    parser.add_argument("--val", type=int, default=40, help="held-out utterances per held-out split (half per domain)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build(args.out, args.train, args.val, args.seed))


if __name__ == "__main__":
    main()
