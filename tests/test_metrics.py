import math

import numpy as np
import pytest

from wdx.data.text import normalize_for_cer, normalize_for_wer, normalize_text
from wdx.scoring.metrics import by_domain, error_rates, format_table


def test_cer_ignores_punctuation_and_spaces_the_korean_convention():
    assert normalize_for_cer("안녕 하세요, 반갑습니다!") == "안녕하세요반갑습니다"
    assert error_rates(["안녕하세요, 반갑습니다."], ["안녕 하세요 반갑습니다"])["cer"] == 0.0
    assert error_rates(["가나다라"], ["가나다마"])["cer"] == 0.25


def test_rates_are_corpus_level_not_means_of_samples():
    r = error_rates(["가나", "다라마바사아자차"], ["가X", "다라마바사아자차"])
    assert r["cer"] == 1 / 10 and r["n"] == 2


def test_wer_on_words_after_punctuation_removal():
    assert normalize_for_wer("학교에, 가요.") == "학교에 가요"
    assert error_rates(["학교에 가요"], ["학교에 가여"])["wer"] == 0.5


def test_a_missing_domain_is_reported_not_divided_by_zero():
    results = by_domain([dict(ref="가나", hyp="가나", domain="normal")])
    assert results["normal"] == {"cer": 0.0, "cer_lo": None, "cer_hi": None, "wer": 0.0, "swer": 0.0, "n": 1,
                                 "sub": 0.0, "del": 0.0, "ins": 0.0, "runaway": 0, "misread_utts": 0,
                                 "misread_words": 0,
                                 "misread_faithful": None, "misread_repaired": None, "misread_other": None,
                                 "skipped_words": 0, "skipped_written": 0,
                                 "cer_fluent": None}  # None: no fluent form in the data (n/a, never 0)
    assert results["dyslexic"]["n"] == 0 and math.isnan(results["dyslexic"]["cer"])
    assert format_table(results).splitlines()[2].split() == ["dyslexic", "0", *"-" * 8, "(no", "samples)"]


def test_nfc_makes_decomposed_jamo_the_same_text():
    decomposed = "\u1112\u1161\u11ab"  # 한 as conjoining jamo
    assert normalize_text(f"  {decomposed}  국 ") == "한 국"


def test_cer_anatomy_adds_up_and_runaways_are_counted():
    r = error_rates(["가나다라", "가"], ["가나마", "가가가"])
    # 가나다라 -> 가나마: 1 substitution, 1 deletion; 가 -> 가가가: 2 insertions; of 5 reference characters
    assert (r["sub"], r["del"], r["ins"]) == (0.2, 0.2, 0.4) and r["cer"] == 0.8
    assert r["runaway"] == 1  # 가가가 is more than twice its reference
    rows = [dict(ref="가나다라", hyp="가나다라", domain="dyslexic", capped=True),
            dict(ref="가나", hyp="가나", domain="normal")]
    results = by_domain(rows)
    assert (results["dyslexic"]["runaway"], results["normal"]["runaway"], results["all"]["runaway"]) == (1, 0, 1)
    table = format_table(results)
    assert table.splitlines()[0].split() == ["domain", "n", "CER", "95%", "CI", "sub", "del", "ins", "WER", "sWER",
                                          "runaway"]


def test_bootstrap_interval_holds_the_cer_is_seeded_and_narrows_with_more_utterances():
    refs = ["가나다라마바사아", "자차카타파하"] * 20
    hyps = ["가나다라마바사아", "자차카"] * 20  # every other utterance loses 3 of 6 characters
    small, again = error_rates(refs[:8], hyps[:8]), error_rates(refs[:8], hyps[:8])
    large = error_rates(refs, hyps)
    assert small["cer_lo"] <= small["cer"] <= small["cer_hi"] and small == again
    assert large["cer"] == small["cer"] == 3 / 14
    assert large["cer_hi"] - large["cer_lo"] < small["cer_hi"] - small["cer_lo"]


def test_paired_comparison_tells_a_real_gain_from_noise():
    from wdx.scoring.metrics import compare

    def rows(every):  # one utterance in `every` loses half its characters
        return [dict(key=str(i), domain=("normal", "dyslexic")[i % 2], ref="가나다라마바",
                     hyp="가나다" if i % every == 0 else "가나다라마바") for i in range(200)]

    same = compare(rows(3), rows(3))
    assert same["all"]["diff"] == 0 and not same["all"]["real"]
    better = compare(rows(3), rows(7))
    assert better["all"]["diff"] < 0 and better["all"]["diff_hi"] < 0 and better["all"]["real"]
    assert better["normal"]["n"] == better["dyslexic"]["n"] == 100
    assert compare(rows(3), rows(7)) == better  # seeded


def test_misread_words_are_counted_faithful_repaired_or_other_exactly():
    # issue 23.3: target A B C D, said A' B C' D' plus a filler; hyp keeps A', repairs C' to C, writes X for D'
    # and drops the filler (an insertion left out reads as the target: repaired)
    from wdx.scoring.metrics import fidelity, misreads

    target = "오늘 학교에서 노래를 불렀어요"
    said, hyp = "오느 학교에서 음 누래를 불렀서요", "오느 학교에서 노래를 볼렀어"
    none = {"skipped": 0, "skipped_written": 0}
    assert misreads(target, said, hyp) == {"misread": 4, "faithful": 1, "repaired": 2, "other": 1, **none}
    assert misreads(target, target, target) == {"misread": 0, "faithful": 0, "repaired": 0, "other": 0, **none}
    rows = [{"target": target, "ref": said, "hyp": hyp}, {"ref": "가", "hyp": "가"}]
    assert fidelity(rows) == {"misread_utts": 1, "misread_words": 4, "misread_faithful": 0.25,
                              "misread_repaired": 0.5, "misread_other": 0.25, "skipped_words": 0,
                              "skipped_written": 0}
    # no target text anywhere: not available, never zero
    assert fidelity(rows[1:]) == {"misread_utts": 0, "misread_words": 0, "misread_faithful": None,
                                  "misread_repaired": None, "misread_other": None, "skipped_words": 0,
                                  "skipped_written": 0}


def respaced(text: str, seed: int) -> str:
    """The same characters with spaces anywhere (or none)."""
    import random

    rng = random.Random(seed)
    return "".join(ch + (" " if rng.random() < 0.3 else "") for ch in text.replace(" ", ""))


@pytest.mark.parametrize("target, said, hyp, expected", [
    # issue 33.1: a hypothesis that glues words counted "other" for the misread word it kept
    ("오늘 학교에", "오느 학교에", "오느학교에", dict(misread=1, faithful=1)),
    ("오늘 학교에", "오느 학교에", "오늘학교에", dict(misread=1, repaired=1)),
    ("오늘 학교에", "오 학교에", "오늘 학교에", dict(misread=1, repaired=1)),  # a part said, the word written
    ("학교에", "학교 학교에", "학교에", dict(misread=1, repaired=1)),  # a repetition left out
    ("학교에", "학교 학교에", "학교학교에", dict(misread=1, faithful=1)),
    ("오늘", "음 오느", "", dict(misread=2, repaired=1, other=1)),  # the filler left out, the word too
    # issue 33.3: a target word skipped by the reader and written by the model is counted
    ("나는 오늘 학교에 갔다", "나는 학교에 갔다", "나는 오늘 학교에 갔다", dict(skipped=1, skipped_written=1)),
    ("나는 오늘 학교에 갔다", "나는 학교에 갔다", "나는 학교에 갔다", dict(skipped=1)),
    ("오늘 학교에서 노래를 불렀어요 그리고 친구와 함께 집으로 돌아왔습니다",
     "오느 학교에서 음 누래를 불렀서요 그리고 친구와 친구와 함께 집으로 도라왔습니다",
     "오느 학교에서 노래를 볼렀어 그리고 친구와 함께 집으로 돌아왔습니다",
     dict(misread=6, faithful=1, repaired=4, other=1)),
])
def test_misread_counts_depend_on_the_characters_never_on_the_spacing(target, said, hyp, expected):
    from wdx.scoring.metrics import MISREAD_KEYS, misreads

    assert misreads(target, said, hyp) == {k: expected.get(k, 0) for k in MISREAD_KEYS}
    for seed in range(20):  # the reference's and the hypothesis's spacing, each anywhere
        assert misreads(target, respaced(said, seed), respaced(hyp, seed + 100)) == misreads(target, said, hyp)


def test_fluent_cer_tells_a_recognition_error_from_a_disfluency_left_out():
    from wdx.scoring.metrics import fluent_cer, fluent_hypothesis

    said, fluent = "아 모 몬 소리야 칠 십 퍼센트", "몬 소리야 칠 십 퍼센트"
    assert fluent_hypothesis(said, fluent, "아 몬 소리야 칠십 퍼센트") == "몬 소리야 칠십 퍼센트"
    rows = [dict(domain="dyslexic", ref="아 모 몬 소리야", fluent="몬 소리야", hyp="몬 소리야")]
    results = by_domain(rows)
    assert results["dyslexic"]["cer"] == 2 / 6 and results["dyslexic"]["cer_fluent"] == 0.0  # left out, not misheard
    rows[0]["hyp"] = "아 모 문 소리야"  # the disfluencies kept, one syllable misheard
    assert fluent_cer(rows) == 1 / 4
    assert "dyslexic 0.2500" in format_table(by_domain(rows))


def test_swer_scores_words_not_the_hypothesis_spacing():
    # issue 32.6: Kspon results are published as CER, WER and space-normalised WER (KsponSpeech paper)
    from wdx.scoring.metrics import space_normalized

    ref = "나는 학교에 간다"
    glued = error_rates([ref], ["나는학교에 간다"])
    assert (glued["cer"], glued["wer"], glued["swer"]) == (0.0, 2 / 3, 0.0)
    misread = error_rates([ref], ["나는 핵교 에 간다"])  # a misread word, spaced apart from its ending
    assert space_normalized(ref, "나는 핵교 에 간다") == "나는 핵교에 간다"
    assert (misread["wer"], misread["swer"]) == (2 / 3, 1 / 3)
    for spacing in ("나 는 핵교 에 간 다", "나는핵교에간다", "나는 핵교에간다"):  # spacing after agreeing characters
        assert error_rates([ref], [spacing])["swer"] == 1 / 3
    assert space_normalized(ref, "나는 핵 교에 간다") == "나는 핵 교에 간다"  # after a misread one: its own
    assert error_rates([ref], [""])["swer"] == 1.0


def test_intervals_are_never_nan_and_say_n_a_where_there_is_no_draw():
    # issue 33.4: a draw of utterances without misread words divided 0 by 0, and the interval came out NaN
    from wdx.scoring.metrics import compare, format_comparison

    said = dict(target="오늘 학교에", ref="오느 학교에")
    rows_a = [dict(key="1", domain="dyslexic", hyp="오늘 학교에", **said),
              dict(key="2", domain="dyslexic", target="가다", ref="가다", hyp="가다")]
    rows_b = [dict(rows_a[0], hyp="오느 학교에"), rows_a[1]]
    row = compare(rows_a, rows_b)["dyslexic"]
    assert (row["faithful_a"], row["faithful_b"]) == (0.0, 1.0)
    assert row["faithful_lo"] is not None and not math.isnan(row["faithful_lo"]) and row["faithful_hi"] == 1.0
    one = compare(rows_a[:1], rows_b[:1])["dyslexic"]  # one utterance: nothing to resample
    assert (one["diff_lo"], one["faithful_lo"]) == (None, None) and not one["real"]
    assert "n/a" in format_comparison(compare(rows_a[:1], rows_b[:1]), "A", "B")


def test_utterances_of_one_speaker_are_resampled_together():
    # issue 33.4: 40 clips of 2 speakers are 2 draws, not 40 (one speaker's clips share a voice)
    from wdx.scoring.metrics import error_rates

    refs = ["가나다라"] * 40
    hyps = ["가나다마" if i < 20 else "가나다라" for i in range(40)]
    by_clip = error_rates(refs, hyps)
    by_speaker = error_rates(refs, hyps, speakers=["a" if i < 20 else "b" for i in range(40)])
    assert by_clip["cer"] == by_speaker["cer"] == 0.125
    assert by_speaker["cer_hi"] - by_speaker["cer_lo"] > 2 * (by_clip["cer_hi"] - by_clip["cer_lo"])
    assert (by_speaker["cer_lo"], by_speaker["cer_hi"]) == (0.0, 0.25)  # either speaker twice, or one of each
    partly = error_rates(refs, hyps, speakers=["a"] * 39 + [None])  # not every clip named: by utterance
    assert (partly["cer_lo"], partly["cer_hi"]) == (by_clip["cer_lo"], by_clip["cer_hi"])


def test_a_real_difference_is_corrected_for_the_comparisons_of_its_table():
    from wdx.scoring.metrics import bootstrap_p, compare, holm

    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == {"a": True, "b": False, "c": False}  # 0.03 > 0.05 / 2
    assert holm({"a": 0.01, "b": 0.02}) == {"a": True, "b": True}
    assert bootstrap_p(np.asarray([0.1] * 999)) == 2 / 1000  # never 0
    assert bootstrap_p(np.zeros(0)) == 1.0

    def rows(every):  # one utterance in `every` loses half its characters
        return [dict(key=str(i), domain=("normal", "dyslexic")[i % 2], ref="가나다라마바",
                     hyp="가나다" if i % every == 0 else "가나다라마바") for i in range(200)]

    table = compare(rows(3), rows(4))
    assert all(table[d]["p"] < 1 for d in table)
    uncorrected = {d: table[d]["diff_hi"] < 0 for d in table}
    assert [table[d]["real"] for d in table] == list(holm({d: table[d]["p"] for d in table}).values())
    assert sum(table[d]["real"] for d in table) <= sum(uncorrected.values())
