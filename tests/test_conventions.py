"""KsponSpeech / AI Hub transcription rules -> the text a model trains on, exactly."""

import pytest

from wdx.data.conventions import Convention, convert

KSPON = Convention("kspon")

ISSUE = "b/ 아/ 모+ 몬 소리야 (70%)/(칠 십 퍼센트) 확률이라니 n/"  # issue 24, as a new user packed it


def test_the_issue_transcript_under_each_dual_side():
    said = convert(ISSUE, KSPON)
    assert said.text == "아 모 몬 소리야 칠 십 퍼센트 확률이라니"  # verbatim: filler and fragment kept
    assert said.fluent == "몬 소리야 칠 십 퍼센트 확률이라니"  # the second CER's reference
    assert dict(said.marks) == {"breath": 1, "filler": 1, "repetition": 1, "dual": 1, "noise": 1}
    assert said.problem is None
    assert convert(ISSUE, Convention("kspon", "spelling")).text == "아 모 몬 소리야 70% 확률이라니"


@pytest.mark.parametrize("raw, text, fluent, marks", [
    ("l/ 그래서 o/ 음/ 어/ 갔어요", "그래서 음 어 갔어요", "그래서 갔어요",
     {"laughter": 1, "other_voice": 1, "filler": 2}),
    ("u/ 뭐라고 u/", "뭐라고", "뭐라고", {"unclear": 2}),
    ("*저기 학교에 가+ 가요", "저기 학교에 가 가요", "저기 학교에 가요", {"unclear": 1, "repetition": 1}),
    ("（３）/（세） 번째", "세 번째", "세 번째", {"dual": 1}),  # full-width brackets and digits folded first
    ("(1시)/(한 시)에 만나요 b/", "한 시에 만나요", "한 시에 만나요", {"dual": 1, "breath": 1}),
    ("ㄱ 받침이 ㅎ/ 있어요", "ㄱ 받침이 ㅎ 있어요", "ㄱ 받침이 있어요", {"filler": 1}),  # compatibility jamo stay
])
def test_every_mark(raw, text, fluent, marks):
    out = convert(raw, KSPON)
    assert (out.text, out.fluent, dict(out.marks), out.problem) == (text, fluent, marks, None)


def test_markup_that_survives_conversion_is_a_problem_never_text():
    assert convert("(70%)/칠십 퍼센트", KSPON).problem == "markup_left"  # half a dual transcription
    assert convert("그래서 / 갔어요", KSPON).problem == "markup_left"
    assert convert("b/ n/", KSPON).text == ""  # only tags: empty, skipped as empty_transcript


def test_plain_keeps_the_text_as_written_and_unknown_conventions_are_refused():
    assert convert(" 아/  모+ ").text == "아/ 모+"
    with pytest.raises(ValueError, match="unknown text convention 'zeroth' \\(expected plain, kspon\\)"):
        convert("x", Convention("zeroth"))


@pytest.mark.parametrize("raw, text, marks", [
    # issue 32.4: main refused the first as markup_left and trained the next three as words ("그래서b", "b 그래서", ...)
    ("b/그래서 갔어요", "그래서 갔어요", {"breath": 1}),
    ("그래서b/ 갔어요", "그래서 갔어요", {"breath": 1}),
    ("\ufeffb/ 그래서 갔어요", "그래서 갔어요", {"breath": 1}),
    ("N/ 그래서 L/ 갔어요", "그래서 갔어요", {"noise": 1, "laughter": 1}),
    ("(70%)/(칠십 퍼센트)n/ 확률", "칠십 퍼센트 확률", {"dual": 1, "noise": 1}),
    ("um/ 그래서", "um 그래서", {"filler": 1}),  # a filler written in Latin letters is not a tag
])
def test_tags_as_transcribers_write_them(raw, text, marks):
    out = convert(raw, KSPON)
    assert (out.text, dict(out.marks), out.problem) == (text, marks, None)


@pytest.mark.parametrize("raw", ["&name& 씨가 왔어요", "{laughing} 그래서", "[noise] 그래서", "그래서 <unk>",
                                 "@ 그래서", "# 그래서"])
def test_marks_outside_the_rules_are_never_trained_as_text(raw):
    assert convert(raw, KSPON).problem == "markup_left"  # main: trained verbatim
