"""wdx.evaluate and wdx.transcribe on a tiny model with domain tokens."""

import json
import subprocess
import sys

import pytest

from tests.conftest import speechlike
from wdx.data.audio import encode_audio
from wdx.scoring import evaluate, transcribe


@pytest.fixture(scope="module")
def tiny_final(tiny_model, tmp_path_factory):
    from wdx.model.whisper import setup

    out = tmp_path_factory.mktemp("final")
    w, _ = setup(tiny_model, language="ko", encoder_layers=0, decoder_layers=0)
    w.model.save_pretrained(out)
    w.tokenizer.save_pretrained(out)
    w.feature_extractor.save_pretrained(out)
    return str(out)


def clips(tmp_path, n=3):
    paths = []
    for i, (ext, rate) in enumerate([("wav", 44100), ("m4a", 48000), ("mp3", 22050)][:n]):
        path = tmp_path / f"clip{i}.{ext}"
        path.write_bytes(encode_audio(speechlike(1.0, rate, seed=i), rate, ext))
        paths.append(path)
    return paths


def test_dataset_evaluation_reports_every_sample_and_both_domains(tiny_final, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert evaluate.main([tiny_final, "--dataset", tiny_dataset, "--max-new-tokens", "4", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert sorted(s["key"] for s in report["samples"]) == [f"va{i:03d}" for i in range(6)]
    assert report["results"]["normal"]["n"] == 3 and report["results"]["dyslexic"]["n"] == 3
    assert report["domain_prompt"] is True
    # issue 32.6: sWER beside CER and WER, and what the references are
    assert {"cer", "wer", "swer"} <= set(report["results"]["all"])
    assert report["references"] == {"text_convention": "plain", "dual_transcription": None}
    table = capsys.readouterr().out
    assert "dyslexic" in table and "references as written (--text-convention plain)" in table and "sWER" in table
    assert evaluate.main([tiny_final, "--dataset", tiny_dataset, "--max-new-tokens", "2", "--json", str(out),
                          "--text-convention", "kspon", "--dual-transcription", "spelling"]) == 0
    assert json.loads(out.read_text())["references"] == {"text_convention": "kspon", "dual_transcription": "spelling"}
    assert "the spelling side of (spelling)/(pronunciation) pairs" in capsys.readouterr().out


def test_list_and_dir_inputs_and_compare_domains(tiny_final, tmp_path):
    paths = clips(tmp_path)
    listing = tmp_path / "list.jsonl"
    listing.write_text("".join(json.dumps({"audio_path": p.name, "text": "안녕", "domain": d}) + "\n"
                               for p, d in zip(paths, ["normal", "dyslexic", "normal"])))
    out = tmp_path / "r.json"
    argv = [tiny_final, "--list", str(listing), "--max-new-tokens", "3", "--compare-domains", "--json", str(out)]
    assert evaluate.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["compare_domains"]["normal"]["n"] == 2 and report["compare_domains"]["dyslexic"]["n"] == 1
    assert set(report["samples"][0]["hyp_by_prompt"]) == {"normal", "dyslexic"}
    for p in paths:
        p.with_suffix(".txt").write_text("안녕")
    assert evaluate.main([tiny_final, "--dir", str(tmp_path), "--domain", "dyslexic", "--max-new-tokens", "3",
                          "--json", str(out)]) == 0
    assert json.loads(out.read_text())["results"]["dyslexic"]["n"] == 3


def test_bad_inputs_fail_in_one_line(tiny_final, tmp_path):
    listing = tmp_path / "list.jsonl"
    listing.write_text(json.dumps({"audio_path": "missing.wav", "text": "x", "domain": "normal"}) + "\n")
    r = subprocess.run([sys.executable, "-m", "wdx.evaluate", tiny_final, "--list", str(listing)],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert f"wdx.evaluate: skipped {tmp_path}/missing.wav:" in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (f"wdx.evaluate: error: {listing}: no usable sample "
                                                 "(skipped: {'unreadable_file': 1})")
    listing.write_text(json.dumps({"audio_path": "a.wav", "text": "x", "domain": "kids"}) + "\n")
    assert evaluate.main([tiny_final, "--list", str(listing)]) == 1
    assert evaluate.main([tiny_final, "--dir", str(tmp_path)]) == 1  # --dir needs --domain


def test_transcribe_one_file_and_compare_domains(tiny_final, tmp_path, capsys):
    (path,) = clips(tmp_path, 1)
    assert transcribe.main([tiny_final, str(path), "--domain", "dyslexic", "--max-new-tokens", "3"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{path}\t[dyslexic] ")
    out = tmp_path / "t.json"
    assert transcribe.main([tiny_final, str(path), "--compare-domains", "--max-new-tokens", "3",
                            "--json", str(out)]) == 0
    assert set(json.loads(out.read_text())[0]) == {"audio", "hyp_normal", "hyp_dyslexic"}
    assert transcribe.main([tiny_final, str(tmp_path / "nope.wav")]) == 1


def test_one_unreadable_file_among_good_ones_is_reported_and_the_rest_transcribed(tiny_final, tmp_path, capsys):
    good_paths = clips(tmp_path, 2)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF but not audio")
    out = tmp_path / "t.json"
    code = transcribe.main([tiny_final, str(good_paths[0]), str(junk), str(tmp_path / "gone.wav"), str(good_paths[1]),
                            "--max-new-tokens", "2", "--batch-size", "4", "--json", str(out)])
    assert code == 1  # main: the whole batch aborted at junk.wav, nothing transcribed
    captured = capsys.readouterr()
    assert [line.split("\t")[0] for line in captured.out.splitlines()] == [str(p) for p in good_paths]
    assert f"wdx.transcribe: skipped {junk}: " in captured.err
    assert "2 of 4 files could not be read" in captured.err
    assert [r.get("error") is None for r in json.loads(out.read_text())] == [True, True, False, False]


def test_output_paths_and_list_entries_are_checked_before_any_work(tmp_path, capsys):
    listing = tmp_path / "l.jsonl"
    listing.write_text('{"audio_path": "a.wav", "text": "x", "domain": "normal"}\n["not", "an", "object"]\n')
    # the model does not even exist: these fail before it would be loaded
    assert evaluate.main(["no-model", "--list", str(listing), "--json", str(tmp_path / "nope" / "r.json")]) == 1
    assert capsys.readouterr().err.strip() == (f"wdx.evaluate: error: --json {tmp_path}/nope/r.json: directory "
                                               f"{tmp_path}/nope does not exist")
    assert transcribe.main(["no-model", "x.wav", "--json", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == f"wdx.transcribe: error: --json {tmp_path}: is a directory; name a file"
    assert evaluate.main(["no-model", "--list", str(listing)]) == 1
    assert capsys.readouterr().err.strip() == (f"wdx.evaluate: error: {listing}: entry 2 is a list, not an object "
                                               "with audio_path, text, domain")
    listing.write_text('{"audio_path": "a.wav", "text": "x", "domain": "normal"}\n{"audio_path": \n')
    assert evaluate.main(["no-model", "--list", str(listing)]) == 1
    assert capsys.readouterr().err.strip().startswith(f"wdx.evaluate: error: {listing}:2: not valid JSON")
    (tmp_path / "a.wav").write_bytes(encode_audio(speechlike(1.0, 16000), 16000, "wav"))
    (tmp_path / "a.txt").write_bytes("안녕".encode("cp949"))
    assert evaluate.main(["no-model", "--dir", str(tmp_path), "--domain", "normal"]) == 1
    assert capsys.readouterr().err.strip() == f"wdx.evaluate: error: {tmp_path}/a.txt: not UTF-8 text (byte 0)"


def test_compare_two_evaluations_prints_the_paired_difference(tmp_path, capsys):
    def run(path, every):
        rows = [dict(key=str(i), domain=("normal", "dyslexic")[i % 2], ref="가나다라마바",
                     hyp="가나다" if i % every == 0 else "가나다라마바") for i in range(100)]
        path.write_text(json.dumps({"samples": rows}))
        return str(path)

    a, b = run(tmp_path / "a.json", 2), run(tmp_path / "b.json", 10)
    assert evaluate.main(["--compare", a, b, "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "a real difference" in out and "all" in out
    table = json.loads((tmp_path / "c.json").read_text())["compare"]
    assert table["all"]["cer_a"] == 0.25 and table["all"]["cer_b"] == 0.05 and table["all"]["real"]
    (tmp_path / "bad.json").write_text("{}")
    assert evaluate.main(["--compare", a, str(tmp_path / "bad.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"wdx.evaluate: error: --compare {tmp_path / 'bad.json'}: not a wdx.evaluate --json output")


def test_in_loop_eval_runs_the_encoder_once_per_batch_and_compares_domain_tokens(tiny_model, tiny_dataset):
    from accelerate import Accelerator

    from wdx.data.collate import Collator
    from wdx.data.pipeline import ShardedSamples, make_loader
    from wdx.data.shards import load_split
    from wdx.model.whisper import setup
    from wdx.train.evaluation import evaluate as run_eval

    w, _ = setup(tiny_model, language="ko", encoder_layers=1, decoder_layers=1)
    val = ShardedSamples(load_split(tiny_dataset, "val_small"), rank=0, world_size=1, num_workers=0, batch_size=4,
                         train=False, seed=0, target_sr=16000, default_domain=None, shuffle_block=1,
                         collate=Collator(w.tokenizer, "ko"))
    calls = []
    w.model.model.encoder.register_forward_hook(lambda *a: calls.append(1))
    out = run_eval(Accelerator(cpu=True), w.model, make_loader(val, 0), w.tokenizer, n_mels=80, max_new_tokens=3,
                   compare_domains=True)
    assert len(out["rows"]) == 6 and len(calls) == 2  # 2 batches: loss + 2 generations share one encoder pass
    assert all(r["hyp_by_prompt"][r["domain"]] == r["hyp"] and set(r["hyp_by_prompt"]) == {"normal", "dyslexic"}
               for r in out["rows"])
    assert {d: out["prompts"][d]["n"] for d in ("normal", "dyslexic")} == {"normal": 3, "dyslexic": 3}
    assert set(out["prompts"]["normal"]) == {"prompt_normal", "prompt_dyslexic", "n", "changed"}


def test_nonfinite_and_silent_audio_are_refused_by_the_tools_as_training_skips_them(tiny_final, tmp_path, capsys):
    # issue 22.7: main transcribed NaN audio as "!!!!!!!!" and digital silence without a word
    import numpy as np

    nan = tmp_path / "nan.wav"
    wave = speechlike(1.0, 16000)
    wave[100] = np.nan
    import soundfile as sf

    sf.write(nan, wave, 16000, subtype="FLOAT")
    silent = tmp_path / "silent.wav"
    silent.write_bytes(encode_audio(np.zeros(16000, np.float32), 16000, "wav"))
    assert transcribe.main([tiny_final, str(nan), str(silent), "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert f"wdx.transcribe: skipped {nan}: nonfinite_audio: NaN or inf samples" in err
    assert f"wdx.transcribe: skipped {silent}: silent_audio: no signal above -80 dBFS" in err


def test_compare_pairs_rows_by_shard_and_key_and_refuses_repeated_ids(tmp_path, capsys):
    rows = [dict(key="k", id=f"shard_{i}.tar/k", domain="normal", ref="가나다라", hyp="가나다라") for i in range(2)]
    same = tmp_path / "same.json"
    same.write_text(json.dumps({"samples": rows}))
    assert evaluate.main(["--compare", str(same), str(same)]) == 0
    assert "within noise" in capsys.readouterr().out  # main paired by key: "a real difference" between equal files
    old = tmp_path / "old.json"  # an output of the version before ids: keys repeat
    old.write_text(json.dumps({"samples": [{k: v for k, v in r.items() if k != "id"} for r in rows]}))
    assert evaluate.main(["--compare", str(old), str(old)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"wdx.evaluate: error: --compare {old}: 1 sample ids occur more than once (first: 'k', 2 times); rows are "
        "paired by id, so each must be unique (evaluate again with this version, which writes shard/key ids)")


def test_a_truncated_model_directory_is_one_line_for_every_tool(tiny_final, tmp_path, capsys):
    # issue 22.9: main printed tracebacks from transformers / safetensors
    import shutil

    from wdx.deploy import export_ct2

    (path,) = clips(tmp_path, 1)
    for damaged in ("config.json", "model.safetensors"):
        bad = shutil.copytree(tiny_final, tmp_path / f"bad-{damaged}")
        data = (bad / damaged).read_bytes()
        (bad / damaged).write_bytes(data[: len(data) // 2])
        assert transcribe.main([str(bad), str(path)]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"wdx.transcribe: error: {bad}: cannot load the model") and "\n" not in err, err
        assert export_ct2.main([str(bad), str(tmp_path / "ct2")]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("wdx.export_ct2: error: ") and "\n" not in err, err


def test_misread_fidelity_comes_from_target_text_in_lists_and_datasets(tiny_final, tmp_path, make_split, capsys):
    # issue 23.3: the json field `target_text` (wdx.pack takes it as a manifest column) reaches the evaluation
    from tests.conftest import make_sample

    paths = clips(tmp_path, 2)
    listing = tmp_path / "list.jsonl"
    rows = [{"audio_path": paths[0].name, "text": "오느 학교에서", "domain": "dyslexic",
             "target_text": "오늘 학교에서"},
            {"audio_path": paths[1].name, "text": "안녕", "domain": "normal"}]
    listing.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    out = tmp_path / "r.json"
    assert evaluate.main([tiny_final, "--list", str(listing), "--max-new-tokens", "2", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert (results["dyslexic"]["misread_utts"], results["dyslexic"]["misread_words"]) == (1, 1)
    assert results["normal"]["misread_utts"] == 0 and results["normal"]["misread_faithful"] is None
    table = capsys.readouterr().out
    assert "misread words (said unlike the target_text" in table and "normal        n/a" in table
    sample = make_sample("d0", text="오느 학교에서", domain="dyslexic", seconds=1.0)
    sample["json"] = json.dumps({"domain": "dyslexic", "target_text": "오늘  학교에서"}).encode()
    root = make_split("val_small", [sample, make_sample("n0", text="안녕", seconds=1.0)])
    assert evaluate.main([tiny_final, "--dataset", root, "--max-new-tokens", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [s["target"] for s in report["samples"]] == ["오늘 학교에서", None]
    assert report["results"]["dyslexic"]["misread_words"] == 1


def test_opus_webm_and_aac_are_read_by_the_tools_and_the_data_layer(tiny_final, tmp_path, make_split, capsys):
    # issue 25.3: main refused .opus (and webm/aac), which PyAV decodes and faster-whisper reads
    from tests.conftest import make_sample

    paths = []
    for ext, rate in (("opus", 48000), ("webm", 16000), ("aac", 22050)):
        paths.append(tmp_path / f"clip.{ext}")
        paths[-1].write_bytes(encode_audio(speechlike(1.0, rate, seed=len(paths)), rate, ext))
    assert transcribe.main([tiny_final, *map(str, paths), "--max-new-tokens", "2"]) == 0
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == [str(p) for p in paths]
    root = make_split("val_small", [make_sample(f"s{i}", ext=ext, rate=rate, seconds=1.0)
                                    for i, (ext, rate) in enumerate((("opus", 48000), ("aac", 16000)))])
    out = tmp_path / "r.json"
    assert evaluate.main([tiny_final, "--dataset", root, "--max-new-tokens", "2", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["results"]["all"]["n"] == 2 and not json.loads(out.read_text())["skipped"]


def test_max_new_tokens_holds_for_a_final_that_also_stores_one(tiny_final, caplog):
    # final/ now stores max_length only (with both, transformers warned on every pipeline call);
    # one written before stores max_new_tokens=443 too, which must not override the caller's
    import logging

    import torch
    from transformers import WhisperForConditionalGeneration

    from wdx.scoring.forward import generate
    from wdx.scoring.inference import HFTranscriber

    model = WhisperForConditionalGeneration.from_pretrained(tiny_final).eval()
    prompts = torch.tensor([HFTranscriber(tiny_final).prompt("normal")])
    features = torch.randn(1, 80, 3000)
    with caplog.at_level(logging.WARNING):
        assert generate(model, features, prompts, max_new_tokens=3).shape[1] <= 3
    assert not [r for r in caplog.records if "max_new_tokens" in r.getMessage()]
    model.generation_config.max_new_tokens = 443
    assert generate(model, features, prompts, max_new_tokens=3).shape[1] <= 3
