"""The speaker domains and the decoder tokens that name them.

Two by default (`normal`, `dyslexic`); a run may name others with `--domains` (severity
levels, age groups, other reading difficulties): one token each. A trained model records its
domains in its config (`domains`), and every tool reads them from there.
"""

from __future__ import annotations

import argparse
import re

DOMAINS: tuple[str, ...] = ("normal", "dyslexic")  # --domains' default
ROWS_INIT = 1.0  # --domain-rows-init's default (wdx.model.whisper.setup's too), measured: docs/evaluation.md
AGGREGATE = "all"  # the row of every results table that pools the domains: no domain may have its name
# The decoder prompt of training, evaluation and inference; the domain token follows (DESIGN.md)
PROMPT_TOKENS = ("<|startoftranscript|>", "<|{language}|>", "<|transcribe|>", "<|notimestamps|>")
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_TOKEN = re.compile(r"<\|domain:([a-z0-9][a-z0-9_-]{0,31})\|>")


def domain_token(domain: str) -> str:
    """The special token that conditions the decoder on `domain`."""
    return f"<|domain:{domain}|>"


DOMAIN_TOKENS: tuple[str, ...] = tuple(domain_token(d) for d in DOMAINS)


def prompt_tokens(language: str, domain: str | None) -> list[str]:
    """The prompt's tokens: five with the domain token; four for `domain=None` (a model trained
    with --domain-conditioning none)."""
    return [t.format(language=language) for t in PROMPT_TOKENS] + ([domain_token(domain)] if domain else [])


def check_prompt_domain(known: tuple[str, ...], domain: str) -> None:
    """A model with domain tokens is prompted only with one of its own (a model without is
    prompted without one, whatever the domain)."""
    if known and domain not in known:
        raise ValueError(f"domain {domain!r}: this model knows {', '.join(known)}")


def parse_domains(value: str) -> tuple[str, ...]:
    """"normal,dyslexic,adhd" -> the names, in order; a ValueError names what is wrong."""
    names = tuple(d.strip() for d in value.split(","))
    bad = [d for d in names if not _NAME.fullmatch(d)]
    if bad:
        raise ValueError(f"domain names are lower-case letters, digits, '_' and '-' (at most 32): {bad}")
    if len(set(names)) != len(names):
        raise ValueError(f"a domain is named twice: {value}")
    if AGGREGATE in names:
        raise ValueError(f"'{AGGREGATE}' names the row of every results table that pools all domains; "
                         "call the domain something else")
    return names


def domains_flag(value: str) -> tuple[str, ...]:
    """argparse type of a tool's --domains (train_loop.py's is checked in config.validate)."""
    try:
        return parse_domains(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def vocab_domains(vocab) -> tuple[str, ...]:
    """The domains whose tokens a tokenizer holds, in id order (a model trained before domains
    were recorded in its config)."""
    found = sorted((i, m.group(1)) for t, i in vocab.items() if (m := _TOKEN.fullmatch(t)))
    return tuple(name for _, name in found)


def model_domains(config, vocab) -> tuple[str, ...]:
    """The domains a model was trained with: its config's record, else its vocabulary's tokens
    (empty for a base model, or one trained with --domain-conditioning none)."""
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    if get("domain_conditioning", "token") == "none":
        return ()
    recorded = get("domains", None)
    return tuple(recorded) if recorded else vocab_domains(vocab)


def trained_domains(config, flag_domains: tuple[str, ...]) -> tuple[str, ...]:
    """The domains a run trains and scores: the model's after set-up (--domains plus those a
    --base-model final/ brought), or --domains for a model without domain tokens."""
    return tuple(getattr(config, "domains", None) or ()) or flag_domains
