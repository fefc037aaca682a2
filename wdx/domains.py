"""The two speaker domains and the decoder tokens that name them."""

from __future__ import annotations

DOMAINS: tuple[str, ...] = ("normal", "dyslexic")


def domain_token(domain: str) -> str:
    """The special token that conditions the decoder on `domain`."""
    return f"<|domain:{domain}|>"


DOMAIN_TOKENS: tuple[str, ...] = tuple(domain_token(d) for d in DOMAINS)


def check_domain(value: str, where: str) -> str:
    """Return `value` if it is a known domain, else raise naming `where` (a flag or a file)."""
    if value not in DOMAINS:
        raise ValueError(f"{where}: unknown domain {value!r} (expected one of {', '.join(DOMAINS)})")
    return value
