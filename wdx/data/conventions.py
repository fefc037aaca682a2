"""Transcription conventions of Korean speech corpora, turned into the text a model trains on.

`plain`: the transcript as written (NFC, format characters removed, whitespace collapsed).

`kspon`: the KsponSpeech transcription rules, which the AI Hub Korean speech sets share:

| mark | example | meaning | what training gets |
|---|---|---|---|
| `(A)/(B)` | `(70%)/(칠 십 퍼센트)` | spelling A, pronunciation B | B (`--dual pronunciation`, default) or A |
| `b/ l/ o/ n/` | `b/ 그래서 n/` | breath, laughter, other voice, noise | removed |
| `u/` | `u/` | speech no one could make out | removed; the utterance counted `unclear` |
| `X/` | `아/ 음/` | filler X | X, kept (dropped from the fluent reference) |
| `X+` | `모+ 몬` | X repeated or broken off | X, kept (dropped from the fluent reference) |
| `*` | `*저기` | a word heard unclearly | the word, the mark removed; counted `unclear` |

Tags are read as transcribers write them, not only as the rules do: glued to a word
(`b/그래서`, `그래서n/`: a single-letter tag after a Hangul or digit), upper-case (`N/`), after
a byte-order mark. Any other mark AI Hub sets use (`&name&` masking, `{laughing}`, `[noise]`,
`<unk>`, `@`, `#`) is no part of these rules: a transcript holding one is `markup_left`,
counted and never trained as text.

Fillers, repetitions, fragments and self-corrections are what dyslexic reading is studied
for: they stay in the training text by default. The fluent form (fillers and marked
repetitions left out) is what a second CER compares with, so that a recognition error can be
told from a disfluency the model left out. Full-width ASCII (`７０％`) is folded to ASCII; no
NFKC (it would turn compatibility jamo into conjoining ones). A transcript that still holds
markup after conversion is not trained on: the data layer skips it as `markup_left`.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

from wdx.data.text import normalize_text

CONVENTIONS = ("plain", "kspon")
DUAL_SIDES = ("pronunciation", "spelling")
NOISE_TAGS = {"b": "breath", "l": "laughter", "o": "other_voice", "n": "noise", "u": "unclear"}

_FULL_WIDTH = {cp: cp - 0xFEE0 for cp in range(0xFF01, 0xFF5F)} | {0x3000: 0x20}
_DUAL = re.compile(r"\(([^()]*)\)\s*/\s*\(([^()]*)\)")
_MARKUP = re.compile(r"[()/+*&{}\[\]<>@#]")
# a noise tag glued to the word before or after it: `그래서b/`, `b/그래서` (never `um/`, a filler)
_GLUED_AFTER = re.compile(r"(?<=[^\sA-Za-z/])([bloun])/(?=\s|$)", re.IGNORECASE)
_GLUED_BEFORE = re.compile(r"(?:(?<=\s)|^)([bloun])/(?=[^\s/])", re.IGNORECASE)


class Convention(NamedTuple):
    """How a dataset's transcripts are written (--text-convention) and which side of a dual
    transcription is trained (--dual-transcription)."""

    name: str = "plain"
    dual: str = "pronunciation"


PLAIN = Convention()


def add_flags(parser: argparse.ArgumentParser, what: str) -> None:
    """--text-convention and --dual-transcription, as train_loop.py has them, for a tool; read
    them back with `from_args`."""
    parser.add_argument("--text-convention", choices=CONVENTIONS,
                        help=f"how the transcripts are written; kspon: KsponSpeech / AI Hub markup, {what}; default: "
                        "as the split's metadata.json records (wdx.pack writes it), else plain")
    parser.add_argument("--dual-transcription", choices=DUAL_SIDES,
                        help=f"kspon's (spelling)/(pronunciation) pairs: the side to keep (default {PLAIN.dual})")


def from_args(args: argparse.Namespace) -> Convention | None:
    """The convention the flags name; None when --text-convention was not given (see `resolve`)."""
    if args.text_convention is None:
        return None
    return Convention(args.text_convention, args.dual_transcription or PLAIN.dual)


def resolve(given: Convention | None, recorded: Convention | None) -> Convention:
    """What a tool reads a split under: its flags, else what the split's metadata.json records
    (wdx.data.shards checks that the two agree), else plain."""
    return given or recorded or PLAIN


@dataclass
class Converted:
    """A transcript under its convention: the training text, its fluent form, the marks seen."""

    text: str
    fluent: str
    marks: Counter = field(default_factory=Counter)
    problem: str | None = None  # why the text cannot be trained on: markup left after conversion

    def fluent_form(self, recorded: str | None = None) -> str | None:
        """The fluent reference: `recorded` (a `fluent_text` written at packing time, when the
        text was converted then) or this conversion's; None when it equals the text."""
        fluent = recorded or self.fluent
        return fluent if fluent != self.text else None


_KSPON_LOOK = re.compile(r"(?:^|\s)[bloun]/|\([^()]*\)\s*/\s*\([^()]*\)|\S/(?:\s|$)|\S\+(?:\s|$)", re.IGNORECASE)


def looks_kspon(text: str) -> bool:
    """Does a transcript read as plain text carry KsponSpeech / AI Hub markup (a noise tag, a
    dual transcription, a filler `X/` or a repetition `X+`)?"""
    return bool(_KSPON_LOOK.search(text.translate(_FULL_WIDTH)))


def kspon_warning(marked: int, seen: int, where: str) -> str:
    """The one warning for kspon-looking transcripts read as plain text."""
    return (f"{where}: {marked} of {seen} transcripts look like KsponSpeech / AI Hub markup (b/ n/ (A)/(B) X/ X+), "
            "read as written under --text-convention plain (trained and scored with the marks); "
            "--text-convention kspon converts them")


def convert(raw: str, convention: Convention = PLAIN) -> Converted:
    """`raw` as written by the corpus -> what training and evaluation use."""
    if convention.name == "plain":
        text = normalize_text(raw)
        return Converted(text, text)
    if convention.name != "kspon":
        raise ValueError(f"unknown text convention {convention.name!r} (expected {', '.join(CONVENTIONS)})")
    if convention.dual not in DUAL_SIDES:
        raise ValueError(f"unknown dual transcription side {convention.dual!r} (expected {', '.join(DUAL_SIDES)})")
    marks: Counter = Counter()
    text = normalize_text(raw.translate(_FULL_WIDTH))  # NFC, no BOM or other format characters
    text = _GLUED_BEFORE.sub(lambda m: f"{m.group(1)}/ ", _GLUED_AFTER.sub(lambda m: f" {m.group(1)}/", text))
    side = 1 if convention.dual == "spelling" else 2

    def pick(match: re.Match) -> str:
        marks["dual"] += 1
        return match.group(side)

    text = _DUAL.sub(pick, text)
    verbatim, fluent = [], []
    for word in text.split():
        tag = word[:-1].lower() if word.endswith("/") and word[:-1].lower() in NOISE_TAGS else None
        if tag:
            marks[NOISE_TAGS[tag]] += 1
            continue
        if "*" in word:
            marks["unclear"] += 1
            word = word.replace("*", "")
            if not word:
                continue
        if len(word) > 1 and word.endswith("/"):
            marks["filler"] += 1
            verbatim.append(word[:-1])
            continue
        if len(word) > 1 and word.endswith("+"):
            marks["repetition"] += 1
            verbatim.append(word[:-1])
            continue
        verbatim.append(word)
        fluent.append(word)
    text = normalize_text(" ".join(verbatim))
    return Converted(text, normalize_text(" ".join(fluent)), marks, "markup_left" if _MARKUP.search(text) else None)
