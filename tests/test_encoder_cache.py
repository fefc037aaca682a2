"""--encoder-cache: the same training from cached frozen-prefix states as from audio; built once,
resumed when interrupted, refused when built for another set-up. (2-process DDP and ZeRO-2
with the cache: test_distributed.py.)"""

import functools
import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers.models.whisper.modeling_whisper import WhisperEncoder

import train_loop
import wdx.model.lm_head

TRAINED = 2  # of the tiny model's 4 encoder blocks: 2 frozen blocks are cached


def argv(data, model, out, run, *extra):
    return ["--dataset-root", data, "--base-model", model, "--output-dir", str(out), "--run-name", run,
            "--max-steps", "4", "--per-device-train-batch-size", "2", "--num-workers", "0", "--learning-rate", "3e-3",
            "--warmup-steps", "0", "--logging-steps", "1", "--eval-steps", "2", "--save-steps", "2",
            "--generation-max-length", "4", "--train-encoder-layers", str(TRAINED), "--train-decoder-layers",
            str(TRAINED), "--seed", "5", *extra]


def records(run_dir):
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


def losses(run_dir):
    return {r["step"]: r["train/loss"] for r in records(run_dir) if "train/loss" in r}


def eval_losses(run_dir):
    return {r["step"]: r["eval/loss"] for r in records(run_dir) if "eval/loss" in r}


def built(run_dir):
    (row,) = [r for r in records(run_dir) if "encoder_cache/clips_built" in r]
    return row


@pytest.fixture
def encoder_calls(monkeypatch):
    """Counts of full encoder passes (from log-mel) and of frozen-prefix passes (cache builds)."""
    calls = {"encoder": 0, "prefix": 0}
    full, prefix = WhisperEncoder.forward, wdx.model.lm_head.DomainWhisper.encoder_prefix

    def counted_full(self, *a, **k):
        calls["encoder"] += 1
        return full(self, *a, **k)

    @functools.wraps(prefix)  # the cache's code hash reads the source through it
    def counted_prefix(self, *a, **k):
        calls["prefix"] += 1
        return prefix(self, *a, **k)

    monkeypatch.setattr(WhisperEncoder, "forward", counted_full)
    monkeypatch.setattr(wdx.model.lm_head.DomainWhisper, "encoder_prefix", counted_prefix)
    return calls


@pytest.fixture(scope="module")
def runs(tiny_dataset, tiny_model, tmp_path_factory):
    """An fp32 run from audio and the same run from a cache it builds: (out dir, cache dir)."""
    out = tmp_path_factory.mktemp("cache_runs")
    assert train_loop.main(argv(tiny_dataset, tiny_model, out, "audio")) == 0
    assert train_loop.main(argv(tiny_dataset, tiny_model, out, "cached", "--encoder-cache", str(out / "cache"))) == 0
    return out, out / "cache"


def test_fp32_cache_trains_and_evaluates_as_audio_does(runs, tiny_dataset):
    out, cache = runs
    want, got = losses(out / "audio"), losses(out / "cached")
    assert sorted(got) == [1, 2, 3, 4]
    assert got == pytest.approx(want, rel=1e-5, abs=0)
    assert eval_losses(out / "cached") == pytest.approx(eval_losses(out / "audio"), rel=1e-5, abs=0)
    a, b = load_file(out / "audio" / "final" / "model.safetensors"), load_file(out / "cached" / "final" /
                                                                               "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    # the cache mirrors the source shards: same names, same keys in the same order
    row = built(out / "cached")
    assert row["encoder_cache/clips_built"] == 30 and row["encoder_cache/mb_per_clip"] == 1500 * 64 * 4 / 1e6
    from wdx.data.pipeline import iter_shard

    names = sorted(p.name for p in (cache / "train").glob("*.tar"))
    assert sorted(p.name for p in (cache / "train").glob("*.done")) == [f"{n}.done" for n in names]
    assert names == sorted(p.name for p in (Path(tiny_dataset) / "train").glob("*.tar"))
    assert [s["__key__"] for s in iter_shard(str(cache / "train" / names[0]))] == [f"tr00{i}" for i in range(5)]


def test_a_built_cache_is_reused_without_running_the_frozen_blocks(runs, tiny_dataset, tiny_model, tmp_path,
                                                                   encoder_calls):
    out, cache = runs
    assert train_loop.main(argv(tiny_dataset, tiny_model, tmp_path, "again", "--encoder-cache", str(cache))) == 0
    assert encoder_calls == {"encoder": 0, "prefix": 0}  # training and evaluation both start from the cache
    assert built(tmp_path / "again")["encoder_cache/clips_built"] == 0
    assert losses(tmp_path / "again") == losses(out / "cached")


def test_resuming_a_cached_run_is_exact(runs, tiny_dataset, tiny_model, tmp_path):
    out, cache = runs
    ckpt = out / "cached" / "checkpoints" / "step-0000002"
    shutil.copytree(ckpt, tmp_path / "resumed" / "checkpoints" / ckpt.name)
    assert train_loop.main(argv(tiny_dataset, tiny_model, tmp_path, "resumed", "--encoder-cache", str(cache),
                                "--resume-from-checkpoint", "latest")) == 0
    full = losses(out / "cached")
    assert losses(tmp_path / "resumed") == pytest.approx({3: full[3], 4: full[4]}, abs=1e-6)


def test_an_interrupted_build_resumes_with_the_shards_not_yet_written(runs, tiny_dataset, tiny_model, tmp_path,
                                                                      encoder_calls, capfd):
    out, cache = runs
    partial = tmp_path / "cache"
    shutil.copytree(cache, partial)
    (partial / "train" / "shard_000003.tar").unlink()  # the build died while writing it: only its .partial exists
    (partial / "train" / "shard_000003.tar.partial").write_bytes(b"half a tar")
    assert train_loop.main(argv(tiny_dataset, tiny_model, tmp_path, "r", "--encoder-cache", str(partial))) == 0
    assert "building 1 of train's 5 shards on process 0" in capfd.readouterr().out
    assert encoder_calls["prefix"] == 1 and built(tmp_path / "r")["encoder_cache/clips_built"] == 5
    assert losses(tmp_path / "r") == losses(out / "cached")
    assert not (partial / "train" / "shard_000003.tar.partial").exists()


def test_a_cache_built_for_another_set_up_is_refused_naming_what_differs(runs, tiny_dataset, tiny_model, tmp_path,
                                                                        capsys):
    out, cache = runs
    mine = tmp_path / "cache"
    shutil.copytree(cache, mine)

    def refused(*extra) -> str:
        run = argv(tiny_dataset, tiny_model, tmp_path, "x", "--encoder-cache", str(mine), "--overwrite", *extra)
        assert train_loop.main(run) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err.strip().splitlines()[-1]

    line = refused("--train-encoder-layers", "1")
    assert line == (f"train_loop.py: error: --encoder-cache {mine}: built for another set-up: --train-encoder-layers "
                    "(frozen_blocks 2 -> 3); pass --rebuild-encoder-cache to build it again, or name another directory")
    assert "--default-domain (default_domain None -> normal)" in refused("--default-domain", "normal")
    shard = Path(tiny_dataset) / "train" / "shard_000001.tar"
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        assert "--dataset-root (train/shard_000001.tar changed)" in refused()
    finally:
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(SystemExit):
        train_loop.main(argv(tiny_dataset, tiny_model, tmp_path, "x", "--encoder-cache", str(mine), "--dropout", "0.1"))
    assert "--dropout 0.1: dropout in the frozen encoder blocks" in capsys.readouterr().err
    # told to, it builds again for the new set-up
    assert train_loop.main(argv(tiny_dataset, tiny_model, tmp_path, "y", "--encoder-cache", str(mine),
                                "--train-encoder-layers", "1", "--rebuild-encoder-cache", "--max-steps", "1")) == 0
    assert built(tmp_path / "y")["encoder_cache/clips_built"] == 30
    assert json.loads((mine / "fingerprint.json").read_text())["frozen_blocks"] == 3


def test_bf16_cache_holds_bf16_states_and_trains_within_tolerance(tiny_dataset, tiny_model, tmp_path):
    """The cache rounds the prefix's fp32 residual stream to bf16 once: losses stay within 1e-3 (relative)
    of training from audio in bf16 (measured here: ~1e-4)."""
    short = ["--max-steps", "2", "--bf16"]
    assert train_loop.main(argv(tiny_dataset, tiny_model, tmp_path, "audio", *short)) == 0
    assert train_loop.main(argv(tiny_dataset, tiny_model, tmp_path, "cached", *short, "--encoder-cache",
                                str(tmp_path / "cache"))) == 0
    assert built(tmp_path / "cached")["encoder_cache/mb_per_clip"] == 1500 * 64 * 2 / 1e6
    assert json.loads((tmp_path / "cache" / "fingerprint.json").read_text())["dtype"] == "bfloat16"
    want, got = losses(tmp_path / "audio"), losses(tmp_path / "cached")
    assert sorted(got) == [1, 2] and got == pytest.approx(want, rel=1e-3, abs=0)
    assert got != want  # the rounding is real: these are two different paths
    assert eval_losses(tmp_path / "cached") == pytest.approx(eval_losses(tmp_path / "audio"), rel=1e-3, abs=0)


def test_what_the_cache_cannot_serve_is_refused_before_any_work(tiny_model):
    from types import SimpleNamespace

    from wdx.config import TrainConfig
    from wdx.model.whisper import setup
    from wdx.train import encoder_cache

    cfg = TrainConfig(dataset_root="x", run_name="x", encoder_cache="/nonexistent/cache", train_encoder_layers=4)
    w, _ = setup(tiny_model, language="ko", encoder_layers=4, decoder_layers=1)
    plugin = SimpleNamespace(zero_stage=3)
    with pytest.raises(encoder_cache.CacheError, match="^--encoder-cache: not supported under ZeRO-3"):
        encoder_cache.ensure(cfg, SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)), w.model, [], None)
    with pytest.raises(encoder_cache.CacheError, match="--train-encoder-layers 4 trains every encoder block"):
        encoder_cache.ensure(cfg, SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None)), w.model, [], None)
    assert not Path("/nonexistent/cache").exists()


# ---- issue 22: stale or wrong states the cache served

def one_process():
    from types import SimpleNamespace

    return SimpleNamespace(num_processes=1, process_index=0)


def test_a_truncated_or_overwritten_cache_shard_is_built_again(runs, tiny_dataset, tiny_model, tmp_path, capfd):
    out, cache = runs
    mine = Path(shutil.copytree(cache, tmp_path / "cache"))
    shard = mine / "train" / "shard_000002.tar"
    shard.write_bytes(shard.read_bytes()[:5000])  # main: reused, its clips dropped as corrupt_cache, exit 0
    assert train_loop.main(argv(tiny_dataset, tiny_model, tmp_path, "r", "--encoder-cache", str(mine))) == 0
    log = capfd.readouterr().out
    assert f"encoder cache shard {shard}: 5000 bytes" in log and "building 1 of train's 5 shards" in log
    assert losses(tmp_path / "r") == losses(out / "cached")


def test_the_fingerprint_covers_split_domains_remote_shard_bytes_and_the_code(tiny_dataset, tmp_path, monkeypatch):
    from wdx.data import pipeline as data
    from wdx.data.shards import load_split
    from wdx.train import encoder_cache

    root = Path(shutil.copytree(tiny_dataset, tmp_path / "data"))
    piped = f"pipe:cat {root}/{{}}"
    splits = [load_split(piped, "train")]
    saved = {"splits": {"train": {"domain": None, "shards": encoder_cache.shard_list(
        splits[0], encoder_cache.remote_digests(one_process(), splits))}}}
    # a remote shard rewritten with the same sample count (main: name and count only, reused)
    victim = root / "train" / "shard_000001.tar"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one byte of audio
    victim.write_bytes(bytes(raw))
    want = {"splits": {"train": {"domain": None, "shards": encoder_cache.shard_list(
        splits[0], encoder_cache.remote_digests(one_process(), splits))}}}
    assert encoder_cache.differences(saved, want) == ["--dataset-root (train/shard_000001.tar changed)"]
    # the split's domain in metadata.json (main: not in the fingerprint; normal states trained as dyslexic)
    want = {"splits": {"train": {**saved["splits"]["train"], "domain": "dyslexic"}}}
    assert encoder_cache.differences(saved, want) == ["--dataset-root (train/metadata.json domain None -> dyslexic)"]
    # a fix in the code that makes the states and records
    before = encoder_cache.code_sha256()
    monkeypatch.setattr(data, "MIN_SECONDS", 0.2)
    assert encoder_cache.code_sha256() != before
    assert encoder_cache.differences({"code": before}, {"code": encoder_cache.code_sha256()}) == [
        encoder_cache.CAUSES["code"]]


def test_shards_of_one_name_in_two_folders_get_two_cache_files():
    from wdx.data.shards import Split
    from wdx.train import encoder_cache

    split = Split("train", ("/d/a/s.tar", "/d/b/s.tar"), (3, 4), None, ("a/s.tar", "b/s.tar"))
    assert encoder_cache.cache_names(split) == ["a__s.tar", "b__s.tar"]  # main: both "s.tar"
    mirror = encoder_cache.cached_split(Path("/c"), split)
    assert mirror.urls == ("/c/train/a__s.tar", "/c/train/b__s.tar") and mirror.counts == (3, 4)


def test_spec_augment_or_dropout_in_the_base_config_is_refused(tiny_model):
    from types import SimpleNamespace

    from wdx.config import TrainConfig
    from wdx.train import encoder_cache

    cfg = TrainConfig(dataset_root="x", run_name="x", encoder_cache="c", base_model="b")
    spec = SimpleNamespace(apply_spec_augment=True, mask_time_prob=0.05, mask_feature_prob=0.0)
    with pytest.raises(encoder_cache.CacheError, match=r"--base-model b enables SpecAugment \(apply_spec_augment"):
        encoder_cache.check_fixed(cfg, spec)
    with pytest.raises(encoder_cache.CacheError, match="--base-model b has attention_dropout 0.1"):
        encoder_cache.check_fixed(cfg, SimpleNamespace(attention_dropout=0.1))
    encoder_cache.check_fixed(cfg, SimpleNamespace(apply_spec_augment=False, mask_time_prob=0.05,
                                                   attention_dropout=0.0, activation_dropout=0.0))


def test_a_matching_cache_is_not_written_and_each_node_s_copy_is_checked(tmp_path, monkeypatch):
    from wdx.train import encoder_cache

    want = {"version": encoder_cache.VERSION, "dtype": "float32", "splits": {"train": {"domain": None, "shards": []}}}
    root = tmp_path / "cache"
    encoder_cache.open_cache(root, want, rebuild=False)

    def read_only(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Path, "write_text", read_only)  # main: rewrote the fingerprint, refused on a read-only mount
    encoder_cache.open_cache(root, want, rebuild=False)
    monkeypatch.undo()
    with pytest.raises(encoder_cache.CacheError, match="no fingerprint.json where process 1 looks; the directory "
                                                       "must be shared by every process, or copied to every node"):
        encoder_cache.check_copy(tmp_path / "elsewhere", want, 1)
    with pytest.raises(encoder_cache.CacheError, match=r"--mixed-precision \(dtype float32 -> bfloat16\) in "
                                                       "process 1's copy"):
        encoder_cache.check_copy(root, {**want, "dtype": "bfloat16"}, 1)
