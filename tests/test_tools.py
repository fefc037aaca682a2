"""wdx.pack and wdx.inspect, run as users run them (python -m ...)."""

import csv
import json
import subprocess
import sys

from tests.conftest import speechlike
from wdx.audio import encode_audio

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


def test_pack_rejects_bad_rows_with_the_line_number_and_writes_nothing(tmp_path):
    rows = audio_rows(tmp_path, n_per_format=1)
    rows[3]["domain"] = "kids"
    out = tmp_path / "ds"
    r = cli("wdx.pack", str(write_manifest(tmp_path, rows)), str(out))
    assert r.returncode == 1 and not out.exists()
    assert r.stderr.strip().splitlines()[-1] == f"wdx.pack: error: {tmp_path}/manifest.csv:5: unknown domain 'kids' " \
                                                "(expected normal, dyslexic)"
    rows[3]["domain"], rows[1]["audio_path"] = "normal", "missing.wav"
    r = cli("wdx.pack", str(write_manifest(tmp_path, rows)), str(out))
    assert r.returncode == 1 and "manifest.csv:3:" in r.stderr and "No such file" in r.stderr


def test_inspect_fails_in_one_line_on_a_missing_split(tmp_path):
    r = cli("wdx.inspect", str(tmp_path / "nope"))
    assert r.returncode == 1
    assert r.stderr.strip() == f"wdx.inspect: error: {tmp_path}/nope/train: split directory not found"
