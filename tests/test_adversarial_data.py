"""Issue 14, data side: inputs that used to lose or mislabel samples without a word."""

import io
import json
import logging
import tarfile
from collections import Counter

import pytest

from tests.conftest import make_sample
from tests.test_data import flat, good, loader, run
from wdx.data.pack import write_split
from wdx.data.shards import DatasetError, load_split
from wdx.data.text import normalize_for_cer, normalize_text
from wdx.scoring.metrics import error_rates


def write_raw_shard(split_dir, members: list[tuple[str, bytes]], declared: int, name="shard_000000.tar"):
    """A shard with exactly these (member name, bytes), in order; metadata.json declares `declared`."""
    split_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(split_dir / name, "w") as tar:
        for member, data in members:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (split_dir / "metadata.json").write_text(json.dumps({"shards": [{"filename": name, "samples": declared}]}))


def members_of(sample: dict, upper: str = "") -> list[tuple[str, bytes]]:
    key = sample["__key__"]
    return [(f"{key}.{upper or ext}" if ext == "flac" else f"{key}.{ext}", data)
            for ext, data in sample.items() if ext != "__key__"]


def test_a_duplicated_key_skips_only_the_duplicate(tmp_path):
    a, b, c, d, e = (make_sample(k, seed=i, seconds=0.3) for i, k in enumerate("abcde"))
    members = (members_of(a) + members_of(b) + members_of(a)  # `a` comes back later in the shard
               + members_of(c) + [("c.FLAC", c["flac"])]  # two audio members of one sample
               + members_of(d) + members_of(e))
    write_raw_shard(tmp_path / "data" / "val_small", members, declared=5)  # 5 samples; `a` comes back, not a 6th
    keys, skips = run(str(tmp_path / "data"), split="val_small", train=False, batch=10)
    assert flat(keys) == ["a", "b", "d", "e"]  # main: ["a", "b", "a"], the rest of the shard lost
    assert skips == {"non_adjacent_members": 1, "duplicate_key": 1}


def test_a_bom_or_zero_width_characters_are_not_trained_or_scored():
    assert normalize_text("\ufeff안녕\u200b하세요\u200d ") == "안녕하세요"
    assert normalize_for_cer("\ufeff안녕하세요") == "안녕하세요"
    assert error_rates(["\ufeff안녕하세요 반가워요"], ["안녕하세요 반가워요"]) == {
        "cer": 0.0, "cer_lo": None, "cer_hi": None, "wer": 0.0, "swer": 0.0, "n": 1, "sub": 0.0, "del": 0.0, "ins": 0.0,
        "runaway": 0}


def test_a_bom_in_a_transcript_member_is_gone_from_the_batch(make_split):
    root = make_split("val_small", [make_sample("a", text="\ufeff안녕하세요"), make_sample("b", text="반가\u200b워요")])
    (batch,) = list(loader(root, "val_small", train=False, batch=4)[1])
    assert batch["text"] == ["안녕하세요", "반가워요"]


def test_an_unreadable_sample_json_is_a_counted_skip_not_the_split_domain(make_split):
    bad = {"cp949": "{\"domain\": \"dyslexic\", \"speaker\": \"김\"}".encode("cp949"),
           "trailing_comma": b'{"domain": "dyslexic",}', "a_list": b'["dyslexic"]'}
    samples = [dict(make_sample(k, domain=None), json=v) for k, v in bad.items()] + [make_sample("ok", domain=None)]
    root = make_split("val_small", samples, domain="normal")
    keys, skips = run(root, split="val_small", train=False, batch=8)
    assert flat(keys) == ["ok"]  # main trained all four as "normal"
    assert skips == {"bad_sample_json": 3}


def test_eval_counts_skips_after_a_slots_last_sample(make_split):
    samples = good(2) + [dict(make_sample("bad1"), flac=b"junk"), dict(make_sample("bad2"), txt=b"")]
    root = make_split("val_small", samples)
    keys, skips = run(root, split="val_small", train=False, batch=2)
    assert flat(keys) == ["g000", "g001"]
    assert skips == {"corrupt_audio": 1, "empty_transcript": 1}  # main: {} (both after the last batch)


def test_metadata_that_contradicts_the_shards(make_split, tmp_path, caplog):
    root = make_split("val_small", good(6), max_count=3)
    meta_path = tmp_path / "data" / "val_small" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    # a shard listed twice would be read twice per epoch
    meta_path.write_text(json.dumps({**meta, "shards": meta["shards"] + meta["shards"][:1]}))
    with pytest.raises(DatasetError, match=r"metadata.json: shards\[2\] \(shard_000000.tar\) is listed twice"):
        load_split(root, "val_small")
    # a shard on disk that metadata.json does not list is named; one longer than declared is counted
    meta_path.write_text(json.dumps({"shards": [{"filename": "shard_000000.tar", "samples": 2}]}))
    with caplog.at_level(logging.WARNING):
        split = load_split(root, "val_small")
        keys, skips = run(root, split="val_small", train=False, batch=8)
    assert "1 .tar file(s) in the split are not listed in metadata.json and will not be read: shard_000001.tar" \
        in caplog.text
    assert split.total == 2 and flat(keys) == ["g000", "g001"]
    assert skips == {"count_mismatch": 1}  # main: the third sample vanished without a count
    assert "more samples than the 2 metadata.json says" in caplog.text


def domain_shards(tmp_path, n_shards=4, per_shard=32):
    """A split written domain by domain: each shard holds one domain only."""
    root = tmp_path / "data"
    samples = [make_sample(f"s{j}k{i:02d}", seed=i, seconds=0.2, domain=("normal", "dyslexic")[j % 2])
               for j in range(n_shards) for i in range(per_shard)]
    write_split(root / "train", samples, max_count=per_shard)
    return str(root)


@pytest.mark.parametrize("epoch", [0, 1])
def test_batches_mix_shards_written_domain_by_domain(tmp_path, epoch):
    root = domain_shards(tmp_path)
    batches = [b["domain"] for b in loader(root, batch=8, block=16, epoch=epoch, lanes=4)[1]]
    assert len(batches) == 16
    assert all(set(d) == {"normal", "dyslexic"} for d in batches)  # main: every batch held one domain
    one_lane = [b["domain"] for b in loader(root, batch=8, block=16, epoch=epoch, lanes=1)[1]]
    assert all(len(set(d)) == 1 for d in one_lane)  # --open-shards 1: the old behaviour


@pytest.mark.parametrize("workers", [0, 2])
def test_mixed_reading_still_resumes_exactly(tmp_path, workers):
    root = domain_shards(tmp_path, n_shards=3, per_shard=20)
    ds, dl = loader(root, batch=4, block=8, workers=workers, lanes=4)
    whole = list(dl)
    assert len(set(flat(b["key"] for b in whole))) == 60
    for stopped_after in (1, 5, 9):
        starts = [None] * max(1, workers)
        for b in whole[:stopped_after]:
            starts[b["worker"]] = b["resume"]
        ds.set_epoch(0, [s or type(whole[0]["resume"])() for s in starts])
        assert [b["key"] for b in dl] == [b["key"] for b in whole[stopped_after:]]


def test_mixed_lanes_with_a_bad_sample_and_uneven_shards_keep_batches_equal(make_split):
    from tests.test_data import uneven_split

    root = uneven_split(make_split, bad_key="k010")
    per_rank = [[b["key"] for b in loader(root, rank=r, world=2, workers=2, batch=2, lanes=3)[1]] for r in range(2)]
    assert [len(k) for k in per_rank] == [6, 6]  # 25 samples, 4 slots of 6 (one left out)
    counts = Counter(flat(per_rank[0]) + flat(per_rank[1]))
    assert "k010" not in counts and sum(counts.values()) == 24
    assert sum(n - 1 for n in counts.values()) == 1  # the bad sample's slot refilled from its own range once


def test_roots_that_cannot_be_opened_fail_in_one_line():
    with pytest.raises(DatasetError, match=r"^s3://bucket/d/train/metadata.json: reading s3:// needs a package that "
                                           r"is not installed \(.*\); install fsspec and its s3 backend$"):
        load_split("s3://bucket/d", "train")  # s3fs is not installed here
    with pytest.raises(DatasetError, match=r"^--dataset-root 'pipe:cat \{\}/\{x\}': a pipe: root takes exactly one"):
        load_split("pipe:cat {}/{x}", "train")
    with pytest.raises(DatasetError, match="^foo://x/train/metadata.json: Protocol not known: foo$"):
        load_split("foo://x", "train")


# ---- issue 22: inputs that still got through

def test_members_of_a_sample_apart_in_the_tar_shift_nothing_after_them(tmp_path):
    from wdx.data.inspect import inspect_split

    a, b, c, d = (make_sample(k, seed=i, seconds=0.5, text="안녕") for i, k in enumerate("abcd"))
    members = ([m for m in members_of(a) if not m[0].endswith(".txt")] + members_of(b)
               + [("a.txt", a["txt"])] + members_of(c) + members_of(d))  # a's transcript comes after b
    write_raw_shard(tmp_path / "data" / "train", members, declared=4)
    keys, skips = run(str(tmp_path / "data"), batch=1, block=1)  # 4 batches planned: one refilled
    assert sorted(set(flat(keys))) == ["b", "c", "d"]  # main: c and d never trained (count_mismatch)
    assert skips == {"no_transcript": 1, "non_adjacent_members": 1}
    report = inspect_split(load_split(str(tmp_path / "data"), "train"))
    assert (report.counted_samples, report.usable_samples, report.count_mismatches) == (4, 3, [])
    assert report.skipped == {"no_transcript": 1, "non_adjacent_members": 1}


def test_dotted_keys_and_two_audio_members(tmp_path):
    a, b, c = (make_sample(k, seed=i, seconds=0.5, text="안녕") for i, k in enumerate(("spk.01.utt", "b", "c")))
    members = members_of(a) + members_of(b) + [("b.wav", encode_audio_like(b))] + members_of(c)
    write_raw_shard(tmp_path / "data" / "val_small", members, declared=3)
    keys, skips = run(str(tmp_path / "data"), split="val_small", train=False, batch=10)
    assert flat(keys) == ["spk.01.utt", "c"]  # main: key "spk", an unsupported_audio skip and a count mismatch
    assert skips == {"ambiguous_audio": 1}


def encode_audio_like(sample) -> bytes:
    from tests.conftest import speechlike
    from wdx.data.audio import encode_audio

    return encode_audio(speechlike(0.5, 16000, 9), 16000, "wav")


def test_too_short_and_constant_audio_are_skipped(tmp_path):
    import numpy as np

    from wdx.data.audio import encode_audio

    short = make_sample("short", seconds=0.05, text="안녕하세요")
    one = {**make_sample("one", text="안녕"), "flac": encode_audio(np.full(1, 0.3, np.float32), 16000, "wav")}
    one["wav"] = one.pop("flac")
    dc = {**make_sample("dc", text="안녕"), "flac": encode_audio(np.full(16000, 0.25, np.float32), 16000, "flac")}
    fast = make_sample("fast", seconds=0.5, text="가" * 40)  # 40 characters in half a second
    write_split(tmp_path / "data" / "val_small", [short, one, dc, fast, make_sample("ok", seconds=0.5, text="안녕")])
    keys, skips = run(str(tmp_path / "data"), split="val_small", train=False, batch=10)
    assert flat(keys) == ["ok"]
    assert skips == {"too_short": 3, "silent_audio": 1}


def test_a_refilled_slot_counts_each_bad_sample_once(tmp_path):
    # 8 samples, 2 empty transcripts: a pass gives 6, the 4 planned batches of 2 need 8, so the slot
    # reads its range again; main counted the two bad samples again there (4 instead of 2)
    samples = good(8, seconds=0.4, text="안녕")
    for s in samples[:2]:
        s["txt"] = b" "
    write_split(tmp_path / "data" / "train", samples)
    keys, skips = run(str(tmp_path / "data"), batch=2, block=1)
    assert len(flat(keys)) == 8 and skips == {"empty_transcript": 2}
