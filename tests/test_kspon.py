"""A corpus in the AI Hub / KsponSpeech style (CP949 transcripts with markup, headerless .pcm
audio): packed, inspected, trained a step and evaluated, with the expected transcripts exactly."""

import csv
import json
import tarfile

import numpy as np
import pytest

import train_loop
from tests.conftest import speechlike
from tests.test_train_loop import args
from wdx.data import inspect, pack
from wdx.data.audio import encode_audio
from wdx.scoring import evaluate

# (as the corpus writes it, as training reads it, its fluent form, domain, split, audio)
CORPUS = [
    ("b/ 아/ 모+ 몬 소리야 (70%)/(칠 십 퍼센트) 확률이라니 n/", "아 모 몬 소리야 칠 십 퍼센트 확률이라니",
     "몬 소리야 칠 십 퍼센트 확률이라니", "dyslexic", "train", "pcm"),
    ("l/ 그 (3kg)/(삼 킬로그램)짜리 o/ 수박을 샀어요", "그 삼 킬로그램짜리 수박을 샀어요", None,
     "normal", "train", "pcm"),
    ("어/ 오늘은 b/ 날씨가 좋네요", "어 오늘은 날씨가 좋네요", "오늘은 날씨가 좋네요", "dyslexic", "train", "wav"),
    ("（２０２４년）/（이천 이십 사 년）에 왔어요", "이천 이십 사 년에 왔어요", None, "normal", "train", "wav"),
    ("음/ *저기 학+ 학교에 u/ 가요", "음 저기 학 학교에 가요", "저기 학교에 가요", "dyslexic", "val_small", "pcm"),
    ("(1시)/(한 시)에 만나요", "한 시에 만나요", None, "normal", "val_small", "wav"),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """KsponSpeech's layout: one audio file and one CP949 transcript file per utterance."""
    root = tmp_path_factory.mktemp("kspon")
    rows = []
    for i, (written, _, _, domain, split, ext) in enumerate(CORPUS):
        wave = speechlike(2.5, 16000, seed=i)
        audio = root / f"KsponSpeech_{i:06d}.{ext}"
        audio.write_bytes((wave * 32767).astype("<i2").tobytes() if ext == "pcm" else encode_audio(wave, 16000, ext))
        (root / f"KsponSpeech_{i:06d}.txt").write_bytes(written.encode("cp949"))
        rows.append({"audio_path": audio.name, "text_path": f"KsponSpeech_{i:06d}.txt", "domain": domain,
                     "split": split})
    with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def packed(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "data"
    assert pack.main([str(corpus / "manifest.csv"), str(out), "--text-convention", "kspon", "--text-encoding",
                      "cp949", "--pcm-rate", "16000", "--max-samples-per-shard", "2"]) == 0
    return out


def members(split_dir):
    samples = {}
    for shard in sorted(split_dir.glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


def test_packing_converts_the_markup_keeps_what_was_written_and_stores_pcm_as_wav(packed):
    expected = {written: (text, fluent) for written, text, fluent, *_ in CORPUS}
    seen = {}
    for split in ("train", "val_small"):
        for sample in members(packed / split).values():
            meta = json.loads(sample["json"])
            assert set(sample) == {"wav", "txt", "json"}  # .pcm became wav: the same 16-bit samples, a header
            assert meta["text_convention"] == "kspon" and meta["dual_transcription"] == "pronunciation"
            seen[meta["raw_text"]] = (sample["txt"].decode("utf-8"), meta.get("fluent_text"))
    assert seen == {written.strip(): v for written, v in expected.items()}


def test_a_cp949_transcript_or_a_pcm_without_its_rate_is_refused_in_one_line(corpus, tmp_path, capsys, caplog,
                                                                             tiny_model):
    manifest = str(corpus / "manifest.csv")
    # a systematic problem stops the pack at its first rows (more than --max-skip-fraction), naming it
    assert pack.main([manifest, str(tmp_path / "a"), "--text-convention", "kspon", "--pcm-rate", "16000"]) == 1
    # (the train split's 4 rows are one unit of --max-samples-per-shard rows: the verdict comes after it)
    assert capsys.readouterr().err.strip().splitlines()[-1] == (  # after tqdm's progress lines
        "wdx.pack: error: 4 of 6 rows cannot be packed, more than --max-skip-fraction 0.01 (bad_encoding 4); the "
        f"first: {manifest}:2: {corpus / 'KsponSpeech_000000.txt'}: not utf-8 (Korean corpora are often CP949: "
        "--text-encoding cp949)")
    assert pack.main([manifest, str(tmp_path / "b"), "--text-convention", "kspon", "--text-encoding", "cp949"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "wdx.pack: error: 2 of 6 rows cannot be packed, more than --max-skip-fraction 0.01 (pcm_without_rate 2); the "
        f"first: {manifest}:2: KsponSpeech_000000.pcm: headerless .pcm: state its sample rate with --pcm-rate "
        "(KsponSpeech: 16000)")
    assert pack.main([manifest, str(tmp_path / "c"), "--text-encoding", "cp949", "--pcm-rate", "16000"]) == 0  # plain
    # issue 32.4: Kspon markup read as plain text is said, once, with the count (main: trained as words, silently)
    assert (f"{manifest}: 6 of 6 transcripts look like KsponSpeech / AI Hub markup (b/ n/ (A)/(B) X/ X+), read as "
            "written under --text-convention plain") in caplog.text
    caplog.clear()
    assert train_loop.main(args(str(tmp_path / "c"), tiny_model, tmp_path, "p", "--print-config")) == 0
    assert f"{tmp_path / 'c'}/train: 4 of 4 transcripts look like KsponSpeech" in capsys.readouterr().out
    assert not (tmp_path / "a").exists()  # stopped at its first row: nothing written
    # b stopped at its first pcm row: what was packed before it is a complete split, its rows listed as skipped
    from wdx.data.shards import load_split

    assert load_split(str(tmp_path / "b"), "train").total == 2  # the train unit's two wav rows
    assert (tmp_path / "b" / "manifest.skipped.tsv").read_text().splitlines()[1].split("\t")[1] == "pcm_without_rate"


def test_inspect_counts_each_mark_and_shows_written_against_trained(packed, capsys):
    assert inspect.main([str(packed)]) == 0
    out = capsys.readouterr().out
    assert ("marked up         4 transcripts: breath: 2, dual: 3, filler: 2, laughter: 1, noise: 1, other_voice: 1, "
            "repetition: 1") in out
    assert "marked up         2 transcripts: dual: 1, filler: 1, repetition: 1, unclear: 1" in out
    assert "    written  음/ *저기 학+ 학교에 u/ 가요\n    trained  음 저기 학 학교에 가요" in out


def test_the_data_layer_converts_a_split_packed_elsewhere_and_skips_markup_it_cannot_read(packed, tmp_path, capsys):
    from wdx.data.pack import write_split

    samples = [{"__key__": f"s{i}", "wav": encode_audio(speechlike(2.5, 16000, seed=i), 16000, "wav"),
                "txt": written.encode("utf-8"), "json": json.dumps({"domain": domain}).encode()}
               for i, (written, _, _, domain, *_rest) in enumerate(CORPUS)]
    samples.append({"__key__": "bad", "wav": samples[0]["wav"], "txt": "(70%)/칠십 퍼센트".encode(),
                    "json": b'{"domain": "normal"}'})
    write_split(tmp_path / "raw" / "val_small", samples)
    skipped = __import__("collections").Counter()
    from wdx.data.conventions import Convention

    got = [s for batch in evaluate.dataset_batches(str(tmp_path / "raw"), "val_small", 4, 0, None, skipped,
                                                   Convention("kspon")) for s in batch]
    assert [(s["text"], s["fluent"]) for s in got] == [(text, fluent) for _, text, fluent, *_ in CORPUS]
    assert dict(skipped) == {"markup_left": 1}


def test_a_kspon_corpus_trains_a_step_and_evaluates_verbatim_and_fluent(packed, tiny_model, tmp_path, capsys):
    # no --text-convention: the run reads (and records) what wdx.pack recorded in metadata.json (issue 32.4)
    assert train_loop.main(args(str(packed), tiny_model, tmp_path, "k", "--max-steps", "1", "--num-workers", "0",
                                "--per-device-train-batch-size", "2")) == 0
    assert "text convention kspon, pronunciation side (as " in capsys.readouterr().out
    config = json.loads((tmp_path / "k" / "final" / "train_config.json").read_text())
    assert (config["text_convention"], config["dual_transcription"]) == ("kspon", "pronunciation")
    assert "the pronunciation side of dual transcriptions" in (tmp_path / "k" / "final" / "README.md").read_text()
    out = tmp_path / "eval.json"
    assert evaluate.main([str(tmp_path / "k" / "final"), "--dataset", str(packed), "--max-new-tokens", "4",
                          "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert sorted((r["ref"], r["fluent"]) for r in report["samples"]) == sorted(
        (text, fluent) for _, text, fluent, _, split, _ in CORPUS if split == "val_small")
    assert report["results"]["dyslexic"]["cer_fluent"] is not None and report["results"]["normal"]["cer_fluent"] is None
    assert "CER without fillers and marked repetitions" in capsys.readouterr().out
    np.testing.assert_allclose(report["results"]["all"]["n"], 2)
    assert report["references"] == {"text_convention": "kspon", "dual_transcription": "pronunciation"}


def test_a_split_packed_under_a_convention_is_never_read_under_another(packed, tiny_model, tmp_path, capsys):
    # issue 32.4: main never compared them; a run with --dual-transcription spelling trained the pronunciation side
    # packed, and recorded "spelling" in its config, model card and encoder cache
    meta = json.loads((packed / "train" / "metadata.json").read_text())
    assert (meta["text_convention"], meta["dual_transcription"]) == ("kspon", "pronunciation")
    refusal = (f"{packed / 'train' / 'metadata.json'}: packed with --text-convention kspon --dual-transcription "
               "pronunciation (converted then); this run reads it with --text-convention {}: pass the packing's "
               "flags, or pack the corpus again with this run's")
    for flags, told in ((["--text-convention", "plain"], "plain"),
                        (["--text-convention", "kspon", "--dual-transcription", "spelling"],
                         "kspon --dual-transcription spelling")):
        assert train_loop.main(args(str(packed), tiny_model, tmp_path, "x", "--num-workers", "0", *flags)) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == "train_loop.py: error: " + refusal.format(told)
    assert inspect.main([str(packed), "--splits", "train", "--text-convention", "plain"]) == 1
    assert capsys.readouterr().err.strip() == "wdx.inspect: error: " + refusal.format("plain")


def test_kspon_scripts_pack_as_shipped_one_command_per_script_bad_rows_counted(tmp_path, caplog):
    # issue 32.1/32.2: KsponSpeech_scripts/*.trn (`path :: text`, paths under the corpus root, headerless 16 kHz pcm)
    root = tmp_path / "KsponSpeech"
    lines = {"train": [], "eval_clean": []}
    for i in range(12):
        split = "train" if i < 9 else "eval_clean"
        rel = (f"KsponSpeech_01/KsponSpeech_0001/KsponSpeech_{i + 1:06d}.pcm" if split == "train"
               else f"KsponSpeech_eval/eval_clean/KsponSpeech_E{i - 8:05d}.pcm")
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes((speechlike(1.5, 16000, seed=i) * 32767).astype("<i2").tobytes())
        lines[split].append(f"{rel} :: 음/ 오늘은 b/ (3kg)/(삼 킬로그램) 샀어요 {i}")
    (root / lines["train"][1].split(" :: ")[0]).unlink()  # missing audio
    (root / lines["train"][2].split(" :: ")[0]).write_bytes(b"\x00\x01\x02")  # odd-length pcm
    lines["train"][3] = lines["train"][3].split(" :: ")[0] + " :: b/ n/"  # nothing said after conversion
    lines["train"].append("not a trn line")
    scripts = root / "KsponSpeech_scripts"
    scripts.mkdir()
    for split, rows in lines.items():
        (scripts / f"{split}.trn").write_text("".join(f"{row}\n" for row in rows), encoding="utf-8")
    out = tmp_path / "data"
    argv = ["--audio-root", str(root), "--domain", "normal", "--max-skip-fraction", "0.5"]
    assert pack.main([str(scripts / "train.trn"), str(out), *argv]) == 0
    assert pack.main([str(scripts / "eval_clean.trn"), str(out), *argv]) == 0
    from wdx.data.shards import load_split

    assert (load_split(str(out), "train").total, load_split(str(out), "eval_clean").total) == (6, 3)
    listed = [line.split("\t")[:2] for line in (out / "train.skipped.tsv").read_text().splitlines()[1:]]
    trn = str(scripts / "train.trn")
    assert listed == [[f"{trn}:2", "missing_audio"], [f"{trn}:3", "corrupt_audio"], [f"{trn}:4", "empty_transcript"],
                      [f"{trn}:10", "bad_line"]]
    assert not (out / "eval_clean.skipped.tsv").exists()
    sample = next(iter(members(out / "eval_clean").values()))
    meta = json.loads(sample["json"])
    assert set(sample) == {"wav", "txt", "json"} and meta["text_convention"] == "kspon" and meta["domain"] == "normal"
    assert sample["txt"].decode().startswith("음 오늘은 삼 킬로그램 샀어요")
    assert "skipped 4 of 10 rows: bad_line 1, corrupt_audio 1, empty_transcript 1, missing_audio 1" in caplog.text


def test_the_target_text_is_read_on_the_reference_s_side_of_a_dual_transcription(tmp_path):
    # issue 33.2: the reference took the spelling side, the target kept the raw markup: misreads were invented
    import json

    from wdx.data.conventions import Convention
    from wdx.data.pipeline import clean_target
    from wdx.scoring.evaluate import list_items
    from wdx.scoring.metrics import misreads

    raw = "(학교)/(핵교)에 갔어요"
    listing = tmp_path / "list.jsonl"
    listing.write_text(json.dumps({"audio_path": "a.wav", "text": raw, "domain": "dyslexic", "target_text": raw},
                                  ensure_ascii=False) + "\n")
    for side, word in (("spelling", "학교에"), ("pronunciation", "핵교에")):
        (item,) = list_items(listing, Convention("kspon", side))
        assert item["text"] == item["target"] == f"{word} 갔어요"
        assert misreads(item["target"], item["text"], item["text"])["misread"] == 0
    assert clean_target(raw) == raw  # plain text is read as written, on both sides alike
