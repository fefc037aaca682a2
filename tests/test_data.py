import io
import json
import logging
import math
import tarfile
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.conftest import make_sample, speechlike
from wdx.data.audio import encode_audio
from wdx.data.pipeline import Position, ShardedSamples, make_loader
from wdx.data.shards import DatasetError, load_split


def loader(root, split="train", *, rank=0, world=1, workers=0, batch=2, train=True, seed=0, block=4,
           default_domain=None, epoch=0, starts=None, spp=None, lanes=1):
    ds = ShardedSamples(load_split(root, split, spp), rank=rank, world_size=world, num_workers=workers,
                        batch_size=batch, train=train, seed=seed, target_sr=16000, default_domain=default_domain,
                        shuffle_block=block, open_shards=lanes)
    ds.set_epoch(epoch, starts)
    return ds, make_loader(ds, workers)


def run(root, **kw):
    """All batches of one epoch: (keys per batch, summed skip counts)."""
    ds, dl = loader(root, **kw)
    keys, skips = [], Counter()
    for b in dl:
        if not b.get("empty"):  # an eval slot's trailing skips come alone
            keys.append(b["key"])
        skips.update(b["skips"])
    return keys, skips


def flat(keys):
    return [k for batch in keys for k in batch]


def good(n, prefix="g", **kw):
    return [make_sample(f"{prefix}{i:03d}", seed=i, **kw) for i in range(n)]


def test_resampled_lengths_text_and_fields(make_split):
    samples = [make_sample("a", ext="wav", rate=44100, channels=2, seconds=1.0, text="  안녕\n 하세요 "),
               make_sample("b", ext="mp3", rate=22050, seconds=2.0),
               make_sample("c", ext="ogg", rate=8000, seconds=0.5),
               make_sample("d", ext="m4a", rate=48000, seconds=1.0),
               make_sample("e", ext="flac", rate=16000, seconds=3.0)]
    root = make_split("val_small", samples)
    ds, dl = loader(root, "val_small", train=False, batch=10)
    (batch,) = list(dl)
    lengths = dict(zip(batch["key"], batch["duration"]))
    assert batch["key"] == ["a", "b", "c", "d", "e"]  # eval: shard order, no shuffle
    assert batch["text"][0] == "안녕 하세요"
    assert lengths["a"] == 1.0 and lengths["b"] == 2.0 and lengths["c"] == 0.5 and lengths["e"] == 3.0
    assert batch["audio"].dtype == torch.float32 and batch["audio"].shape == (5, 48000)
    # the padded tail of the shortest clip is zeros; its 8000 real samples are not
    assert batch["audio"][2, 8000:].abs().max() == 0 and batch["audio"][2, :8000].abs().max() > 0.05


def test_broken_samples_are_skipped_and_counted_by_reason(make_split, tmp_path, caplog):
    nan_wav = io.BytesIO()
    sf.write(nan_wav, np.full(1600, np.nan, np.float32), 16000, format="WAV", subtype="FLOAT")
    nan = {"__key__": "nan", "wav": nan_wav.getvalue(), "txt": "가".encode(), "json": b'{"domain": "normal"}'}
    bad = [
        {"__key__": "garbage", "wav": b"RIFF garbage" * 40, "txt": "가".encode(), "json": b'{"domain": "normal"}'},
        make_sample("empty", ext="wav", seconds=0.0),
        nan,
        {k: v for k, v in make_sample("notext").items() if k != "txt"},
        make_sample("dom", domain="dyslexia"),
        make_sample("nodom", domain=None),
        make_sample("long", seconds=40.0),
        make_sample("latin1", text="x") | {"txt": "한국".encode("euc-kr")},
        make_sample("blank", text="   "),
        make_sample("silent", ext="wav") | {"wav": encode_audio(np.zeros(16000, np.float32), 16000, "wav")},
        {"__key__": "midi", "mid": b"MThd...", "txt": "가".encode(), "json": b'{"domain": "normal"}'},
    ]
    root = make_split("val_small", good(3) + bad + good(2, "h"))
    # a second shard, truncated in the middle of its third sample
    write_path = tmp_path / "data" / "val_small"
    from wdx.data.pack import write_split
    write_split(tmp_path / "trunc", good(4, "t"))
    src = tmp_path / "trunc" / "shard_000000.tar"
    with tarfile.open(src) as tf:
        cut = [m for m in tf.getmembers() if m.name.startswith("t002")][0].offset_data + 100
    (write_path / "shard_000001.tar").write_bytes(src.read_bytes()[:cut])
    meta = json.loads((write_path / "metadata.json").read_text())
    meta["shards"].append({"filename": "shard_000001.tar", "samples": 4})
    meta["total_samples"] += 4
    (write_path / "metadata.json").write_text(json.dumps(meta))

    with caplog.at_level(logging.WARNING):
        keys, skips = run(root, split="val_small", train=False, batch=4)
    # t001 is complete but was still being grouped when t002's data broke off: webdataset's
    # group_by_keys loses it with the rest of the shard
    assert flat(keys) == ["g000", "g001", "g002", "h000", "h001", "t000"]
    assert skips == {"corrupt_audio": 1, "empty_audio": 1, "nonfinite_audio": 1, "no_transcript": 1,
                     "unknown_domain": 1, "no_domain": 1, "too_long": 1, "bad_transcript_encoding": 1,
                     "empty_transcript": 1, "corrupt_shard": 1, "silent_audio": 1, "unsupported_audio": 1}
    assert "shard_000000.tar/dom: unknown_domain ('dyslexia')" in caplog.text
    assert "shard_000001.tar" in caplog.text


def test_domain_resolution_order(make_split):
    samples = [make_sample("m", domain="dyslexic", domain_in="member"),
               make_sample("j", domain="dyslexic", domain_in="json"),
               make_sample("n", domain=None)]
    root = make_split("val_small", samples, domain="normal")
    ds, dl = loader(root, "val_small", train=False, batch=3)
    (b,) = list(dl)
    assert dict(zip(b["key"], b["domain"])) == {"m": "dyslexic", "j": "dyslexic", "n": "normal"}
    # without a split domain, --default-domain decides
    root2 = make_split("train", [make_sample("n", domain=None)])
    ds, dl = loader(root2, "val_small" if False else "train", train=False, batch=1, default_domain="dyslexic")
    assert list(dl)[0]["domain"] == ["dyslexic"]


UNEVEN = (7, 1, 5, 3, 9)  # 25 samples in 5 shards of very different sizes


def uneven_split(make_split, bad_key=None):
    samples, n = [], 0
    for count in UNEVEN:
        for _ in range(count):
            s = make_sample(f"k{n:03d}", seed=n, seconds=0.2)
            if f"k{n:03d}" == bad_key:
                s["flac"] = b"broken"
            samples.append(s)
            n += 1
    root = make_split("train", [])
    return make_split_shards(root, samples)


def make_split_shards(root, samples):
    from pathlib import Path

    from wdx.data.pack import write_split
    split_dir = Path(root) / "train"
    for f in split_dir.iterdir():
        f.unlink()
    # one shard per UNEVEN entry
    shards, i = [], 0
    for j, count in enumerate(UNEVEN):
        sub = split_dir / f"tmp{j}"
        write_split(sub, samples[i:i + count])
        (sub / "shard_000000.tar").rename(split_dir / f"shard_{j:06d}.tar")
        shards.append({"filename": f"shard_{j:06d}.tar", "samples": count})
        i += count
    (split_dir / "metadata.json").write_text(json.dumps({"total_samples": i, "shards": shards}))
    return root


@pytest.mark.parametrize("bad_key", [None, "k010"])
def test_two_ranks_two_workers_uneven_shards_yield_equal_batches(make_split, bad_key):
    root = uneven_split(make_split, bad_key)
    per_rank = [run(root, rank=r, world=2, workers=2, batch=2) for r in range(2)]
    ds, _ = loader(root, rank=0, world=2, workers=2, batch=2)
    # 25 samples over 4 slots: 6 each (1 left out this epoch), batches of 2+2+2 per worker
    assert len(per_rank[0][0]) == len(per_rank[1][0]) == len(ds) == 6
    assert [len(b) for b in per_rank[0][0]] == [2] * 6
    seen = flat(per_rank[0][0]) + flat(per_rank[1][0])
    if bad_key is None:
        assert len(seen) == len(set(seen)) == 24
    else:  # the slot that lost a sample refills from its own range: one repeat, still 24 samples
        assert bad_key not in seen and len(seen) == 24 and len(set(seen)) == 23
        assert per_rank[0][1] + per_rank[1][1] == {"corrupt_audio": 1}


def test_eval_reads_every_sample_once_across_ranks_and_workers(make_split):
    root = uneven_split(make_split)
    seen = [k for r in range(2) for k in flat(run(root, rank=r, world=2, workers=2, batch=4, train=False)[0])]
    assert sorted(seen) == [f"k{i:03d}" for i in range(25)]


def test_shuffle_is_seeded_and_changes_per_epoch(make_split):
    root = uneven_split(make_split)
    a, _ = run(root, seed=1, epoch=0)
    b, _ = run(root, seed=1, epoch=0)
    c, _ = run(root, seed=1, epoch=1)
    d, _ = run(root, seed=2, epoch=0)
    assert a == b and a != c and a != d
    assert sorted(flat(a)) == sorted(flat(b)) and flat(a) != sorted(flat(a))


@pytest.mark.parametrize("workers,stopped_after", [(0, 3), (2, 3), (2, 4), (2, 7)])
def test_resume_position_replays_the_rest_of_the_epoch_exactly(make_split, workers, stopped_after):
    root = uneven_split(make_split, bad_key="k004")
    full, _ = run(root, workers=workers, batch=3, epoch=3, seed=5)
    ds, dl = loader(root, workers=workers, batch=3, epoch=3, seed=5)
    starts = [Position()] * max(1, workers)
    for _, b in zip(range(stopped_after), dl):
        starts[b["worker"]] = b["resume"]
    rest, _ = run(root, workers=workers, batch=3, epoch=3, seed=5, starts=starts)
    assert rest == full[stopped_after:]


def test_metadata_problems(make_split, tmp_path, caplog):
    root = make_split("train", good(4), max_count=2)
    meta = tmp_path / "data" / "train" / "metadata.json"
    meta.unlink()
    with pytest.raises(DatasetError, match="metadata.json: not found; pass --samples-per-shard"):
        load_split(root, "train")
    with caplog.at_level(logging.WARNING):
        assert load_split(root, "train", samples_per_shard=2).counts == (2, 2)
    assert "assuming 2 samples in each of 2 shards" in caplog.text
    meta.write_text("{not json")
    with pytest.raises(DatasetError, match="metadata.json: not valid JSON"):
        load_split(root, "train")
    meta.write_text(json.dumps({"total_samples": 5, "shards": [{"filename": "shard_000000.tar", "samples": 2},
                                                                {"filename": "shard_000001.tar", "samples": 2}]}))
    with caplog.at_level(logging.WARNING):
        assert load_split(root, "train").total == 4
    assert "total_samples=5 but the shards' counts add up to 4" in caplog.text
    meta.write_text(json.dumps({"shards": [{"filename": "shard_000009.tar", "samples": 2}]}))
    with pytest.raises(DatasetError, match="shard_000009.tar: listed in metadata.json but missing"):
        load_split(root, "train")
    with pytest.raises(DatasetError, match="val_small: split directory not found"):
        load_split(root, "val_small", samples_per_shard=2)
    meta.write_text(json.dumps({"shards": [], "total_samples": 0}))
    with pytest.raises(DatasetError, match="no shards"):
        load_split(root, "train")
    meta.write_text(json.dumps({"shards": [{"filename": "shard_000000.tar", "samples": 2}], "domain": "kids"}))
    with pytest.raises(DatasetError, match="unknown domain 'kids'"):
        load_split(root, "train")


def test_a_shard_shorter_than_its_metadata_is_reported_and_its_slot_refilled(make_split, tmp_path):
    root = make_split("train", good(6), max_count=3)
    meta = tmp_path / "data" / "train" / "metadata.json"
    m = json.loads(meta.read_text())
    m["shards"][0]["samples"], m["total_samples"] = 5, 8  # the first shard really holds 3
    meta.write_text(json.dumps(m))
    keys, skips = run(root, batch=2, seed=0, block=1)
    assert skips["count_mismatch"] >= 1
    assert [len(b) for b in keys] == [2, 2, 2, 2]  # 8 planned samples, still 4 full batches


def test_pipe_url_root_reads_the_same_samples(make_split):
    root = make_split("val_small", good(5), max_count=2)
    local, _ = run(root, split="val_small", train=False)
    piped, _ = run(f"pipe:cat {root}/{{}}", split="val_small", train=False)
    assert piped == local and len(flat(local)) == 5


def test_a_split_too_small_for_its_slots_fails_with_the_split_name(make_split):
    root = make_split("train", good(3))
    with pytest.raises(DatasetError, match="train: 3 samples cannot feed 4 loader slots"):
        loader(root, world=2, workers=2)


def test_a_slot_with_no_usable_sample_fails_instead_of_spinning(make_split):
    bad = [make_sample(f"b{i}", domain="kids") for i in range(4)]
    root = make_split("train", bad)
    with pytest.raises(DatasetError, match="samples in a row unusable"):
        run(root)


def test_lengths_match_what_is_yielded(make_split):
    root = uneven_split(make_split)
    for train in (True, False):
        ds, dl = loader(root, rank=1, world=2, workers=2, batch=4, train=train)
        assert len(ds) == len(list(dl)) == (4 if train else math.ceil(6 / 4) + math.ceil(7 / 4))


def test_speechlike_fixture_is_not_silent():
    assert np.abs(speechlike(0.5, 16000)).max() > 0.1
