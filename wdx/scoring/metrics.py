"""CER and WER per domain and overall, with jiwer.

CER follows the Korean convention: computed on text with punctuation and whitespace
removed (spacing in Korean is inconsistent even among careful writers, and would otherwise
dominate the error). WER is on words after punctuation removal; sWER (the KsponSpeech
paper's space-normalised WER) on the same words after the hypothesis took the reference's
spacing wherever their characters agree: the three figures Korean ASR results publish. Scores are corpus-level
(total edits / total reference length), not means of per-sample rates.

Beside each CER its anatomy: substitutions, deletions and insertions as fractions of the
reference characters (they add up to the CER), and the runaway count: hypotheses more than
twice as long as their reference, or cut off at the token limit (the repetition loops
fine-tuned Whisper models are known for). Where a sample carries the text the reader was
asked to read (`target_text`), misread-word fidelity (`misreads`): does the transcript keep
what the reader said, or repair it into what they meant to read? And a 95 % bootstrap interval for each CER
(utterances resampled with replacement, 1000 draws, seeded), and for the difference of two
models' CER on the same utterances (paired): is a change real or noise?
"""

from __future__ import annotations

import functools
import unicodedata
from collections import defaultdict

import jiwer
import numpy as np

from wdx.data.text import normalize_for_cer, normalize_for_wer
from wdx.model.domains import DOMAINS

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


def _units(values: list[np.ndarray], clusters: list | None) -> list[np.ndarray]:
    """The arrays summed per resampling unit: per speaker when every utterance names one (its
    utterances are not independent draws), else per utterance."""
    if clusters is None or any(c is None for c in clusters) or len(clusters) != len(values[0]):
        return values
    names = {c: k for k, c in enumerate(dict.fromkeys(clusters))}
    index = np.asarray([names[c] for c in clusters])
    return [np.bincount(index, weights=v, minlength=len(names)) for v in values]


def bootstrap_draws(edits: np.ndarray, lengths: np.ndarray, other: np.ndarray | None = None,
                    clusters: list | None = None, draws: int = BOOTSTRAP_DRAWS,
                    seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """Corpus ratio sum(edits) / sum(lengths) (or, given `other` on the same denominators,
    ratio(other) - ratio) over `draws` resamples of the units with replacement: utterances,
    or whole speakers given `clusters` (a speaker per utterance). A draw whose denominator
    sums to 0 has no ratio and is left out; fewer than 2 units give no draws at all."""
    values = _units([edits, lengths] + ([other] if other is not None else []), clusters)
    n = len(values[1])
    if n < 2:
        return np.zeros(0)
    rng, stats = np.random.default_rng(seed), []
    for start in range(0, draws, 100):  # 100 draws at a time bounds the index array
        idx = rng.integers(0, n, size=(min(100, draws - start), n))
        total = values[1][idx].sum(axis=1)
        defined = total > 0
        idx, total = idx[defined], total[defined]
        stat = values[0][idx].sum(axis=1) / total
        stats.append(stat if other is None else values[2][idx].sum(axis=1) / total - stat)
    return np.concatenate(stats)


def bootstrap_interval(edits: np.ndarray, lengths: np.ndarray, other: np.ndarray | None = None,
                       clusters: list | None = None, draws: int = BOOTSTRAP_DRAWS,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float | None, float | None]:
    """95 % percentile interval of `bootstrap_draws`; (None, None), never NaN, where it has no
    draw (fewer than 2 utterances or speakers, or no draw with a denominator)."""
    stats = bootstrap_draws(edits, lengths, other, clusters, draws, seed)
    if not len(stats):
        return None, None
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap_p(stats: np.ndarray) -> float:
    """Two-sided bootstrap p-value of a difference being 0: twice the share of draws on the
    smaller side of 0, counted with the observed one ((k + 1) / (B + 1), never 0); 1 without draws."""
    if not len(stats):
        return 1.0
    side = min(int((stats <= 0).sum()), int((stats >= 0).sum()))
    return min(1.0, 2 * (side + 1) / (len(stats) + 1))


def holm(pvalues: dict, alpha: float = 0.05) -> dict:
    """Holm's step-down correction: {name: is the difference real}, family-wise error rate
    `alpha` over all the comparisons given (one table's)."""
    real, m = dict.fromkeys(pvalues, False), len(pvalues)
    for k, (name, p) in enumerate(sorted(pvalues.items(), key=lambda item: item[1])):
        if p > alpha / (m - k):
            break
        real[name] = True
    return real


def space_normalized(ref: str, hyp: str) -> str:
    """`hyp` with the reference's word spacing wherever the two agree in characters: sWER's
    hypothesis (KsponSpeech paper). Both are WER-normalised words.

    The characters of both, each with the space that follows it attached, are aligned
    (spaces dropped); a hypothesis character equal to its reference character takes the
    reference's space after it, any other keeps its own. Korean spacing is inconsistent even
    in references, so plain WER partly scores spacing; sWER scores the words.
    """
    ref_words, hyp_words = ref.split(), hyp.split()
    ref_chars, hyp_chars = "".join(ref_words), "".join(hyp_words)
    if not ref_chars or not hyp_chars:
        return hyp
    ref_space, hyp_space = _space_after(ref_words), _space_after(hyp_words)
    match = {}  # hypothesis character index -> the reference character it equals in the alignment
    for chunk in jiwer.process_characters(ref_chars, hyp_chars).alignments[0]:
        if chunk.type == "equal":
            for k in range(chunk.ref_end_idx - chunk.ref_start_idx):
                match[chunk.hyp_start_idx + k] = chunk.ref_start_idx + k
    out = []
    for j, ch in enumerate(hyp_chars):
        out.append(ch)
        if j + 1 == len(hyp_chars):
            break
        i = match.get(j)
        if ref_space[i] if i is not None else hyp_space[j]:
            out.append(" ")
    return "".join(out)


def _space_after(words: list[str]) -> list[bool]:
    """For each character of the words joined: whether a space follows it."""
    return [k == len(w) - 1 for w in words for k in range(len(w))]


def runaway(ref: str, hyp: str, capped: bool = False) -> bool:
    """A hypothesis more than twice its reference's length (CER-normalised), or cut off at the token limit."""
    return capped or len(normalize_for_cer(hyp)) > 2 * max(len(normalize_for_cer(ref)), 1)


def error_rates(refs: list[str], hyps: list[str], capped: list[bool] | None = None,
                speakers: list | None = None) -> dict[str, float]:
    """Corpus CER (with its sub/del/ins parts and its bootstrap interval: over speakers when
    every utterance names one), WER, space-normalised WER (sWER), runaway count; samples whose
    reference is empty after normalisation are left out."""
    capped = capped or [False] * len(refs)
    speakers = speakers or [None] * len(refs)
    pairs = [(normalize_for_cer(r), normalize_for_cer(h), normalize_for_wer(r), normalize_for_wer(h),
              runaway(r, h, c), who) for r, h, c, who in zip(refs, hyps, capped, speakers)]
    pairs = [p for p in pairs if p[0]]
    if not pairs:
        return {"cer": float("nan"), "wer": float("nan"), "swer": float("nan"), "n": 0}
    chars = jiwer.process_characters([p[0] for p in pairs], [p[1] for p in pairs])
    length = chars.substitutions + chars.deletions + chars.hits
    wer = jiwer.wer([p[2] for p in pairs], [p[3] or "" for p in pairs])
    swer = jiwer.wer([p[2] for p in pairs], [space_normalized(p[2], p[3]) or "" for p in pairs])
    lo, hi = bootstrap_interval(_edits(chars), np.asarray([len(p[0]) for p in pairs], dtype=np.float64),
                                clusters=[p[5] for p in pairs])
    return {"cer": float(chars.cer), "cer_lo": lo, "cer_hi": hi, "wer": float(wer), "swer": float(swer),
            "n": len(pairs),
            "sub": chars.substitutions / length, "del": chars.deletions / length, "ins": chars.insertions / length,
            "runaway": sum(p[4] for p in pairs)}


def _distance(a: str, b: str) -> float:
    """Character edit distance of two words over the longer one's length: 0 equal, 1 nothing shared."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1] / max(len(a), len(b), 1)


def _word_pairs(ref: list[str], hyp: list[str]) -> list[tuple[int | None, int | None]]:
    """(ref index, hyp index) of a word alignment; None on the side a word is missing from.

    A plain word alignment (jiwer's) prices every substitution alike, so "음 누래를" against
    "노래를" may pair the filler with the word; here a substitution costs the two words'
    character distance (0..1) and an insertion or deletion 1, so a misread word pairs with
    its nearest spelling.
    """
    n, m = len(ref), len(hyp)
    cost = [[0.0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        cost[i][0] = float(i)
    for j in range(1, m + 1):
        cost[0][j] = float(j)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            cost[i][j] = min(cost[i - 1][j] + 1, cost[i][j - 1] + 1,
                             cost[i - 1][j - 1] + _distance(ref[i - 1], hyp[j - 1]))
    pairs, i, j = [], n, m
    while i or j:  # back-trace, preferring the diagonal
        if i and j and cost[i][j] == cost[i - 1][j - 1] + _distance(ref[i - 1], hyp[j - 1]):
            i, j = i - 1, j - 1
            pairs.append((i, j))
        elif i and cost[i][j] == cost[i - 1][j] + 1:
            i -= 1
            pairs.append((i, None))
        else:
            j -= 1
            pairs.append((None, j))
    return pairs[::-1]


MISREAD_KEYS = ("misread", "faithful", "repaired", "other", "skipped", "skipped_written")
_TIE = 1e-3  # breaks ties between equal-cost alignments, far below any difference of real costs (1/6 at least)


@functools.lru_cache(maxsize=65536)
def _char_cost(a: str, b: str) -> float:
    """Substituting `b` for `a`: their jamo distance (0..1), so that 누 -> 노 (one vowel) is cheaper
    than 음 -> 노 and a misread syllable pairs with the one it was misread from."""
    return 0.0 if a == b else _distance(unicodedata.normalize("NFD", a), unicodedata.normalize("NFD", b))


def _align(ref: str, starts: list[bool], hyp: str) -> tuple[list[int | None], list[str]]:
    """A character alignment of `hyp` to `ref` (both without spaces), `starts[i]` telling
    whether a word of `ref` starts at character i (`starts[len(ref)]` is True).

    Returns, for each `ref` character, the `hyp` character aligned with it (None: left out),
    and for each `ref` position 0..len(ref) the `hyp` characters inserted before it. A
    substitution costs the jamo distance, an insertion or deletion 1; ties go to leaving out
    whole words and inserting between words, which is what a reader does.
    """
    n, m, inf = len(ref), len(hyp), float("inf")
    # two layers: last step a deletion (D) or not (M); a deletion run that starts or ends inside a word pays _TIE
    M = [[inf] * (m + 1) for _ in range(n + 1)]
    D = [[inf] * (m + 1) for _ in range(n + 1)]
    back: dict[tuple[str, int, int], tuple[str, str]] = {}
    M[0][0] = 0.0
    for i in range(n + 1):
        mid_i = not starts[i]
        for j in range(m + 1):
            if i:
                opened = M[i - 1][j] + 1 + (_TIE if not starts[i - 1] else 0)
                extended = D[i - 1][j] + 1
                D[i][j], back["D", i, j] = (opened, ("M", "del")) if opened <= extended else (extended, ("D", "del"))
            if i and j:
                cost = _char_cost(ref[i - 1], hyp[j - 1])
                fm, fd = M[i - 1][j - 1] + cost, D[i - 1][j - 1] + cost + (_TIE if not starts[i - 1] else 0)
                if fm <= fd:
                    best, how = fm, ("M", "sub")
                else:
                    best, how = fd, ("D", "sub")
                if best < M[i][j]:
                    M[i][j], back["M", i, j] = best, how
            if j:
                fm = M[i][j - 1] + 1 + (_TIE if mid_i else 0)
                fd = D[i][j - 1] + 1 + (2 * _TIE if mid_i else 0)
                best, how = (fm, ("M", "ins")) if fm <= fd else (fd, ("D", "ins"))
                if best < M[i][j]:
                    M[i][j], back["M", i, j] = best, how
    aligned: list[int | None] = [None] * n
    inserted = [""] * (n + 1)
    layer, i, j = ("M" if M[n][m] <= D[n][m] else "D"), n, m
    while i or j:
        previous, op = back[layer, i, j]
        if op == "del":
            i -= 1
        elif op == "sub":
            i, j = i - 1, j - 1
            aligned[i] = j
        else:
            j -= 1
            inserted[i] = hyp[j] + inserted[i]
        layer = previous
    return aligned, inserted


def _starts(keys: list) -> list[bool]:
    """Word starts of a character sequence whose characters carry the key of their word."""
    return [i == 0 or keys[i] != keys[i - 1] for i in range(len(keys))] + [True]


def misreads(target: str, said: str, hyp: str) -> dict[str, int]:
    """Misread-word fidelity of one utterance, on characters: spaces in what was said or in the
    hypothesis change nothing (Korean word spacing is unreliable, in transcripts and models alike).

    What was said (the reference) is aligned character by character with the text the reader was
    given (`target`, whose words are the units): a target word said otherwise ("오느" for
    "오늘", a part of it, ...) is a misread word, and so is each run of characters said beyond the
    target (a filler, a repeated fragment, an abandoned attempt). The hypothesis is aligned with
    what was said, and each misread word is `faithful` when the hypothesis has it as said,
    `repaired` when it has the target word instead (for a run said beyond the target: when it left
    it out), else `other`. A target word the reader skipped is `skipped`, and `skipped_written`
    when the hypothesis has it anyway where it was skipped (repaired, though nothing was said).
    """
    t_words = normalize_for_wer(target).split()
    said_chars, hyp_chars = ("".join(normalize_for_wer(x).split()) for x in (said, hyp))
    out = dict.fromkeys(MISREAD_KEYS, 0)
    t_chars = "".join(t_words)
    if said_chars == t_chars:
        return out
    word_of = [k for k, w in enumerate(t_words) for _ in w]
    to_said, extra = _align(t_chars, _starts(word_of), said_chars)
    # each said character's unit: ("t", k) for one aligned with target word k, ("x", p) for one said
    # beyond the target before target position p
    key: list[tuple[str, int] | None] = [None] * len(said_chars)
    position = 0
    for p in range(len(t_chars) + 1):
        for _ in extra[p]:
            key[position] = ("x", p)
            position += 1
        if p < len(t_chars) and to_said[p] is not None:
            key[position] = ("t", word_of[p])
            position += 1
    units: dict[tuple[str, int], list[int]] = {}
    for i, k in enumerate(key):
        units.setdefault(k, []).append(i)
    to_hyp, added = _align(said_chars, _starts(key), hyp_chars) if said_chars else ([], [hyp_chars])
    for unit, chars in units.items():
        said_text = "".join(said_chars[i] for i in chars)
        intended = t_words[unit[1]] if unit[0] == "t" else ""
        if said_text == intended:
            continue
        written = "".join((added[i] if n and chars[n - 1] == i - 1 else "")
                          + (hyp_chars[to_hyp[i]] if to_hyp[i] is not None else "") for n, i in enumerate(chars))
        around = added[chars[0]] + written + added[chars[-1] + 1]
        out["misread"] += 1
        repaired = written == "" if not intended else intended in (written, around)
        out["repaired" if repaired else "faithful" if written == said_text else "other"] += 1
    said_words = {k for kind, k in units if kind == "t"}
    for k, word in enumerate(t_words):
        if k in said_words:
            continue
        out["skipped"] += 1
        # where it would have been said: after every said character of an earlier target position
        first = word_of.index(k)
        gap = sum(1 for kind, p in key if (p < k if kind == "t" else p <= first))
        out["skipped_written"] += word in added[gap]
    return out


def fluent_hypothesis(said: str, fluent: str, hyp: str) -> str:
    """`hyp` without the words it has for the disfluencies of `said` (the words `fluent` lacks:
    fillers, marked repetitions), found by word alignments said->fluent and said->hyp."""
    s, f, h = (normalize_for_wer(x).split() for x in (said, fluent, hyp))
    disfluent = {si for si, fi in _word_pairs(s, f) if si is not None and fi is None}
    dropped = {hi for si, hi in _word_pairs(s, h) if si in disfluent and hi is not None}
    return " ".join(w for j, w in enumerate(h) if j not in dropped)


def fluent_cer(rows: list[dict]) -> float | None:
    """CER with fillers and marked repetitions taken out of reference and hypothesis alike, so
    a recognition error can be told from a disfluency the model left out; None ("n/a") when no
    row carries a fluent form (data without disfluency markup)."""
    if not any(r.get("fluent") for r in rows):
        return None
    refs = [r.get("fluent") or r["ref"] for r in rows]
    hyps = [fluent_hypothesis(r["ref"], r["fluent"], r["hyp"]) if r.get("fluent") else r["hyp"] for r in rows]
    kept = [(a, b) for a, b in zip(refs, hyps) if normalize_for_cer(a)]
    return cer([a for a, _ in kept], [b for _, b in kept]) if kept else None


def fidelity(rows: list[dict]) -> dict[str, float | int | None]:
    """Misread-word fidelity summed over the rows that carry a `target` text: the number of
    utterances and misread words, the shares faithful / repaired / other, and the target words
    the reader skipped and how many of them the hypothesis wrote anyway. Without any target
    text the shares are None ("n/a"), never zero."""
    counts = [misreads(r["target"], r["ref"], r["hyp"]) for r in rows if r.get("target")]
    total = {k: sum(c[k] for c in counts) for k in MISREAD_KEYS}
    shares = {f"misread_{k}": (total[k] / total["misread"] if total["misread"] else None)
              for k in ("faithful", "repaired", "other")}
    return {"misread_utts": len(counts), "misread_words": total["misread"], **shares,
            "skipped_words": total["skipped"], "skipped_written": total["skipped_written"]}


def by_domain(rows: list[dict], domains: tuple[str, ...] = DOMAINS) -> dict[str, dict[str, float]]:
    """{"normal": {...}, "dyslexic": {...}, "all": {...}} from rows with ref, hyp, domain.

    Every one of `domains` (the model's) is reported, one with no rows with n = 0 and NaN rates,
    never dropped silently; a row's domain outside them gets its own entry too.
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["domain"]].append(r)
    def rates(group: list[dict]) -> dict[str, float]:
        return {**error_rates([r["ref"] for r in group], [r["hyp"] for r in group],
                              [r.get("capped", False) for r in group], [r.get("speaker") for r in group]),
                "cer_fluent": fluent_cer(group),
                **fidelity(group)}

    out = {d: rates(groups[d]) for d in (*domains, *(d for d in groups if d not in domains))}
    out["all"] = rates(rows)
    return out


def prompt_table(rows: list[dict], domains: tuple[str, ...] = DOMAINS) -> dict:
    """CER of each domain's clips under every domain token (rows with `hyp_by_prompt`), and
    how many transcripts the token changed: does the token matter?"""
    out = {}
    for true in domains:
        sub = [r for r in rows if r["domain"] == true]
        out[true] = {f"prompt_{p}": cer([r["ref"] for r in sub], [r["hyp_by_prompt"][p] for r in sub])
                     for p in domains}
        out[true]["n"] = len(sub)
        out[true]["changed"] = sum(len(set(r["hyp_by_prompt"].values())) > 1 for r in sub)
    return out


def format_table(results: dict[str, dict[str, float]], title: str = "") -> str:
    """A fixed-width table: domain, n, CER and its substitution/deletion/insertion parts, WER,
    runaway hypotheses."""
    lines = [title] if title else []
    lines.append(f"{'domain':<10} {'n':>6} {'CER':>8} {'95% CI':>15} {'sub':>7} {'del':>7} {'ins':>7} {'WER':>8} "
                 f"{'sWER':>8} {'runaway':>8}")
    for name, r in results.items():
        if r["n"] == 0:
            lines.append(f"{name:<10} {0:>6} {'-':>8} {'-':>15} {'-':>7} {'-':>7} {'-':>7} {'-':>8} {'-':>8} {'-':>8}"
                         "   (no samples)")
        else:
            ci = f"{r['cer_lo']:.4f}-{r['cer_hi']:.4f}" if r.get("cer_lo") is not None else "n/a"
            swer = f"{r['swer']:>8.4f}" if "swer" in r else f"{'-':>8}"  # results saved before sWER existed
            lines.append(f"{name:<10} {r['n']:>6} {r['cer']:>8.4f} {ci:>15} {r['sub']:>7.4f} {r['del']:>7.4f} "
                         f"{r['ins']:>7.4f} {r['wer']:>8.4f} {swer} {r['runaway']:>8}")
    if any(r.get("cer_fluent") is not None for r in results.values()):
        lines.append("CER without fillers and marked repetitions (in reference and hypothesis): " + "  ".join(
            f"{name} {r['cer_fluent']:.4f}" if r.get("cer_fluent") is not None else f"{name} n/a"
            for name, r in results.items()))
    lines.append("misread words (said unlike the target_text; written as said / repaired to the target / other):")
    for name, r in results.items():
        if not r.get("misread_utts"):
            lines.append(f"{name:<10} {'n/a':>6}   (no sample with target_text)")
        elif not r["misread_words"]:
            lines.append(f"{name:<10} {0:>6}   (no misread word in {r['misread_utts']} utterances)")
        else:
            lines.append(f"{name:<10} {r['misread_words']:>6} faithful {r['misread_faithful']:.3f}  repaired "
                         f"{r['misread_repaired']:.3f}  other {r['misread_other']:.3f}  ({r['misread_utts']} utts)")
        if r.get("skipped_words"):
            lines.append(f"{'':<10} {r['skipped_words']:>6} target words skipped by the reader, "
                         f"{r['skipped_written']} of them written anyway")
    return "\n".join(lines)


def row_id(row: dict) -> str:
    """What pairs two evaluations' rows: the sample's id (its file, or shard/key); the key in older outputs."""
    return row.get("id", row["key"])


def compare(rows_a: list[dict], rows_b: list[dict], correct: bool = True) -> dict[str, dict[str, float]]:
    """Model B against model A on the utterances both decoded (matched by `row_id`), per domain and
    overall: both CERs, B - A with its paired bootstrap interval (over speakers when every
    utterance names one) and p-value, and the same for the share of misread words written as
    said. `real` / `faithful_real`: the difference is real after Holm's correction over every
    comparison of the table (`correct=False` leaves that to a caller pooling several tables:
    `mark_real`)."""
    b_by_id = {row_id(r): r for r in rows_b}
    pairs = [(a, b_by_id[row_id(a)]) for a in rows_a if row_id(a) in b_by_id]
    pairs = [(a, b) for a, b in pairs if normalize_for_cer(a["ref"])]  # as the CER counts them
    seen = [d for d in dict.fromkeys(a["domain"] for a, _ in pairs) if d not in DOMAINS]
    out = {}
    for name in (*DOMAINS, *seen, "all"):
        group = [(a, b) for a, b in pairs if name == "all" or a["domain"] == name]
        if not group:
            out[name] = {"n": 0}
            continue
        refs, speakers = [a["ref"] for a, _ in group], [a.get("speaker") for a, _ in group]
        edits_a, lengths = utterance_edits(refs, [a["hyp"] for a, _ in group])
        edits_b, _ = utterance_edits(refs, [b["hyp"] for _, b in group])
        cer_a, cer_b = float(edits_a.sum() / lengths.sum()), float(edits_b.sum() / lengths.sum())
        stats = bootstrap_draws(edits_a, lengths, edits_b, speakers)
        lo, hi = np.percentile(stats, [2.5, 97.5]).tolist() if len(stats) else (None, None)
        out[name] = {"n": len(lengths), "speakers": len(set(speakers)) if None not in speakers else None,
                     "cer_a": cer_a, "cer_b": cer_b, "diff": cer_b - cer_a, "diff_lo": lo, "diff_hi": hi,
                     "p": bootstrap_p(stats), **compare_fidelity(group)}
    if correct:
        mark_real([out])
    return out


def mark_real(tables: list[dict], alpha: float = 0.05) -> dict:
    """Set `real` and `faithful_real` in every row of `tables` (outputs of `compare`) by Holm's
    correction over all their comparisons together; returns {comparison: real}."""
    pvalues = {(t, name, kind): row[key] for t, table in enumerate(tables) for name, row in table.items()
               for kind, key in (("cer", "p"), ("faithful", "faithful_p")) if row.get(key) is not None}
    real = holm(pvalues, alpha)
    for t, table in enumerate(tables):
        for name, row in table.items():
            if "p" in row:
                row["real"] = real[t, name, "cer"]
            if row.get("faithful_p") is not None:
                row["faithful_real"] = real[t, name, "faithful"]
    return real


def interval_text(lo: float | None, hi: float | None, spec: str = "+.3f") -> str:
    """"lo..hi", or "n/a" where there is no interval (fewer than 2 utterances or speakers)."""
    return "n/a" if lo is None or hi is None else f"{lo:{spec}}..{hi:{spec}}"


def real_rule(tables: list[dict]) -> str:
    """The sentence under a comparison table that says what its marks mean."""
    m = sum(row.get(key) is not None for table in tables for row in table.values() for key in ("p", "faithful_p"))
    units = ("speakers" if all(row.get("speakers") for table in tables for row in table.values() if row.get("n"))
             else "utterances")
    return (f"95 % intervals: paired percentile bootstrap over {units} (1000 draws); a real difference: significant "
            f"after Holm's correction for the {m} comparisons of the table (bootstrap p-values, family-wise 5 %).")


def compare_fidelity(pairs: list[tuple[dict, dict]]) -> dict:
    """The share of misread words written as said, A and B, and the paired bootstrap interval
    and p-value of B - A over the utterances with a target text (resampled by speaker when all
    name one); None where there is no misread word ("n/a")."""
    counts = [(misreads(a["target"], a["ref"], a["hyp"]), misreads(b["target"], b["ref"], b["hyp"]), a.get("speaker"))
              for a, b in pairs if a.get("target")]
    words = np.asarray([ca["misread"] for ca, _, _ in counts], dtype=np.float64)
    if not words.sum():
        return {"faithful_a": None, "faithful_b": None, "faithful_diff": None}
    kept_a = np.asarray([ca["faithful"] for ca, _, _ in counts], dtype=np.float64)
    kept_b = np.asarray([cb["faithful"] for _, cb, _ in counts], dtype=np.float64)
    stats = bootstrap_draws(kept_a, words, kept_b, [who for _, _, who in counts])
    lo, hi = np.percentile(stats, [2.5, 97.5]).tolist() if len(stats) else (None, None)
    fa, fb = float(kept_a.sum() / words.sum()), float(kept_b.sum() / words.sum())
    return {"faithful_a": fa, "faithful_b": fb, "faithful_diff": fb - fa, "faithful_lo": lo, "faithful_hi": hi,
            "faithful_p": bootstrap_p(stats), "misread_words": int(words.sum())}


def format_comparison(table: dict[str, dict[str, float]], a: str, b: str) -> str:
    lines = [f"B = {b}\nA = {a}",
             f"{'domain':<10} {'n':>6} {'CER A':>8} {'CER B':>8} {'B - A':>8} {'95% CI of B - A':>17}"]
    for name, r in table.items():
        if r["n"] == 0:
            lines.append(f"{name:<10} {0:>6}   (no utterance decoded by both)")
            continue
        verdict = "a real difference" if r["real"] else "within noise"
        lines.append(f"{name:<10} {r['n']:>6} {r['cer_a']:>8.4f} {r['cer_b']:>8.4f} {r['diff']:>+8.4f} "
                     f"{interval_text(r['diff_lo'], r['diff_hi'], '+.4f'):>17}   {verdict}")
    lines.append("misread words written as said (faithful share), B against A:")
    for name, r in table.items():
        if r.get("faithful_diff") is None:
            lines.append(f"{name:<10} n/a (no misread word with a target_text)")
            continue
        verdict = "a real difference" if r["faithful_real"] else "within noise"
        lines.append(f"{name:<10} A {r['faithful_a']:.3f}  B {r['faithful_b']:.3f}  B - A {r['faithful_diff']:+.3f} "
                     f"({interval_text(r['faithful_lo'], r['faithful_hi'])}, {r['misread_words']} misread words)   "
                     f"{verdict}")
    lines.append(real_rule([table]))
    return "\n".join(lines)
