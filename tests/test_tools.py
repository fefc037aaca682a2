"""wdx.pack and wdx.inspect, run as users run them (python -m ...)."""

import csv
import json
import subprocess
import sys

from tests.conftest import speechlike
from wdx.data.audio import encode_audio
from wdx.data.shards import load_split

FORMATS = [("wav", 44100, 2), ("flac", 16000, 1), ("mp3", 22050, 1), ("ogg", 8000, 1), ("m4a", 48000, 1)]


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd)


def write_manifest(tmp_path, rows, kind="csv"):
    path = tmp_path / f"manifest.{kind}"
    if kind == "csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def audio_rows(tmp_path, n_per_format=2):
    rows = []
    for i in range(n_per_format):
        for j, (ext, rate, ch) in enumerate(FORMATS):
            name = f"clip{i}_{j}.{ext}"
            (tmp_path / name).write_bytes(encode_audio(speechlike(1.0, rate, i * 10 + j, ch), rate, ext))
            rows.append({"audio_path": name, "text": f"문장 {i} {j}", "domain": "dyslexic" if j % 2 else "normal",
                         "split": "val_small" if i == 0 else "train", "speaker": f"s{j}"})
    return rows


def test_pack_then_inspect_counts_every_format(tmp_path):
    rows = audio_rows(tmp_path, n_per_format=3)
    out = tmp_path / "ds"
    r = cli("wdx.pack", str(write_manifest(tmp_path, rows, "jsonl")), str(out), "--max-samples-per-shard", "4")
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "train" / "metadata.json").read_text())
    assert meta["total_samples"] == 10 and [s["samples"] for s in meta["shards"]] == [4, 4, 2]
    r = cli("wdx.inspect", str(out), "--json", str(tmp_path / "report.json"))
    assert r.returncode == 0, r.stderr
    train, val = json.loads((tmp_path / "report.json").read_text())
    assert (train["counted_samples"], train["metadata_samples"], train["usable_samples"]) == (10, 10, 10)
    assert val["usable_samples"] == 5 and val["shards"] == 2
    assert train["formats"] == {"wav": 2, "flac": 2, "mp3": 2, "ogg": 2, "m4a": 2}
    assert train["sample_rates"] == {"44100": 2, "16000": 2, "22050": 2, "8000": 2, "48000": 2}
    assert train["channels"] == {"2": 2, "1": 8}
    assert train["domains"] == {"normal": 6, "dyslexic": 4}
    assert abs(val["hours"] - 5 * 1.0 / 3600) < 0.1 / 3600  # AAC priming adds a few ms
    assert "samples           10 counted, 10 in metadata.json" in r.stdout


def test_inspect_reports_count_mismatch_and_skips(tmp_path):
    rows = audio_rows(tmp_path, n_per_format=2)
    out = tmp_path / "ds"
    assert cli("wdx.pack", str(write_manifest(tmp_path, rows)), str(out)).returncode == 0
    meta_path = out / "train" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["shards"][0]["samples"] = 7
    meta_path.write_text(json.dumps(meta))
    r = cli("wdx.inspect", str(out), "--splits", "train")
    assert r.returncode == 0, r.stderr
    assert "COUNT MISMATCH    shard_000000.tar: metadata says 7, tar holds 5" in r.stdout


def test_pack_skips_bad_rows_counted_and_listed_and_stops_above_the_skip_fraction(tmp_path):
    # issue 32.2: one bad row of 620,000 aborted the whole pack
    rows = audio_rows(tmp_path, n_per_format=2)
    rows[3]["domain"], rows[1]["audio_path"] = "kids", "missing.wav"
    (tmp_path / "odd.pcm").write_bytes(b"\x01\x02\x03")
    (tmp_path / "garbage.wav").write_bytes(b"RIFF not really audio")
    rows[5]["audio_path"], rows[6]["audio_path"] = "odd.pcm", "garbage.wav"
    rows[7]["text"] = "  "
    manifest = write_manifest(tmp_path, rows)
    r = cli("wdx.pack", str(manifest), str(tmp_path / "strict"), "--pcm-rate", "16000")
    assert r.returncode == 1
    # one unit per split (--max-samples-per-shard rows): val_small (rows 0-4) is judged first, 2 of its rows bad
    assert r.stderr.strip().splitlines()[-1] == (
        f"wdx.pack: error: 2 of {len(rows)} rows cannot be packed, more than --max-skip-fraction 0.01 "
        f"(missing_audio 1, unknown_domain 1); the first: {manifest}:3: {tmp_path}/missing.wav: No such file or "
        "directory")
    out = tmp_path / "ds"
    r = cli("wdx.pack", str(manifest), str(out), "--pcm-rate", "16000", "--max-skip-fraction", "0.5")
    assert r.returncode == 0, r.stderr
    listed = [line.split("\t") for line in (out / "manifest.skipped.tsv").read_text().splitlines()[1:]]
    assert [(where.rsplit(":", 1)[1], reason) for where, reason, _ in listed] == [
        ("3", "missing_audio"), ("5", "unknown_domain"), ("7", "corrupt_audio"), ("8", "corrupt_audio"),
        ("9", "missing_fields")]
    assert "skipped 5 of 10 rows: corrupt_audio 2, missing_audio 1, missing_fields 1, unknown_domain 1" in r.stderr
    assert sum(load_split(str(out), split).total for split in ("train", "val_small")
               if (out / split).exists()) == len(rows) - 5


def test_inspect_fails_in_one_line_on_a_missing_split(tmp_path):
    r = cli("wdx.inspect", str(tmp_path / "nope"))
    assert r.returncode == 1
    assert r.stderr.strip() == f"wdx.inspect: error: {tmp_path}/nope/train: split directory not found"


def test_pack_shuffles_a_domain_sorted_manifest_so_shards_mix_domains(tmp_path, capsys):
    # issue 22.8: main kept manifest order, so a manifest sorted by domain gave one-domain shards and
    # 41-51 % of batches without a dyslexic sample
    from wdx.data.inspect import format_report, inspect_split
    from wdx.data.pack import pack
    from wdx.data.shards import load_split

    (tmp_path / "a.wav").write_bytes(encode_audio(speechlike(0.5, 16000), 16000, "wav"))
    rows = [{"audio_path": "a.wav", "text": "안녕", "domain": d, "split": "train"}
            for d in ("normal", "dyslexic") for _ in range(8)]
    manifest = write_manifest(tmp_path, rows, "jsonl")
    pack(manifest, tmp_path / "mixed", max_count=4, max_bytes=2**30)
    pack(manifest, tmp_path / "sorted", max_count=4, max_bytes=2**30, seed=None)  # --keep-order
    mixed, ordered = (inspect_split(load_split(str(tmp_path / d), "train")) for d in ("mixed", "sorted"))
    assert mixed.one_domain_shards == 0 and mixed.domains == {"normal": 8, "dyslexic": 8}
    assert ordered.one_domain_shards == 4
    assert "one-domain shards 4 of 4: a batch mixes only the few shards" in format_report(ordered)


def test_inspect_with_the_base_model_counts_transcripts_training_skips(tmp_path, tiny_model):
    # issue 22.16: main called a transcript longer than the decoder holds usable; training skips it
    from wdx.data.inspect import inspect_split, text_encoder
    from wdx.data.pack import write_split
    from wdx.data.shards import load_split

    long_text = "".join(chr(0xAC00 + i * 7919 % 11172) for i in range(300))  # 300 syllables, no merges: > 442 tokens
    samples = [{"__key__": "long", "wav": encode_audio(speechlike(13.0, 16000), 16000, "wav"),
                "txt": long_text.encode(), "json": b'{"domain": "normal"}'},
               {"__key__": "ok", "wav": encode_audio(speechlike(1.0, 16000), 16000, "wav"),
                "txt": "안녕".encode(), "json": b'{"domain": "normal"}'}]
    write_split(tmp_path / "ds" / "train", samples)
    split = load_split(str(tmp_path / "ds"), "train")
    assert inspect_split(split).usable_samples == 2
    report = inspect_split(split, encode_text=text_encoder(tiny_model))
    assert report.usable_samples == 1 and report.skipped == {"transcript_too_long": 1}


def test_pack_gives_the_same_shards_for_any_worker_count_and_never_imports_torch(tmp_path):
    # issue 32.3: parallel over every core by default; a packing process does not pay ~800 MB for torch
    import hashlib

    rows = audio_rows(tmp_path, n_per_format=3)
    rows[4]["audio_path"] = "missing.wav"  # a skipped row changes no other row's shard
    manifest = write_manifest(tmp_path, rows)
    script = ("import sys, wdx.pack; code = wdx.data.pack.main(sys.argv[1:]); "
              "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(code)")
    digests = {}
    for workers in (1, 3):
        out = tmp_path / f"w{workers}"
        r = subprocess.run([sys.executable, "-c", script, str(manifest), str(out), "--max-samples-per-shard", "2",
                            "--workers", str(workers), "--max-skip-fraction", "0.2"], capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.strip() == "no torch", r.stderr
        digests[workers] = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
                            for p in sorted(out.rglob("*")) if p.is_file()}
    assert digests[1] == digests[3] and len([p for p in digests[1] if p.endswith(".tar")]) == 8
