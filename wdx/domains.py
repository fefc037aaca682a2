"""The two speaker domains and the decoder tokens that name them."""

from __future__ import annotations

DOMAINS: tuple[str, ...] = ("normal", "dyslexic")


def domain_token(domain: str) -> str:
    """The special token that conditions the decoder on `domain`."""
    return f"<|domain:{domain}|>"


DOMAIN_TOKENS: tuple[str, ...] = tuple(domain_token(d) for d in DOMAINS)

