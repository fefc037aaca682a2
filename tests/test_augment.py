"""Augmentation: each kind changes the input and keeps the labels, is a function of (seed, epoch,
sample), never touches evaluation, and the encoder cache refuses what it cannot serve."""

import json
import shutil

import numpy as np
import pytest
import torch

import train_loop
from tests.conftest import speechlike
from tests.test_train_loop import args, losses
from wdx.data.audio import encode_audio
from wdx.data.augment import Augmenter, SpecAugment, add_noise, load_noise, spec_masks

AUGMENT = ("--speed-perturb", "0.9,1.0,1.1", "--noise-snr-db", "10,30", "--spec-augment", "--mask-feature-prob", "0.1")

SAMPLE = {"audio": speechlike(2.0, 16000, seed=1), "text": "안녕하세요", "domain": "dyslexic", "key": "k1",
          "shard": "shard_000000.tar", "target": None}


def test_speed_noise_and_masks_change_the_input_and_keep_the_labels():
    aug = Augmenter(seed=0, speeds=(0.9, 1.1), snr_db=(10.0, 10.0), spec=SpecAugment(mask_feature_prob=0.2))
    out = aug(SAMPLE, epoch=0)
    assert {k: out[k] for k in ("text", "domain", "key", "target")} == {k: SAMPLE[k] for k in
                                                                       ("text", "domain", "key", "target")}
    assert len(out["audio"]) in (round(32000 / 0.9), round(32000 / 1.1))  # played slower or faster
    assert out["spec_masks"]["time"].sum() >= 2 * 10 and out["spec_masks"]["feature"].any()
    noisy = add_noise(SAMPLE["audio"], np.random.default_rng(0), 10.0, ())
    snr = 10 * np.log10(np.mean(SAMPLE["audio"] ** 2) / np.mean((noisy - SAMPLE["audio"]) ** 2))
    assert abs(snr - 10.0) < 0.01


def test_the_same_seed_epoch_and_key_give_the_same_augmentation_and_another_epoch_another():
    aug = Augmenter(seed=3, speeds=(0.9, 1.0, 1.1), snr_db=(5.0, 25.0), spec=SpecAugment())
    a, b = aug(SAMPLE, 2), aug(dict(SAMPLE), 2)
    assert np.array_equal(a["audio"], b["audio"])
    assert all(np.array_equal(a["spec_masks"][k], b["spec_masks"][k]) for k in ("time", "feature"))
    epochs = [aug(SAMPLE, e) for e in range(4)]
    assert len({e["audio"].tobytes() for e in epochs}) == 4
    other_shard = aug({**SAMPLE, "shard": "shard_000001.tar"}, 2)  # keys repeat across shards; draws do not
    assert not np.array_equal(other_shard["audio"], a["audio"])
    state = np.random.get_state()[1].copy()
    spec_masks(SpecAugment(), np.random.default_rng(0), 80)
    assert np.array_equal(np.random.get_state()[1], state)  # numpy's global generator left as it was


def test_a_noise_directory_is_read_once_and_an_empty_one_refused(tmp_path):
    (tmp_path / "noise").mkdir()
    with pytest.raises(ValueError, match="--noise-dir .*: no audio files"):
        load_noise(tmp_path / "noise")
    (tmp_path / "noise" / "hum.flac").write_bytes(encode_audio(0.1 * np.sin(np.arange(8000) / 5).astype(np.float32),
                                                              8000, "flac"))
    (clip,) = load_noise(tmp_path / "noise")
    assert len(clip) == 16000  # resampled to 16 kHz
    out = Augmenter(seed=0, snr_db=(0.0, 0.0), noise=(clip,))(SAMPLE, 0)
    assert not np.array_equal(out["audio"], SAMPLE["audio"]) and len(out["audio"]) == len(SAMPLE["audio"])


def test_the_train_loader_augments_and_the_eval_loader_does_not(tiny_dataset, tiny_model):
    from wdx.data.collate import Collator
    from wdx.data.pipeline import ShardedSamples, make_loader
    from wdx.data.shards import load_split
    from wdx.model.whisper import setup
    from wdx.scoring.forward import model_input

    w, _ = setup(tiny_model, language="ko", encoder_layers=1, decoder_layers=1)
    aug = Augmenter(seed=0, speeds=(1.1,), snr_db=(20.0, 20.0), spec=SpecAugment(mask_feature_prob=0.1))

    def first_batch(train: bool, augment):
        ds = ShardedSamples(load_split(tiny_dataset, "val_small"), rank=0, world_size=1, num_workers=0, batch_size=2,
                            train=train, seed=0, target_sr=16000, default_domain=None, shuffle_block=1,
                            collate=Collator(w.tokenizer, "ko"), augment=augment)
        ds.set_epoch(0)
        return next(iter(make_loader(ds, 0)))

    clean, evaluated = first_batch(True, None), first_batch(False, aug)
    trained = first_batch(True, aug)
    assert torch.equal(evaluated["audio"], first_batch(False, None)["audio"]) and "spec_time_mask" not in evaluated
    assert trained["key"] == clean["key"] and torch.equal(trained["labels"], clean["labels"])  # labels kept
    assert trained["audio"].shape[1] < clean["audio"].shape[1]  # 1.1x faster: shorter
    features = model_input(trained, 80, torch.float32)["input_features"]
    assert (features[trained["spec_time_mask"][:, None, :].expand_as(features)] == 0).all()
    for i, mask in enumerate(trained["spec_feature_mask"]):  # each sample its own channels
        assert (features[i, mask] == 0).all() and mask.any()


def test_an_augmented_run_resumes_to_the_same_losses(tiny_dataset, tiny_model, tmp_path):
    full = tmp_path / "full"
    assert train_loop.main(args(tiny_dataset, tiny_model, full, "a", *AUGMENT)) == 0
    plain = tmp_path / "plain"
    assert train_loop.main(args(tiny_dataset, tiny_model, plain, "a", "--max-steps", "2")) == 0
    assert losses(plain / "a")[1] != pytest.approx(losses(full / "a")[1], abs=1e-6)  # the inputs did change
    resumed = tmp_path / "resumed"
    (resumed / "a" / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "a" / "checkpoints" / "step-0000004", resumed / "a" / "checkpoints" / "step-0000004")
    assert train_loop.main(args(tiny_dataset, tiny_model, resumed, "a", *AUGMENT, "--resume-from-checkpoint",
                                "latest")) == 0
    want, got = losses(full / "a"), losses(resumed / "a")
    assert sorted(got) == [5, 6]
    for step in (5, 6):
        assert got[step] == pytest.approx(want[step], abs=1e-5)


def test_the_encoder_cache_refuses_augmentation_and_a_base_config_s_specaugment_is_honoured(
        tiny_dataset, tiny_model, tmp_path, capsys):
    CACHE = ("--encoder-cache", str(tmp_path / "ec"), "--train-encoder-layers", "2")  # a frozen prefix to cache
    for extra, named in ((("--speed-perturb", "0.9,1.1"), "--speed-perturb"),
                         (("--noise-snr-db", "10,30", "--spec-augment"), "--noise-snr-db and --spec-augment")):
        with pytest.raises(SystemExit):
            train_loop.main(args(tiny_dataset, tiny_model, tmp_path, "c", *CACHE, *extra))
        assert f"--encoder-cache with {named}: the cache holds the frozen blocks' output" in capsys.readouterr().err
    base = shutil.copytree(tiny_model, tmp_path / "spec_base")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "apply_spec_augment": True, "mask_time_prob": 0.2}))
    assert train_loop.main(args(tiny_dataset, str(base), tmp_path, "c", *CACHE)) == 2
    assert "enables SpecAugment (apply_spec_augment, mask_time_prob 0.2" in capsys.readouterr().err
    assert train_loop.main(args(tiny_dataset, str(base), tmp_path, "s", "--max-steps", "1")) == 0
    captured = capsys.readouterr()
    assert "SpecAugment from --base-model's config (apply_spec_augment)" in captured.out + captured.err
    assert train_loop.main(args(tiny_dataset, str(base), tmp_path, "n", "--max-steps", "1", "--no-spec-augment",
                                *CACHE)) == 0  # off, said so: the cache serves


@pytest.mark.parametrize("flags, message", [
    (("--speed-perturb", "0.9,fast"), "--speed-perturb '0.9,fast' / --noise-snr-db '': comma-separated numbers"),
    (("--speed-perturb", "0.9,3"), "--speed-perturb 0.9,3: factors between 0.5 and 2.0"),
    (("--noise-snr-db", "30,10"), "--noise-snr-db 30,10: LOW,HIGH with LOW <= HIGH"),
    (("--noise-dir", "noise/"), "--noise-dir: give the SNR range too (--noise-snr-db LOW,HIGH)"),
    (("--spec-augment", "--mask-time-prob", "1.5"), "--mask-time-prob / --mask-feature-prob: between 0 and 1"),
])
def test_bad_augmentation_flags_are_refused_at_start_naming_the_flag(flags, message, capsys):
    from wdx.config import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--dataset-root", "d", "--base-model", "m", "--run-name", "r", *flags])
    assert message in capsys.readouterr().err
