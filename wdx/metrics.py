"""CER and WER per domain and overall, with jiwer.

CER follows the Korean convention: computed on text with punctuation and whitespace
removed (spacing in Korean is inconsistent even among careful writers, and would otherwise
dominate the error). WER is on words after punctuation removal. Scores are corpus-level
(total edits / total reference length), not means of per-sample rates.

Beside each CER its anatomy: substitutions, deletions and insertions as fractions of the
reference characters (they add up to the CER), and the runaway count: hypotheses more than
twice as long as their reference, or cut off at the token limit (the repetition loops
fine-tuned Whisper models are known for).
"""

from __future__ import annotations

from collections import defaultdict

import jiwer

from .domains import DOMAINS
from .text import normalize_for_cer, normalize_for_wer


def runaway(ref: str, hyp: str, capped: bool = False) -> bool:
    """A hypothesis more than twice its reference's length (CER-normalised), or cut off at the token limit."""
    return capped or len(normalize_for_cer(hyp)) > 2 * max(len(normalize_for_cer(ref)), 1)


def error_rates(refs: list[str], hyps: list[str], capped: list[bool] | None = None) -> dict[str, float]:
    """Corpus CER (with its sub/del/ins parts), WER, runaway count; samples whose reference is
    empty after normalisation are left out."""
    capped = capped or [False] * len(refs)
    pairs = [(normalize_for_cer(r), normalize_for_cer(h), normalize_for_wer(r), normalize_for_wer(h),
              runaway(r, h, c)) for r, h, c in zip(refs, hyps, capped)]
    pairs = [p for p in pairs if p[0]]
    if not pairs:
        return {"cer": float("nan"), "wer": float("nan"), "n": 0}
    chars = jiwer.process_characters([p[0] for p in pairs], [p[1] for p in pairs])
    length = chars.substitutions + chars.deletions + chars.hits
    wer = jiwer.wer([p[2] for p in pairs], [p[3] or "" for p in pairs])
    return {"cer": float(chars.cer), "wer": float(wer), "n": len(pairs), "sub": chars.substitutions / length,
            "del": chars.deletions / length, "ins": chars.insertions / length,
            "runaway": sum(p[4] for p in pairs)}


def by_domain(rows: list[dict]) -> dict[str, dict[str, float]]:
    """{"normal": {...}, "dyslexic": {...}, "all": {...}} from rows with ref, hyp, domain.

    A domain with no rows is reported with n = 0 and NaN rates, never dropped silently.
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["domain"]].append(r)
    def rates(group: list[dict]) -> dict[str, float]:
        return error_rates([r["ref"] for r in group], [r["hyp"] for r in group],
                           [r.get("capped", False) for r in group])

    out = {d: rates(groups[d]) for d in DOMAINS}
    out["all"] = rates(rows)
    return out


def format_table(results: dict[str, dict[str, float]], title: str = "") -> str:
    """A fixed-width table: domain, n, CER and its substitution/deletion/insertion parts, WER,
    runaway hypotheses."""
    lines = [title] if title else []
    lines.append(f"{'domain':<10} {'n':>6} {'CER':>8} {'sub':>7} {'del':>7} {'ins':>7} {'WER':>8} {'runaway':>8}")
    for name, r in results.items():
        if r["n"] == 0:
            lines.append(f"{name:<10} {0:>6} {'-':>8} {'-':>7} {'-':>7} {'-':>7} {'-':>8} {'-':>8}   (no samples)")
        else:
            lines.append(f"{name:<10} {r['n']:>6} {r['cer']:>8.4f} {r['sub']:>7.4f} {r['del']:>7.4f} "
                         f"{r['ins']:>7.4f} {r['wer']:>8.4f} {r['runaway']:>8}")
    return "\n".join(lines)
