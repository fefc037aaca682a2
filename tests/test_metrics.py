import math

from wdx.metrics import by_domain, error_rates, format_table
from wdx.text import normalize_for_cer, normalize_for_wer, normalize_text


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
    assert results["normal"] == {"cer": 0.0, "wer": 0.0, "n": 1, "sub": 0.0, "del": 0.0, "ins": 0.0, "runaway": 0}
    assert results["dyslexic"]["n"] == 0 and math.isnan(results["dyslexic"]["cer"])
    assert "dyslexic        0        -       -       -       -        -        -   (no samples)" in \
        format_table(results)


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
    assert table.splitlines()[0].split() == ["domain", "n", "CER", "sub", "del", "ins", "WER", "runaway"]
