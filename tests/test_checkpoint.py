import json

import pytest

from wdx.config import ConfigError, TrainConfig
from wdx.train import checkpoint
from wdx.train.accel import reconcile_deepspeed


def make(run, *names):
    for n in names:
        (run / "checkpoints" / n).mkdir(parents=True)
        (run / "checkpoints" / n / checkpoint.STATE_FILE).write_text("{}")


def test_half_written_checkpoints_are_never_latest_and_never_push_good_ones_out(tmp_path):
    make(tmp_path, "step-0000002", "step-0000004", ".tmp-step-0000006")
    assert checkpoint.latest(tmp_path).name == "step-0000004"
    removed = checkpoint.rotate(tmp_path, keep=1, best_step=2)
    assert removed == [] and not (tmp_path / "checkpoints" / ".tmp-step-0000006").exists()
    make(tmp_path, "step-0000008")
    assert [p.name for p in checkpoint.rotate(tmp_path, keep=1, best_step=2)] == ["step-0000004"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000002", "step-0000008"]


# what checkpoint.fingerprint records, for a made-up model
FINGERPRINT = {"base_model": "a", "vocab_size": 10, "d_model": 4, "encoder_layers": 1, "decoder_layers": 1,
               "num_mel_bins": 80, "tokenizer_size": 10, "train_encoder_layers": 1, "train_decoder_layers": 1,
               "domain_conditioning": "token", "domains": "normal,dyslexic", checkpoint.FROZEN_KEY: "f00d"}


def test_a_checkpoint_for_another_model_is_refused(tmp_path):
    ck = tmp_path / "step-0000002"
    ck.mkdir()
    mine = dict(FINGERPRINT)
    (ck / checkpoint.FINGERPRINT_FILE).write_text(json.dumps({**mine, "vocab_size": 12, "tokenizer_size": 12}))
    with pytest.raises(checkpoint.CheckpointError, match="for another model or tokenizer .*vocab_size 12 vs 10"):
        checkpoint.check_fingerprint(ck, mine)
    (ck / checkpoint.FINGERPRINT_FILE).write_text(json.dumps({**mine, "base_model": "moved/elsewhere"}))
    checkpoint.check_fingerprint(ck, mine)  # same frozen weights, architecture and tokenizer: fine


def test_a_checkpoint_trained_on_other_frozen_weights_or_another_freeze_is_refused(tmp_path):
    # issue 22.3 / 22.11: another base of the same shape (main: a warning, and final/ a hybrid of two bases)
    ck = tmp_path / "step-0000002"
    ck.mkdir()
    mine = {**FINGERPRINT, "base_model": "b"}
    saved = {**mine, "base_model": "a", checkpoint.FROZEN_KEY: "beef"}
    (ck / checkpoint.FINGERPRINT_FILE).write_text(json.dumps(saved))
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.check_fingerprint(ck, mine)
    assert str(err.value) == (f"{ck}: trained on the frozen weights of --base-model a; those of --base-model b "
                              "differ, and final/ would join the two. Use --base-model a and the same "
                              "--train-encoder-layers / --train-decoder-layers")
    (ck / checkpoint.FINGERPRINT_FILE).write_text(json.dumps({**mine, "train_encoder_layers": 2}))
    with pytest.raises(checkpoint.CheckpointError, match="trained with --train-encoder-layers 2, this run has 1; "
                                                          "resume with --train-encoder-layers 2"):
        checkpoint.check_fingerprint(ck, mine)
    (ck / checkpoint.FINGERPRINT_FILE).write_text(json.dumps({**mine, "domains": "normal,dyslexic,adhd"}))
    with pytest.raises(checkpoint.CheckpointError, match="trained with --domains normal,dyslexic,adhd, this run "
                                                          "has normal,dyslexic; resume with --domains normal,dysl"):
        checkpoint.check_fingerprint(ck, mine)


def test_train_state_round_trips_as_json(tmp_path):
    s = checkpoint.TrainState(step=7, epoch=1, micro_in_epoch=3, positions=[[[1, 0, 4]]], best_metric=0.5, best_step=6)
    (tmp_path / checkpoint.STATE_FILE).write_text(s.to_json())
    assert checkpoint.TrainState.load(tmp_path) == s
    with pytest.raises(checkpoint.CheckpointError, match="no train_state.json"):
        checkpoint.TrainState.load(tmp_path / "nope")


def test_deepspeed_values_that_contradict_the_flags_are_refused(monkeypatch):
    cfg = TrainConfig(dataset_root="x", run_name="x", per_device_train_batch_size=4, grad_accum=2)
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
          "train_batch_size": "auto"}
    reconcile_deepspeed(cfg, ds)
    filled = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"])
    assert filled == (4, 2, 1.0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r'"train_batch_size": 8 .* = 16'):
        reconcile_deepspeed(cfg, {"train_batch_size": 8})
    with pytest.raises(ConfigError, match='--max-grad-norm 1.0 disagrees with "gradient_clipping": 0.5'):
        reconcile_deepspeed(cfg, {"gradient_clipping": 0.5})
    # the resolved precision (flag, else the JSON, see resolve_precision) is written into the JSON
    ds = {"bf16": {"enabled": True}, "fp16": {"enabled": "auto", "loss_scale": 0}}
    reconcile_deepspeed(cfg, ds)
    assert ds == {"bf16": {"enabled": False}, "fp16": {"enabled": False, "loss_scale": 0},
                  "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0}


def test_a_checkpoint_from_before_the_domain_rows_parameter_is_refused_in_one_line(tmp_path):
    ck = tmp_path / "step-0000002"
    ck.mkdir()
    old = {"base_model": "a", "vocab_size": 10, "d_model": 4, "encoder_layers": 1, "decoder_layers": 1,
           "num_mel_bins": 80, "tokenizer_size": 10}  # what train_loop.py wrote before: no "domain_rows"
    (ck / checkpoint.FINGERPRINT_FILE).write_text(json.dumps(old))
    with pytest.raises(checkpoint.CheckpointError, match="written by an older version of this trainer") as err:
        checkpoint.check_fingerprint(ck, {**old, "domain_rows": checkpoint.DOMAIN_ROWS})
    assert "\n" not in str(err.value)


def test_the_process_group_timeout_is_a_flag_with_a_safe_default():
    # issue 22.12: Accelerate's default (10 min) is shorter than rank 0 writing final/ of large-v3 on a slow disk
    from datetime import timedelta

    from wdx.config import parse_args
    from wdx.train.accel import build_accelerator

    cfg = parse_args(["--dataset-root", "x", "--run-name", "x"])
    assert cfg.ddp_timeout == 1800
    accelerator = build_accelerator(parse_args(["--dataset-root", "x", "--run-name", "x", "--ddp-timeout", "77"]))
    assert accelerator.init_handler.to_kwargs() == {"timeout": timedelta(seconds=77)}
    # issue 31.5: a value equal to the handler class's own default (600 s) is passed on too
    accelerator = build_accelerator(parse_args(["--dataset-root", "x", "--run-name", "x", "--ddp-timeout", "600"]))
    assert accelerator.init_handler.to_kwargs() == {"timeout": timedelta(seconds=600)}
