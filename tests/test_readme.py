"""README.md and docs/ as written: the deploy snippets run, the figures are the committed JSON's, the links hold."""

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile

from bench.flops import train_flops_per_sample
from tests.conftest import same_start, speechlike
from wdx.demo import readme
from wdx.scoring.inference import HFTranscriber
from wdx.train.plan import load_config

ROOT = Path(__file__).resolve().parents[1]
PAGES = readme.pages(ROOT)
README = PAGES[ROOT / "README.md"]
TEXT = "\n".join(PAGES.values())  # where a figure check looks: the text it checks may sit on any page


def snippet(marker: str) -> str:
    """The README's python block that contains `marker`."""
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", TEXT, re.S) if marker in c]
    return re.sub(r"^  ", "", code, flags=re.M)  # blocks inside a list item are indented by 2


def test_the_readme_figures_are_those_bench_demo_json_renders():
    figures = json.loads((ROOT / "bench" / "demo.json").read_text())
    assert readme.update(PAGES, figures) == PAGES, "python -m wdx.demo.readme bench/demo.json rewrites them"
    rendered = readme.render(figures)
    assert f"{figures['deployed']['CTranslate2 int8']['cer']['dyslexic']:.3f}" in rendered["deploy"]


def test_a_readme_block_missing_is_an_error_not_a_silent_pass():
    figures = json.loads((ROOT / "bench/demo.json").read_text())
    missing = {path: text.replace("<!-- demo:deploy -->", "") for path, text in PAGES.items()}
    with pytest.raises(ValueError, match="no page has a <!-- demo:deploy --> ... <!-- /demo:deploy --> block"):
        readme.update(missing, figures)
    twice = {**PAGES, ROOT / "docs" / "copy.md": PAGES[ROOT / "README.md"]}  # the results block on two pages
    with pytest.raises(ValueError, match="2 pages have a <!-- demo:results -->"):
        readme.update(twice, figures)


def test_the_pipeline_snippet_as_written_short_clips_and_what_it_does_on_long_ones(trained, tmp_path, monkeypatch,
                                                                                    caplog):
    final, _ = trained
    clip = speechlike(2.0, 16000, seed=3)
    soundfile.write(tmp_path / "clip.wav", clip, 16000)
    code = snippet("pipeline(").replace("RUN/final", str(final))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    with caplog.at_level(logging.WARNING):
        exec(code, scope)
    assert not [r for r in caplog.records if "max_new_tokens" in r.getMessage()]  # one stored length: no warning
    assert same_start(HFTranscriber(final, max_new_tokens=120)([clip], ["dyslexic"])[0], scope["text"].strip())
    soundfile.write(tmp_path / "clip.wav", np.concatenate([clip] * 20), 16000)  # 40 s: the README says it raises
    with pytest.raises(ValueError, match="timestamps"):
        exec(code, scope)


def test_the_faster_whisper_snippet_as_written(trained, tmp_path, monkeypatch, capsys):
    final, export = trained
    short, long = speechlike(2.0, 16000, seed=4), speechlike(40.0, 16000, seed=5)
    soundfile.write(tmp_path / "clip.wav", short, 16000)
    soundfile.write(tmp_path / "long.wav", long, 16000)
    monkeypatch.chdir(tmp_path)
    code = snippet("DomainWhisperModel").replace('"OUT"', repr(str(export)))
    exec(code.replace('"int8"', '"float32"'), {})  # int8 changes this random model's tokens
    first, second = capsys.readouterr().out.splitlines()
    assert same_start(HFTranscriber(final, max_new_tokens=120)([short], ["dyslexic"])[0], first)
    assert second  # the VAD decides the windows here; tests/test_deploy.py checks each window's prompt


def test_the_corpus_scale_figures_in_the_readme_are_those_of_bench_json():
    # every figure of "A corpus of KsponSpeech's size" as the README prints it, from the runs it names
    text = " ".join(TEXT.split())
    pack = json.loads((ROOT / "bench" / "pack.json").read_text())
    for n, r in pack["sizes"].items():
        row = (f"| {int(n):,} | {r['seconds']:.1f} | {r['files_per_s']:,.0f} ({r['files_per_s_per_worker']:,.0f}) | "
               f"{r['audio_mb_per_s']:.0f} | {r['main_peak_mb']:.0f} / {r['worker_peak_mb']:.0f} / "
               f"{r['all_processes_peak_mb']:.0f} MB | {'yes' if r['torch_imported'] else 'no'} |")
        assert row in text, row
    p = pack["projection"]
    for figure in (f"({p['main_kb_per_row']:.2f} KB a row)", f"projects to {p['main_peak_mb_at_kspon']:.0f} MB",
                   f"to {p['seconds_per_worker_at_kspon']:,.0f} s of one worker's time: "
                   f"{p['seconds_per_worker_at_kspon'] / 3600:.2f} h"):
        assert figure in text, figure
    scale = json.loads((ROOT / "bench" / "scale.json").read_text())
    first, run = scale["first_step"], scale["run"]
    for figure in (f"{first['20000']['seconds']:.2f} s after start at 20,000 rows and "
                   f"{first['100000']['seconds']:.2f} s at 100,000",
                   f"peak RSS of {first['100000']['main_peak_mb']:,.0f} MB both times (largest loader worker "
                   f"{first['100000']['worker_peak_mb']:.0f} MB)",
                   f"{run['seconds']:.0f} s ({run['seconds_per_step']:.2f} s a step",
                   f"RSS {run['main_peak_mb']:,.0f} MB (loader worker {run['worker_peak_mb']:.0f} MB), metrics.jsonl "
                   f"{run['metrics_bytes']:,} bytes and {run['log_bytes']:,} bytes of log",
                   f"(largest difference {scale['resume']['max_abs_diff']})"):
        assert figure in text, figure
    assert scale["resume"]["losses_equal"] and round(first["20000"]["main_peak_mb"]) == round(
        first["100000"]["main_peak_mb"])  # "both times"


def test_the_flop_count_the_readme_quotes_is_bench_flops():
    total = train_flops_per_sample(load_config("openai/whisper-large-v3"), 50, 4, 4)["total"]
    assert f"{total / 1e12:.2f} TFLOP per large-v3 training clip of 50 label tokens" in " ".join(TEXT.split())


def test_the_readme_links_every_docs_page_and_every_link_lands():
    docs = sorted((ROOT / "docs").glob("*.md"))
    assert docs and all(f"(docs/{page.name})" in README for page in docs)
    for path, text in PAGES.items():
        for target, anchor in re.findall(r"\]\((?!https?:)([^)#\s]*)(?:#([^)\s]*))?\)", text):
            page = (path.parent / target).resolve() if target else path
            assert page.exists(), f"{path.name}: link to {target}"
            if anchor and page.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", page.read_text(encoding="utf-8"), re.M)
                slugs = {re.sub(r"[^\w\- ]", "", h.lower()).strip().replace(" ", "-") for h in headings}
                assert anchor in slugs, f"{path.name}: no heading #{anchor} in {page.name}"


def test_the_readme_is_a_front_door():
    assert len(README.splitlines()) <= 350
