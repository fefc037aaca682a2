"""CER and WER per domain and overall, with jiwer.

CER follows the Korean convention: computed on text with punctuation and whitespace
removed (spacing in Korean is inconsistent even among careful writers, and would otherwise
dominate the error). WER is on words after punctuation removal. Scores are corpus-level
(total edits / total reference length), not means of per-sample rates.
"""

from __future__ import annotations

from collections import defaultdict

import jiwer

from .domains import DOMAINS
from .text import normalize_for_cer, normalize_for_wer


def error_rates(refs: list[str], hyps: list[str]) -> dict[str, float]:
    """Corpus CER and WER; samples whose reference is empty after normalisation are left out."""
    pairs = [(normalize_for_cer(r), normalize_for_cer(h), normalize_for_wer(r), normalize_for_wer(h))
             for r, h in zip(refs, hyps)]
    pairs = [p for p in pairs if p[0]]
    if not pairs:
        return {"cer": float("nan"), "wer": float("nan"), "n": 0}
    cer = jiwer.cer([p[0] for p in pairs], [p[1] for p in pairs])
    wer = jiwer.wer([p[2] for p in pairs], [p[3] or "" for p in pairs])
    return {"cer": float(cer), "wer": float(wer), "n": len(pairs)}


def by_domain(rows: list[dict]) -> dict[str, dict[str, float]]:
    """{"normal": {...}, "dyslexic": {...}, "all": {...}} from rows with ref, hyp, domain.

    A domain with no rows is reported with n = 0 and NaN rates, never dropped silently.
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["domain"]].append(r)
    out = {d: error_rates([r["ref"] for r in groups[d]], [r["hyp"] for r in groups[d]]) for d in DOMAINS}
    out["all"] = error_rates([r["ref"] for r in rows], [r["hyp"] for r in rows])
    return out


def format_table(results: dict[str, dict[str, float]], title: str = "") -> str:
    """A fixed-width table: domain, n, CER, WER."""
    lines = [title] if title else []
    lines.append(f"{'domain':<10} {'n':>6} {'CER':>8} {'WER':>8}")
    for name, r in results.items():
        if r["n"] == 0:
            lines.append(f"{name:<10} {0:>6} {'-':>8} {'-':>8}   (no samples)")
        else:
            lines.append(f"{name:<10} {r['n']:>6} {r['cer']:>8.4f} {r['wer']:>8.4f}")
    return "\n".join(lines)
