"""faster-whisper itself on a wdx.export_ct2 directory: the trained prompt, on every window."""

import json
import shutil

import numpy as np
import pytest
import torch
from faster_whisper import BatchedInferencePipeline, WhisperModel  # a test dependency (requirements-dev.txt)
from faster_whisper.audio import pad_or_trim
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import get_suppressed_tokens

from tests.conftest import TEXTS, same_start, speechlike
from wdx.data.features import log_mel
from wdx.deploy import export_ct2
from wdx.deploy.faster_whisper import DomainWhisperModel, domain_suffix, pad_with_silence
from wdx.scoring.inference import HFTranscriber
from wdx.scoring.longform import split_at_pauses

DECODE = dict(language="ko", beam_size=1, temperature=0.0)  # greedy, as wdx decodes


class Spy:
    """The ctranslate2 model, recording every prompt it is asked to decode from."""

    def __init__(self, model) -> None:
        self.model, self.prompts = model, []

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def generate(self, features, prompts, **kwargs):
        self.prompts += prompts
        return self.model.generate(features, prompts, **kwargs)


class Generated(Spy):
    """The ctranslate2 model, recording every sequence it generates."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.ids = []

    def generate(self, features, prompts, **kwargs):
        out = self.model.generate(features, prompts, **kwargs)
        self.ids += [ids for r in out for ids in r.sequences_ids]
        return out


def texts(segments) -> str:
    return " ".join(s.text.strip() for s in segments)


def test_faster_whisper_loads_the_export_as_multilingual_and_prefix_sends_the_trained_prompt(trained):
    _, ct2 = trained
    model = WhisperModel(str(ct2), compute_type="float32")
    assert model.model.is_multilingual  # else faster-whisper replaces language="ko" with "en" (wdx.model.tiny real_ids)
    language, _, _ = model.detect_language(speechlike(2.0, 16000))  # IndexError when the export had no lang_ids
    assert f"<|{language}|>" in model.hf_tokenizer.get_vocab()
    # issue 34.7: the languages are counted from the export's lang_ids, not from the vocabulary's size (which
    # the domain tokens grow): large-v3's 100, as the base model has
    assert model.model.num_languages == 100
    assert len(json.loads((ct2 / "config.json").read_text())["lang_ids"]) == 100
    tokenizer = Tokenizer(model.hf_tokenizer, True, task="transcribe", language="ko")
    for domain, prompt in json.loads((ct2 / export_ct2.PROMPTS_FILE).read_text()).items():
        token = prompt["tokens"][-1]
        assert model.get_prompt(tokenizer, [], without_timestamps=True, prefix=token) == prompt["ids"], domain


def test_short_clips_decode_as_wdx_transcribe_does_with_each_domain(trained):
    final, ct2 = trained
    ours = HFTranscriber(final, max_new_tokens=40)
    clips = [speechlike(1.0 + i, 16000, seed=i) for i in range(3)]
    by_domain = {}
    for domain in ("normal", "dyslexic"):
        model = DomainWhisperModel(ct2, domain=domain, compute_type="float32")
        expected = ours(clips, [domain] * len(clips))
        for clip, text in zip(clips, expected):
            segments, _ = model.transcribe(clip, without_timestamps=True, condition_on_previous_text=False, **DECODE)
            theirs = texts(segments)
            assert same_start(text, theirs), (domain, text, theirs)
        by_domain[domain] = expected
    assert by_domain["normal"] != by_domain["dyslexic"]


def test_every_window_of_a_long_file_has_the_domain_prompt_sequential_and_batched(trained):
    final, ct2 = trained
    model = DomainWhisperModel(ct2, domain="dyslexic", compute_type="float32")
    model.model._model = spy = Spy(model.model._model)
    audio = np.concatenate([speechlike(20.0, 16000, seed=1), np.zeros(8000, np.float32), speechlike(20.0, 16000, 2)])
    ours = HFTranscriber(final, max_new_tokens=40)
    expected = json.loads((ct2 / export_ct2.PROMPTS_FILE).read_text())["dyslexic"]["ids"]

    segments = list(model.transcribe(audio, without_timestamps=True, condition_on_previous_text=False, **DECODE)[0])
    assert spy.prompts == [expected, expected]  # faster-whisper's own prefix= reaches window 1 only
    windows = [audio[:480000], audio[480000:]]  # without timestamps it steps 30 s at a time
    for segment, text in zip(segments, ours(windows, ["dyslexic"] * 2)):
        assert same_start(text, segment.text.strip())

    spy.prompts.clear()
    pieces = split_at_pauses(audio)  # wdx.transcribe's cuts, given to the batched pipeline
    assert len(pieces) == 2 and abs(pieces[0][1] - 20 * 16000) < 8000
    clip_timestamps = [{"start": a / 16000, "end": b / 16000} for a, b in pieces]
    segments = list(BatchedInferencePipeline(model).transcribe(audio, clip_timestamps=clip_timestamps, batch_size=2,
                                                               **DECODE)[0])
    assert spy.prompts == [expected, expected]  # faster-whisper's batched pipeline drops prefix= altogether
    for segment, text in zip(segments, ours([audio[a:b] for a, b in pieces], ["dyslexic"] * 2)):
        assert same_start(text, segment.text.strip())


def test_the_last_window_is_padded_with_silence_as_in_training(trained):
    _, ct2 = trained
    model = WhisperModel(str(ct2), compute_type="float32")
    for seconds in (1.0, 7.3):
        audio = speechlike(seconds, 16000, seed=2)
        theirs = pad_or_trim(model.feature_extractor(audio)[..., :-1])
        ours = log_mel(torch.from_numpy(audio)[None], 80)[0].numpy()
        end = int(seconds * 100)  # faster-whisper drops the 2 frames whose window reaches past the audio
        assert not theirs[:, end:].any()  # faster-whisper's own padding: 0.0
        fixed = pad_with_silence(theirs)
        assert np.abs(fixed - ours)[:, :end].max() < 1e-4 and np.abs(fixed - ours)[:, end + 2:].max() < 1e-6
        assert np.array_equal(pad_with_silence(theirs[None])[0], fixed)  # a batch, item by item


def test_wrong_domain_or_a_model_without_prompts_is_refused_in_one_line(trained, tmp_path):
    _, ct2 = trained
    with pytest.raises(ValueError, match=r"domain must be one of normal, dyslexic \(got 'adult'\)"):
        domain_suffix(ct2, "adult")
    with pytest.raises(ValueError, match="no domain_prompts.json; export the model with python -m wdx.export_ct2"):
        domain_suffix(tmp_path, "normal")
    (tmp_path / "domain_prompts.json").write_text(json.dumps({"none": {"tokens": [], "ids": []}}))
    assert domain_suffix(tmp_path, None) == []
    with pytest.raises(ValueError, match="trained without domain tokens; pass no domain"):
        domain_suffix(tmp_path, "normal")


def test_the_command_line_short_and_long_files_bad_ones_and_no_torch(trained, tmp_path, capsys):
    import subprocess
    import sys

    import soundfile

    from wdx.deploy import faster_whisper as deploy

    final, ct2 = trained
    short = speechlike(2.0, 16000, seed=4)
    soundfile.write(tmp_path / "short.wav", short, 16000)
    soundfile.write(tmp_path / "long.flac", speechlike(40.0, 16000, seed=5), 16000)
    (tmp_path / "bad.m4a").write_bytes(b"not audio")
    files = [str(tmp_path / n) for n in ("short.wav", "bad.m4a", "long.flac")]
    assert deploy.main([str(ct2), *files, "--domain", "dyslexic", "--compute-type", "float32"]) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [files[0], files[2]]
    assert same_start(HFTranscriber(final, max_new_tokens=120)([short], ["dyslexic"])[0], lines[0].split("\t")[1])
    (err,) = [line for line in captured.err.splitlines() if line.startswith("wdx.deploy:")]  # (and library logs)
    assert err.startswith(f"wdx.deploy: skipped {files[1]}: ")
    capsys.readouterr()
    assert deploy.main([str(ct2), files[0], "--domain", "adult"]) == 1
    assert capsys.readouterr().err.strip() == (f"wdx.deploy: error: {ct2}: domain must be one of normal, dyslexic "
                                               "(got 'adult')")
    code = "import sys, wdx.deploy.faster_whisper; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


@pytest.mark.filterwarnings("ignore:DomainWhisperModel.transcribe")  # timestamps on, on purpose
def test_a_model_biased_to_emit_a_domain_token_never_gets_one_into_text_or_times(trained, tmp_path):
    # issue 34.1: faster-whisper's suppress_tokens holds no domain id; one generated mid-text is read as a timestamp
    from collections import Counter

    from safetensors.torch import load_file, save_file

    final, unbiased = trained
    clip = speechlike(3.0, 16000, seed=3)
    prompt = json.loads((unbiased / export_ct2.PROMPTS_FILE).read_text())["normal"]["ids"]

    def raw_ids(export):  # ctranslate2 as faster-whisper calls it (-1 replaced by its own list, no domain id)
        plain = WhisperModel(str(export), compute_type="float32")
        features = pad_or_trim(plain.feature_extractor(clip)[:, :-1])[None]
        suppress = get_suppressed_tokens(Tokenizer(plain.hf_tokenizer, True, "transcribe", "ko"), [-1])
        return plain.model.generate(plain.encode(features), [prompt], max_length=40,
                                    suppress_tokens=suppress)[0].sequences_ids[0][1:]

    favourite = Counter(raw_ids(unbiased)).most_common(1)[0][0]
    biased = tmp_path / "final"
    shutil.copytree(final, biased)
    weights = load_file(biased / "model.safetensors")
    emb = weights["model.decoder.embed_tokens.weight"]  # tied: the output projection too
    domain = list(range(emb.shape[0] - 2, emb.shape[0]))
    emb[domain] = 3 * emb[favourite]  # outscores the token the model likes best, wherever that one leads
    save_file(weights, biased / "model.safetensors", metadata={"format": "pt"})
    ct2 = export_ct2.export(biased, tmp_path / "ct2")
    assert set(raw_ids(ct2)) & set(domain)  # the precondition: left to itself, this model emits domain tokens
    model = DomainWhisperModel(ct2, domain="normal", compute_type="float32")
    model.model._model = generated = Generated(model.model._model)
    for without_timestamps in (True, False):
        segments = list(model.transcribe(clip, without_timestamps=without_timestamps,
                                         condition_on_previous_text=False, **DECODE)[0])
        # a domain id read as a timestamp is a time past the window's 30.00 s
        assert all(s.end <= 30.0 and "<|domain:" not in s.text and not set(s.tokens) & set(domain)
                   for s in segments), [(s.start, s.end, s.text, s.tokens) for s in segments]
    list(BatchedInferencePipeline(model).transcribe(clip, clip_timestamps=[{"start": 0.0, "end": 3.0}],
                                                    batch_size=1, **DECODE)[0])
    # ctranslate2 returns the prompt from the task token on: its own domain token first, then what was generated
    n = len(model.domain_ids)
    assert generated.ids and all(ids[:n] == model.domain_ids for ids in generated.ids)
    assert not any(set(ids[n:]) & set(domain) for ids in generated.ids)


def test_an_untested_faster_whisper_is_refused_in_one_line(trained, monkeypatch):
    # issue 34.5: wdx.deploy overrides faster-whisper internals; another version fails silently, not loudly
    import importlib.metadata

    from wdx.deploy import faster_whisper as deploy

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.3.0" if name == "faster-whisper" else real(name))
    with pytest.raises(ValueError, match=r"^faster-whisper 1\.3\.0 is installed; wdx\.deploy is tested with "
                                         r"faster-whisper==1\.2\.1 only \(pip install -r requirements-deploy\.txt\)$"):
        DomainWhisperModel(trained[1], domain="normal", compute_type="float32")
    from pathlib import Path

    requirements = Path(__file__).resolve().parents[1] / "requirements-deploy.txt"
    pins = {line.split("==")[0]: line.split("==")[1].strip() for line in requirements.read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    assert {k: pins[k] for k in deploy.TESTED} == deploy.TESTED  # one range: the file's pins


def test_a_long_file_s_last_window_is_padded_with_the_whole_file_s_silence_as_transformers_does(trained,
                                                                                                monkeypatch):
    # issue 34.4: the padding took the last window's own maximum; Whisper clamps (and so sets silence) by the input's
    from transformers import WhisperFeatureExtractor

    _, ct2 = trained
    audio = np.concatenate([speechlike(10.0, 16000, seed=4), 0.02 * speechlike(30.0, 16000, seed=5)])  # loud, quiet
    model = DomainWhisperModel(ct2, domain="normal", compute_type="float32")
    whole = model.feature_extractor(audio)[..., :-1]  # as faster-whisper's transcribe computes it, then slices
    window = pad_or_trim(whole[:, 3000:])
    theirs = WhisperFeatureExtractor(feature_size=80)(np.pad(audio, (0, 20 * 16000)), sampling_rate=16000,
                                                      padding="longest", truncation=False,
                                                      return_tensors="np").input_features[0][:, 3000:6000]
    end = 1000 - 2  # the audio's last frames: faster-whisper drops the 2 whose window reaches past it
    encoded = []
    monkeypatch.setattr(WhisperModel, "encode", lambda self, features: encoded.append(features))
    model.encode(window)  # what DomainWhisperModel hands ctranslate2 for this window
    ours = encoded[0]
    assert np.abs(ours - theirs)[:, :end].max() < 1e-4 and np.abs(ours - theirs)[:, end + 4:].max() < 1e-6
    assert np.abs(pad_with_silence(window) - theirs)[:, end + 4:].max() > 0.1  # the window's own maximum: not it


def test_transcribe_defaults_to_the_trained_decoding_and_says_what_an_override_changes(trained, recwarn):
    # issue 34.3: faster-whisper's defaults (timestamps, previous text, 5 beams + fallback) are prompts never trained
    _, ct2 = trained
    model = DomainWhisperModel(ct2, domain="dyslexic", compute_type="float32")
    model.model._model = spy = Spy(model.model._model)
    clip = speechlike(2.0, 16000, seed=6)
    plain = texts(model.transcribe(clip, language="ko")[0])
    expected = json.loads((ct2 / export_ct2.PROMPTS_FILE).read_text())["dyslexic"]["ids"]
    assert spy.prompts == [expected] and not recwarn.list  # the trained prompt, nothing said
    assert plain == texts(model.transcribe(clip, "ko", without_timestamps=True, beam_size=1, temperature=0.0,
                                           condition_on_previous_text=False)[0]) and not recwarn.list
    with pytest.warns(UserWarning, match=r"^DomainWhisperModel.transcribe: beam_size=5, without_timestamps=False "
                                         r"instead of the decoding the model was trained and evaluated with "
                                         r"\(beam_size=1, without_timestamps=True\)$"):
        model.transcribe(clip, language="ko", beam_size=5, without_timestamps=False)


class Aligned(Spy):
    """The ctranslate2 model, recording the token sequences it is asked to align."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.aligned = []

    def align(self, features, start_sequence, text_tokens, num_frames, **kwargs):
        self.aligned += [list(start_sequence) + list(t) for t in text_tokens]
        return self.model.align(features, start_sequence, text_tokens, num_frames, **kwargs)


@pytest.mark.filterwarnings("ignore:DomainWhisperModel.transcribe")
def test_word_timestamps_are_aligned_under_the_trained_prompt(trained):
    # issue 34.2: faster-whisper aligns sot, <|ko|>, <|transcribe|>, <|notimestamps|>, text: no domain token
    _, ct2 = trained
    clip = speechlike(3.0, 16000, seed=5)
    model = DomainWhisperModel(ct2, domain="dyslexic", compute_type="float32")
    plain = WhisperModel(str(ct2), compute_type="float32")
    model.model._model = spy = Aligned(model.model._model)
    segments = list(model.transcribe(clip, word_timestamps=True, **DECODE)[0])
    words = [w for s in segments for w in s.words]
    assert words and "".join(w.word for w in words) == "".join(s.text for s in segments)
    assert all(0.0 <= w.start <= w.end <= 3.0 for w in words)
    # ctranslate2 puts <|notimestamps|> after the start sequence: the domain ids come right after it
    start = [plain.hf_tokenizer.token_to_id(t) for t in ("<|startoftranscript|>", "<|ko|>", "<|transcribe|>")]
    prompt = [*start, *model.domain_ids]
    assert spy.aligned and all(a[:len(prompt)] == prompt for a in spy.aligned), spy.aligned

    # a text of several words aligned with and without the domain token (faster-whisper's own WhisperModel)
    from faster_whisper.tokenizer import Tokenizer

    tokenizer = Tokenizer(plain.hf_tokenizer, True, "transcribe", "ko")
    text = tokenizer.encode(" " + TEXTS[0])
    features = pad_or_trim(plain.feature_extractor(clip)[:, :-1])[None]
    frames = len(clip) // 160

    def times(m):
        return [(w["word"], w["start"], w["end"]) for w in m.find_alignment(tokenizer, [text], m.encode(features),
                                                                          frames)[0]]

    ours, theirs = times(model), times(plain)
    assert [w for w, _, _ in ours] == [w for w, _, _ in theirs] == [" " + w for w in TEXTS[0].split()]
    assert ours != theirs  # the prompt reached the alignment heads
