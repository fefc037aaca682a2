"""CER and WER per domain and overall, with jiwer.

CER follows the Korean convention: computed on text with punctuation and whitespace
removed (spacing in Korean is inconsistent even among careful writers, and would otherwise
dominate the error). WER is on words after punctuation removal. Scores are corpus-level
(total edits / total reference length), not means of per-sample rates.

Beside each CER its anatomy: substitutions, deletions and insertions as fractions of the
reference characters (they add up to the CER), and the runaway count: hypotheses more than
twice as long as their reference, or cut off at the token limit (the repetition loops
fine-tuned Whisper models are known for). And a 95 % bootstrap interval for each CER
(utterances resampled with replacement, 1000 draws, seeded), and for the difference of two
models' CER on the same utterances (paired): is a change real or noise?
"""

from __future__ import annotations

from collections import defaultdict

import jiwer
import numpy as np

from .domains import DOMAINS
from .text import normalize_for_cer, normalize_for_wer

BOOTSTRAP_DRAWS, BOOTSTRAP_SEED = 1000, 0


def utterance_edits(refs: list[str], hyps: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Character edits and reference length of each utterance (CER-normalised; empty
    references left out, as in the CER)."""
    pairs = [(normalize_for_cer(r), normalize_for_cer(h)) for r, h in zip(refs, hyps)]
    pairs = [p for p in pairs if p[0]]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    out = jiwer.process_characters([p[0] for p in pairs], [p[1] for p in pairs])
    return _edits(out), np.asarray([len(p[0]) for p in pairs], dtype=np.float64)


def _edits(out: jiwer.CharacterOutput) -> np.ndarray:
    """Substitutions + deletions + insertions of each utterance of one jiwer alignment."""
    def size(c) -> int:
        return c.hyp_end_idx - c.hyp_start_idx if c.type == "insert" else c.ref_end_idx - c.ref_start_idx

    return np.asarray([sum(size(c) for c in chunks if c.type != "equal") for chunks in out.alignments],
                      dtype=np.float64)


def cer(refs: list[str], hyps: list[str]) -> float:
    """Corpus CER alone (total edits / total reference characters): no WER, no interval."""
    edits, lengths = utterance_edits(refs, hyps)
    return float(edits.sum() / lengths.sum()) if len(lengths) else float("nan")


def bootstrap_interval(edits: np.ndarray, lengths: np.ndarray, other: np.ndarray | None = None,
                       draws: int = BOOTSTRAP_DRAWS, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95 % percentile interval of corpus CER (or, given `other` edits of a second model on the
    same utterances, of CER(other) - CER) over utterances resampled with replacement."""
    n = len(lengths)
    if n == 0:
        return float("nan"), float("nan")
    rng, stats = np.random.default_rng(seed), []
    for start in range(0, draws, 100):  # 100 draws at a time bounds the index array
        idx = rng.integers(0, n, size=(min(100, draws - start), n))
        total = lengths[idx].sum(axis=1)
        stat = edits[idx].sum(axis=1) / total
        stats.append(stat if other is None else other[idx].sum(axis=1) / total - stat)
    lo, hi = np.percentile(np.concatenate(stats), [2.5, 97.5])
    return float(lo), float(hi)


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
    lo, hi = bootstrap_interval(_edits(chars), np.asarray([len(p[0]) for p in pairs], dtype=np.float64))
    return {"cer": float(chars.cer), "cer_lo": lo, "cer_hi": hi, "wer": float(wer), "n": len(pairs),
            "sub": chars.substitutions / length, "del": chars.deletions / length, "ins": chars.insertions / length,
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


def prompt_table(rows: list[dict]) -> dict:
    """CER of each domain's clips under every domain token (rows with `hyp_by_prompt`), and
    how many transcripts the token changed: does the token matter?"""
    out = {}
    for true in DOMAINS:
        sub = [r for r in rows if r["domain"] == true]
        out[true] = {f"prompt_{p}": cer([r["ref"] for r in sub], [r["hyp_by_prompt"][p] for r in sub]) for p in DOMAINS}
        out[true]["n"] = len(sub)
        out[true]["changed"] = sum(len(set(r["hyp_by_prompt"].values())) > 1 for r in sub)
    return out


def format_table(results: dict[str, dict[str, float]], title: str = "") -> str:
    """A fixed-width table: domain, n, CER and its substitution/deletion/insertion parts, WER,
    runaway hypotheses."""
    lines = [title] if title else []
    lines.append(f"{'domain':<10} {'n':>6} {'CER':>8} {'95% CI':>15} {'sub':>7} {'del':>7} {'ins':>7} {'WER':>8} "
                 f"{'runaway':>8}")
    for name, r in results.items():
        if r["n"] == 0:
            lines.append(f"{name:<10} {0:>6} {'-':>8} {'-':>15} {'-':>7} {'-':>7} {'-':>7} {'-':>8} {'-':>8}"
                         "   (no samples)")
        else:
            ci = f"{r['cer_lo']:.4f}-{r['cer_hi']:.4f}"
            lines.append(f"{name:<10} {r['n']:>6} {r['cer']:>8.4f} {ci:>15} {r['sub']:>7.4f} {r['del']:>7.4f} "
                         f"{r['ins']:>7.4f} {r['wer']:>8.4f} {r['runaway']:>8}")
    return "\n".join(lines)


def row_id(row: dict) -> str:
    """What pairs two evaluations' rows: the sample's id (its file, or shard/key); the key in older outputs."""
    return row.get("id", row["key"])


def compare(rows_a: list[dict], rows_b: list[dict]) -> dict[str, dict[str, float]]:
    """Model B against model A on the utterances both decoded (matched by `row_id`), per domain and
    overall: both CERs, B - A, and the paired bootstrap interval of B - A."""
    b_by_id = {row_id(r): r for r in rows_b}
    pairs = [(a, b_by_id[row_id(a)]) for a in rows_a if row_id(a) in b_by_id]
    out = {}
    for name in (*DOMAINS, "all"):
        group = [(a, b) for a, b in pairs if name == "all" or a["domain"] == name]
        refs = [a["ref"] for a, _ in group]
        edits_a, lengths = utterance_edits(refs, [a["hyp"] for a, _ in group])
        edits_b, _ = utterance_edits(refs, [b["hyp"] for _, b in group])
        if not len(lengths):
            out[name] = {"n": 0}
            continue
        cer_a, cer_b = float(edits_a.sum() / lengths.sum()), float(edits_b.sum() / lengths.sum())
        lo, hi = bootstrap_interval(edits_a, lengths, edits_b)
        out[name] = {"n": len(lengths), "cer_a": cer_a, "cer_b": cer_b, "diff": cer_b - cer_a, "diff_lo": lo,
                     "diff_hi": hi, "real": bool(lo > 0 or hi < 0)}
    return out


def format_comparison(table: dict[str, dict[str, float]], a: str, b: str) -> str:
    lines = [f"B = {b}\nA = {a}",
             f"{'domain':<10} {'n':>6} {'CER A':>8} {'CER B':>8} {'B - A':>8} {'95% CI of B - A':>17}"]
    for name, r in table.items():
        if r["n"] == 0:
            lines.append(f"{name:<10} {0:>6}   (no utterance decoded by both)")
            continue
        verdict = "a real difference" if r["real"] else "within noise"
        lines.append(f"{name:<10} {r['n']:>6} {r['cer_a']:>8.4f} {r['cer_b']:>8.4f} {r['diff']:>+8.4f} "
                     f"{r['diff_lo']:>+8.4f}..{r['diff_hi']:>+7.4f}   {verdict}")
    return "\n".join(lines)
