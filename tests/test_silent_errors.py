"""Issue 31: silent wrong results, round 2 (data, model and tool side; runs: test_adversarial_runs.py)."""

import contextlib
import json
import math
import shutil
import unicodedata
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train_loop
from tests.conftest import make_sample
from tests.test_adversarial_data import members_of, write_raw_shard
from tests.test_data import flat, run
from wdx import strictjson
from wdx.data.augment import SpecAugment, spec_masks
from wdx.data.pack import write_split
from wdx.data.pipeline import DatasetError, check_domain_skips, decode_sample, group_members
from wdx.data.shards import load_split
from wdx.model.domains import parse_domains
from wdx.model.whisper import ModelLoadError, frozen_sha256, setup


def decoded(raw: dict, **kw):
    return decode_sample(raw, target_sr=16000, split_domain=None, default_domain=None, **kw)


# ---- 8, 16: the sample json

def test_a_bad_sample_json_is_a_skip_whatever_else_the_sample_holds():
    base = make_sample("a", domain="dyslexic", domain_in="member")  # a .domain member: main never read the json
    assert decoded({**base, "json": b'{"domain": "dyslexic",'}).startswith("bad_sample_json:")  # main: JSONDecodeError
    assert decoded({**base, "json": b"[]"}) == "bad_sample_json: a list, not an object"  # main: AttributeError
    assert decoded({**base, "json": b"\xff\xfe"}) == "bad_sample_json: not UTF-8"
    odd = {**base, "json": json.dumps({"marks": ["b"], "raw_text": 7, "target_text": 3, "fluent_text": []}).encode()}
    out = decoded(odd)  # a hand-made json's fields of the wrong type are ignored, never a crash downstream
    assert (out["marks"], out["raw_text"], out["target"], out["fluent"]) == ({}, None, None, None)
    bom = make_sample("b", domain="dyslexic")
    bom["json"] = "\ufeff".encode() + bom["json"]  # main: skipped as bad json while a BOM'd transcript passed
    assert decoded(bom)["domain"] == "dyslexic"


def test_a_dotted_json_member_belongs_to_its_sample_in_either_order(tmp_path):
    a, b = make_sample("0001", domain="dyslexic"), make_sample("0002", domain="dyslexic")
    for s in (a, b):
        s["meta.json"] = s.pop("json")
    # sorted tar order puts 0001.meta.json before 0001.txt; 0002's comes after its audio
    members = [("0001.meta.json", a["meta.json"]), ("0001.flac", a["flac"]), ("0001.txt", a["txt"]),
               ("0002.flac", b["flac"]), ("0002.meta.json", b["meta.json"]), ("0002.txt", b["txt"])]
    write_raw_shard(tmp_path / "data" / "val_small", members, declared=2)
    files = [{"fname": name, "data": data} for name, data in members]
    samples = list(group_members(files, "x"))
    assert [s["__key__"] for s in samples] == ["0001", "0002"]  # main: 0001.meta, 0001, 0002, 0002.meta
    assert all(decoded(s)["domain"] == "dyslexic" for s in samples)
    keys, skips = run(str(tmp_path / "data"), split="val_small", train=False, batch=10, default_domain="normal")
    assert flat(keys) == ["0001", "0002"] and not skips


# ---- 9: a headerless pcm's rate

@pytest.mark.parametrize("rate, verdict", [(0, "pcm_bad_rate"), (-16000, "pcm_bad_rate"), (16000.5, "pcm_bad_rate"),
                                           (True, "pcm_bad_rate"), ("16000", "pcm_bad_rate"),
                                           (None, "pcm_without_rate"), (16000.0, None), (8000, None)])
def test_a_pcm_rate_that_cannot_be_a_rate_is_a_named_skip(rate, verdict):
    pcm = (np.sin(np.arange(16000) / 5) * 8000).astype("<i2").tobytes()
    meta = {"domain": "normal"} if rate is None else {"domain": "normal", "sample_rate": rate}
    out = decoded({"__key__": "k", "pcm": pcm, "txt": "안녕".encode(), "json": json.dumps(meta).encode()})
    if verdict is None:
        assert out["sample_rate"] == int(rate) and out["duration"] == pytest.approx(16000 / rate)
    else:
        assert isinstance(out, str) and out.startswith(verdict + ":"), out  # main: ZeroDivisionError at 0


# ---- 10, 11: domains

def test_domains_that_collide_or_that_the_model_does_not_know():
    with pytest.raises(ValueError, match="'all' names the row of every results table"):
        parse_domains("normal,all")
    assert decoded(make_sample("a", domain="all"), domains=None) == "unknown_domain: 'all'"
    check_domain_skips("train", {"unknown_domain": 5}, 100)  # 5 %: counted, trained on
    with pytest.raises(DatasetError, match=r"^train: 6 of 100 samples skipped for their domain \(unknown_domain 6;"):
        check_domain_skips("train", {"unknown_domain": 6, "too_long": 50}, 100)


def test_a_short_shard_read_by_two_slots_is_one_count_mismatch(tmp_path):
    samples = [make_sample(f"s{i}", seed=i, seconds=0.3, text="안녕") for i in range(4)]
    write_raw_shard(tmp_path / "data" / "val_small", [m for s in samples for m in members_of(s)], declared=8)
    counts = Counter()
    for w in range(2):  # eval slots [0, 4) and [4, 8): the shard ends where slot 1 begins
        counts.update(run(str(tmp_path / "data"), split="val_small", train=False, batch=10, world=2, rank=w)[1])
    assert counts == {"count_mismatch": 1}
    write_raw_shard(tmp_path / "d2" / "val_small", [m for s in samples[:1] for m in members_of(s)], declared=8)
    counts = Counter()
    for w in range(4):  # four slots of 2; the shard ends in slot 0: slots 1-3 read nothing and count nothing
        counts.update(run(str(tmp_path / "d2"), split="val_small", train=False, batch=10, world=4, rank=w)[1])
    assert counts == {"count_mismatch": 1}  # main: 4


# ---- 16: paths

def test_a_shard_listed_in_nfc_and_stored_in_nfd_is_read(tmp_path):
    name = "학교.tar"
    write_split(tmp_path / "data" / "val_small", [make_sample("a"), make_sample("b", seed=1)], max_count=5)
    split_dir = tmp_path / "data" / "val_small"
    written = json.loads((split_dir / "metadata.json").read_text())
    (split_dir / written["shards"][0]["filename"]).rename(split_dir / unicodedata.normalize("NFD", name))
    written["shards"][0]["filename"] = unicodedata.normalize("NFC", name)
    (split_dir / "metadata.json").write_text(json.dumps(written, ensure_ascii=False))
    split = load_split(str(tmp_path / "data"), "val_small")  # main: "listed in metadata.json but missing"
    assert split.files == (unicodedata.normalize("NFD", name),)
    keys, _ = run(str(tmp_path / "data"), split="val_small", train=False, batch=10)
    assert flat(keys) == ["a", "b"]


def test_a_missing_local_base_model_says_so(tmp_path):
    for path in (str(tmp_path / "no" / "such"), "./final", "runs/r/final"):
        with pytest.raises(ModelLoadError, match=f"^--base-model {path}: no such directory$"):
            setup(path, language="ko", encoder_layers=1, decoder_layers=1)  # main: "Repo id must be in the form"


# ---- 15: every JSON the tools write parses strictly

def strict_loads(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_written_json_has_no_bare_nan():
    report = {"results": {"adhd": {"n": 0, "cer": math.nan, "wer": math.inf}, "all": {"cer": 0.1}}, "rows": [1.5]}
    assert strict_loads(strictjson.dumps(report)) == {"results": {"adhd": {"n": 0, "cer": None, "wer": None},
                                                                  "all": {"cer": 0.1}}, "rows": [1.5]}
    from wdx.train.checkpoint import TrainState

    state = TrainState(best_results={"normal": {"cer": math.nan}})
    assert strict_loads(state.to_json())["best_results"] == {"normal": {"cer": None}}


# ---- 3: SpecAugment once, where the flags say

def test_spec_augment_runs_once_and_never_in_the_padding(tiny_model, tmp_path):
    from transformers import WhisperConfig

    from wdx.config import parse_args
    from wdx.data import augment
    from wdx.scoring.forward import token_loss_sum

    base = tmp_path / "spec-base"
    shutil.copytree(tiny_model, base)
    config = WhisperConfig.from_pretrained(base)
    config.apply_spec_augment, config.mask_time_prob, config.mask_feature_prob = True, 0.5, 0.3
    config.save_pretrained(base)
    w, _ = setup(str(base), language="ko", encoder_layers=1, decoder_layers=1)
    w.model.train()
    features = torch.randn(1, w.model.config.num_mel_bins, 3000)
    batch = {"decoder_input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([[2, 3, 4]])}
    losses = {float(token_loss_sum(w.model, {"input_features": features.clone()}, batch).detach()) for _ in range(3)}
    assert len(losses) == 1  # main: transformers masked again, differently at every call
    # the base config's SpecAugment is ours to apply (said in the log); --no-spec-augment is really off
    cfg = parse_args(["--dataset-root", "x", "--run-name", "x"])
    assert augment.build(cfg, w.model.config).spec == SpecAugment.from_config(w.model.config)
    assert augment.build(parse_args(["--dataset-root", "x", "--run-name", "x", "--no-spec-augment"]),
                         w.model.config) is None
    # time masks fall within the clip's frames, as transformers draws them under the attention mask
    for seed in range(20):
        masks = spec_masks(SpecAugment(mask_time_prob=0.5), np.random.default_rng(seed), 80, length=120)
        assert masks["time"][:120].any() and not masks["time"][120:].any()


# ---- 4, 7: the frozen weights' hash and the defaults

def test_the_frozen_hash_leaves_the_seeded_domain_rows_out(tiny_model):
    a, _ = setup(tiny_model, language="ko", encoder_layers=1, decoder_layers=1, seed=1)
    b, _ = setup(tiny_model, language="ko", encoder_layers=1, decoder_layers=1, seed=2)
    assert not torch.equal(a.model.get_input_embeddings().weight, b.model.get_input_embeddings().weight)
    assert frozen_sha256(a.model) == frozen_sha256(b.model)  # main: differ, and a resume with --seed 2 refused
    c, _ = setup(tiny_model, language="ko", encoder_layers=2, decoder_layers=1, seed=1)
    assert frozen_sha256(c.model) != frozen_sha256(a.model)  # another freeze is still told apart


def test_setup_and_the_cli_share_the_rows_init_default():
    import inspect

    from wdx.config import TrainConfig

    assert inspect.signature(setup).parameters["rows_init"].default == TrainConfig().domain_rows_init == 1.0


def test_a_diverged_eval_loss_spends_patience_and_an_empty_cer_does_not():
    from wdx.config import parse_args
    from wdx.train.checkpoint import TrainState

    cfg = parse_args(["--dataset-root", "x", "--run-name", "x", "--early-stopping-patience", "2",
                      "--metric-for-best-model", "loss"])
    state, verdicts = TrainState(), []
    for step, loss in enumerate([1.0, math.nan, math.nan], start=1):
        state.step = step
        verdicts.append(train_loop.judge(cfg, state, {"results": {"all": {"cer": 0.5, "wer": 0.5}}, "loss": loss},
                                         False))
    assert verdicts == [(True, False), (False, False), (False, True)]  # main: NaN never counted, never stopped
    assert (state.best_step, state.evals_without_improvement) == (1, 2)
    cfg = parse_args(["--dataset-root", "x", "--run-name", "x", "--early-stopping-patience", "1"])
    state = TrainState(step=1)
    assert train_loop.judge(cfg, state, {"results": {"all": {"cer": math.nan, "wer": math.nan}}, "loss": 1.0},
                            False) == (False, False)


# ---- 6: the schedule writes into the optimizer that steps

def test_the_schedule_follows_an_optimizer_that_replaced_its_groups():
    from transformers import get_scheduler

    from wdx.train.accel import schedule_the_stepping_optimizer

    p = torch.nn.Parameter(torch.zeros(2))
    ours = torch.optim.AdamW([{"params": [p], "name": "blocks"}], lr=1.0)
    scheduler = get_scheduler("linear", ours, num_warmup_steps=0, num_training_steps=10)
    # what Accelerate does under ZeRO-Offload: another optimizer made from our group dicts, wrapped twice
    stepping = torch.optim.AdamW(ours.param_groups, lr=1.0)
    wrapped = SimpleNamespace(optimizer=SimpleNamespace(optimizer=stepping, param_groups=stepping.param_groups))
    schedule_the_stepping_optimizer(scheduler, wrapped)
    stepping.load_state_dict(stepping.state_dict())  # a resume: new group dicts
    stepping.step()
    scheduler.step()
    assert stepping.param_groups[0]["lr"] == pytest.approx(scheduler.get_last_lr()[0]) == pytest.approx(0.9)


# ---- 12: in-training evaluation scores every domain the model has

def test_a_base_model_s_third_domain_is_trained_and_scored(tiny_model, tmp_path):
    from wdx.config import parse_args

    final = tmp_path / "final"
    w, _ = setup(tiny_model, language="ko", encoder_layers=1, decoder_layers=1, domains=("normal", "dyslexic", "adhd"))
    for part in (w.model, w.tokenizer, w.feature_extractor):
        part.save_pretrained(final)
    samples = [make_sample(f"a{i}", seed=i, domain=d, seconds=0.5, text="안녕")
               for i, d in enumerate(("normal", "dyslexic", "adhd", "adhd"))]
    write_split(tmp_path / "data" / "train", samples)
    write_split(tmp_path / "data" / "val_small", samples)
    cfg = parse_args(["--dataset-root", str(tmp_path / "data"), "--run-name", "x", "--base-model", str(final),
                      "--num-workers", "0", "--per-device-eval-batch-size", "4"])
    whisper, _ = setup(str(final), language="ko", encoder_layers=1, decoder_layers=1, domains=cfg.domain_names)
    accelerator = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"))
    _, _, val, loader = train_loop.build_data(cfg, accelerator, whisper)
    val.set_epoch(0)
    batch = next(iter(loader))
    # main: the adhd clips skipped as unknown_domain, in training and in the in-training evaluation
    assert sorted(batch["domain"]) == ["adhd", "adhd", "dyslexic", "normal"] and not batch["skips"]


# ---- 10, 13, 16: the encoder cache

def test_the_cache_fingerprint_covers_the_prefix_code_and_libraries_not_the_domain_order(tiny_model, monkeypatch):
    from wdx.config import parse_args
    from wdx.model import lm_head
    from wdx.train import encoder_cache

    def fingerprint(domains: str) -> dict:
        cfg = parse_args(["--dataset-root", "x", "--run-name", "x", "--domains", domains])
        w, _ = setup(tiny_model, language="ko", encoder_layers=2, decoder_layers=1, domains=cfg.domain_names)
        return encoder_cache.fingerprint(cfg, w.model, [], torch.float32, {})

    one = fingerprint("normal,dyslexic")
    assert fingerprint("dyslexic,normal") == one  # main: refused as built for other --domains
    assert one["libraries"]["torch"] == torch.__version__.split("+")[0] and set(one["libraries"]) == {
        "torch", "torchaudio", "transformers", "numpy", "soundfile", "av"}
    before = encoder_cache.code_sha256()
    monkeypatch.setattr(lm_head.DomainWhisper, "encoder_prefix", lambda self, features: features)
    assert encoder_cache.code_sha256() != before  # main: the prefix's own code was not in the hash


def test_non_adjacent_members_count_the_same_from_the_cache_as_from_audio(tiny_model, tmp_path):
    a, b, c = (make_sample(k, seed=i, seconds=0.5, text="안녕") for i, k in enumerate("abc"))
    members = ([m for m in members_of(a) if not m[0].endswith(".json")] + members_of(b)
               + [("a.json", a["json"])] + members_of(c))  # a's json comes after b
    for split in ("train", "val_small"):
        write_raw_shard(tmp_path / "data" / split, members, declared=3)

    def skipped(*extra) -> dict:
        run_dir = tmp_path / "runs" / str(len(extra))
        assert train_loop.main(["--dataset-root", str(tmp_path / "data"), "--base-model", tiny_model, "--output-dir",
                                str(run_dir.parent), "--run-name", run_dir.name, "--num-workers", "0",
                                "--per-device-train-batch-size", "1", "--num-train-epochs", "2",
                                "--train-encoder-layers", "2", "--eval-steps", "100", "--save-steps", "100",
                                "--generation-max-length", "2", "--default-domain", "normal", *extra]) == 0
        rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
        return {r["data/epochs_done"]: {k: v for k, v in r.items() if k.startswith("data/skipped/")}
                for r in rows if "data/epochs_done" in r}

    audio = skipped()
    assert audio == {1: {"data/skipped/non_adjacent_members": 1}, 2: {"data/skipped/non_adjacent_members": 2}}
    assert skipped("--encoder-cache", str(tmp_path / "cache")) == audio  # main: 0 and 0 from the cache


def test_a_failed_cache_write_closes_its_files(tiny_model, tiny_dataset, tmp_path, monkeypatch):
    import webdataset as wds

    from wdx.data.conventions import PLAIN
    from wdx.train import encoder_cache

    opened = []

    class Recorded(wds.TarWriter):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            opened.append(self)

    def full_disk(writers, path, batch, states):
        if batch["shard"] not in writers:
            writers[batch["shard"]] = wds.TarWriter(str(path) + ".partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(encoder_cache.wds, "TarWriter", Recorded)
    monkeypatch.setattr(encoder_cache, "_write", full_disk)
    w, _ = setup(tiny_model, language="ko", encoder_layers=2, decoder_layers=1)
    with pytest.raises(OSError, match="No space left"):
        encoder_cache.build_split(w.model, load_split(tiny_dataset, "val_small"), tmp_path / "cache", [0],
                                  batch_size=2, workers=0, target_sr=16000, default_domain=None, convention=PLAIN,
                                  domains=("normal", "dyslexic"), dtype=torch.float32, autocast=contextlib.nullcontext,
                                  device=torch.device("cpu"))
    # main left it open: its finaliser failed again later, an "Exception ignored" traceback after the one-line error
    assert opened and all(writer.own_fileobj is None for writer in opened)


def test_a_sample_split_across_two_shards_is_two_unusable_positions_each_counted_once(tmp_path):
    # issue 31.10: kept as it is. metadata.json counts the sample in both shards (each tar holds a record of
    # it), so it takes two plan positions; each is skipped once, by what it lacks, and nothing after shifts
    a, b, c = (make_sample(k, seed=i, seconds=0.5, text="안녕") for i, k in enumerate("abc"))
    split = tmp_path / "data" / "val_small"
    write_raw_shard(split, members_of(a) + [m for m in members_of(b) if not m[0].endswith(".txt")], declared=2,
                    name="shard_000000.tar")
    write_raw_shard(split, [("b.txt", b["txt"])] + members_of(c), declared=2, name="shard_000001.tar")
    (split / "metadata.json").write_text(json.dumps({"shards": [{"filename": "shard_000000.tar", "samples": 2},
                                                                {"filename": "shard_000001.tar", "samples": 2}]}))
    keys, skips = run(str(tmp_path / "data"), split="val_small", train=False, batch=10)
    assert flat(keys) == ["a", "c"] and skips == {"no_transcript": 1, "no_audio": 1}
