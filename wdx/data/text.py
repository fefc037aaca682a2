"""Transcript normalisation: a light one for training targets, a strict one for metrics."""

from __future__ import annotations

import re
import unicodedata

_SPACES = re.compile(r"\s+")


def _visible(text: str) -> str:
    """NFC without format characters (category Cf: the BOM U+FEFF, zero-width space/joiners,
    bidi marks, soft hyphen). Editors and web scrapes leave them in transcripts; the
    tokenizer would train them as byte tokens and CER would count them as errors."""
    return "".join(ch for ch in unicodedata.normalize("NFC", text) if unicodedata.category(ch) != "Cf")


def normalize_text(text: str) -> str:
    """NFC + collapsed whitespace: the form transcripts are trained on.

    NFC matters for Korean: the same syllable may arrive as one precomposed code point
    or as a run of conjoining jamo, and the tokenizer would see two different strings.
    """
    return _SPACES.sub(" ", _visible(text)).strip()


def normalize_for_cer(text: str) -> str:
    """The Korean CER convention: NFC, no punctuation, no whitespace, no format characters."""
    text = _visible(text)
    return "".join(ch for ch in text if not (ch.isspace() or unicodedata.category(ch).startswith("P")))


def normalize_for_wer(text: str) -> str:
    """Words for WER: NFC, punctuation and format characters removed, whitespace collapsed."""
    text = _visible(text)
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return _SPACES.sub(" ", text).strip()
