"""Precision: where it comes from, the dtype of the model's inputs, fp16 overflow, generation hygiene."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from transformers import get_scheduler

import train_loop
from tests.grad_probe import samples
from wdx.config import ConfigError, TrainConfig, parse_args, resolve_precision
from wdx.data.collate import Collator
from wdx.data.features import log_mel
from wdx.train.checkpoint import TrainState

ROOT = Path(__file__).resolve().parents[1]
GPU_PRESETS = ["single_gpu", "multi_gpu", "multi_node", "zero2", "zero3", "zero3_offload"]


def resolved(environ, **flags) -> TrainConfig:
    cfg = TrainConfig(dataset_root="x", run_name="x", **flags)
    resolve_precision(cfg, environ)
    return cfg


def test_precision_comes_from_the_flag_else_the_launcher_else_no(tmp_path):
    assert resolved({}).precision() == "no"
    cfg = resolved({"ACCELERATE_MIXED_PRECISION": "bf16"})
    assert (cfg.precision(), cfg.precision_source) == ("bf16", "the accelerate config")
    cfg = resolved({"ACCELERATE_MIXED_PRECISION": "bf16"}, mixed_precision="no")
    assert (cfg.precision(), cfg.precision_source) == ("no", "--mixed-precision no, overriding bf16 in the "
                                                              "accelerate config")
    assert resolved({"ACCELERATE_MIXED_PRECISION": "no"}, bf16=True).precision() == "bf16"
    # under DeepSpeed an explicit "enabled" in the JSON is the config's precision; "auto" defers
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"bf16": {"enabled": True}, "fp16": {"enabled": False}}))
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds),
           "ACCELERATE_MIXED_PRECISION": "no"}
    assert (resolved(env).precision(), resolved(env).precision_source) == ("bf16", str(ds))
    ds.write_text(json.dumps({"bf16": {"enabled": "auto"}}))
    assert resolved(env).precision() == "no"
    with pytest.raises(ConfigError, match="mixed_precision 'fp8' in the accelerate config"):
        resolved({"ACCELERATE_MIXED_PRECISION": "fp8"})


def launcher_environment(config_file: Path) -> dict:
    """What `accelerate launch --config_file X train_loop.py` exports to the script, without
    starting it (accelerate's own argument handling; no GPU needed)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args, defaults, mp_from_config = _validate_launch_command(
        launch_command_parser().parse_args(["--config_file", str(config_file), "train_loop.py"]))
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(
            list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else []))
        return prepare_deepspeed_cmd_env(args)[1]
    if args.multi_gpu:
        return prepare_multi_gpu_env(args)
    return {"ACCELERATE_MIXED_PRECISION": str(args.mixed_precision)}


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_every_gpu_preset_trains_in_bf16(preset, monkeypatch):
    monkeypatch.chdir(ROOT)  # the presets name ds_configs/ relative to the project
    env = launcher_environment(ROOT / "accelerate_configs" / f"{preset}.yaml")
    cfg = resolved(env)
    assert cfg.precision() == "bf16", (preset, cfg.precision_source)
    if env.get("ACCELERATE_USE_DEEPSPEED") == "true":
        # Accelerate's own check passes (no mixed_precision beside a deepspeed_config_file) ...
        from accelerate.utils import DeepSpeedPlugin

        monkeypatch.setenv("ACCELERATE_CONFIG_DS_FIELDS", env["ACCELERATE_CONFIG_DS_FIELDS"])
        DeepSpeedPlugin(hf_ds_config=env["ACCELERATE_DEEPSPEED_CONFIG_FILE"])
    else:
        assert yaml.safe_load(open(ROOT / "accelerate_configs" / f"{preset}.yaml"))["mixed_precision"] == "bf16"


def test_the_cpu_stand_ins_name_the_same_deepspeed_json_as_their_gpu_presets():
    for cpu, gpu in (("cpu_zero2_2proc", "zero2"), ("cpu_zero3_2proc", "zero3")):
        load = [yaml.safe_load(open(ROOT / "accelerate_configs" / f"{n}.yaml")) for n in (cpu, gpu)]
        assert load[0]["deepspeed_config"] == load[1]["deepspeed_config"]


def test_log_mel_is_computed_in_fp32_and_cast_at_the_end():
    audio = torch.randn(2, 16000)
    want = log_mel(audio, 80)
    got = log_mel(audio, 80, torch.bfloat16)
    assert want.dtype == torch.float32 and got.dtype == torch.bfloat16
    assert torch.equal(got, want.to(torch.bfloat16))


def test_underscore_spellings_of_flags_are_accepted():
    cfg = parse_args(["--dataset-root", "x", "--run-name", "r", "--gradient_checkpointing",
                      "--per_device_train_batch_size", "3"])
    assert cfg.gradient_checkpointing and cfg.per_device_train_batch_size == 3


def test_generation_longer_than_the_decoder_is_refused_naming_the_flag(tiny_dataset, tiny_model, tmp_path, capsys):
    argv = ["--dataset-root", tiny_dataset, "--base-model", tiny_model, "--output-dir", str(tmp_path), "--run-name",
            "r", "--generation-max-length", "444"]
    assert train_loop.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("train_loop.py: error: --generation-max-length 444: the decoder holds 448 positions, "
                   "the prompt takes 5; at most 443")


@pytest.mark.parametrize("fused", [True, False])
def test_fp16_survives_a_nan_step_and_the_schedule_counts_only_real_updates(fused, tiny_model, tmp_path):
    # Accelerate gives a CPU no grad scaler under fp16 (the loop refuses fp16 on CPU for that
    # reason), so torch's own GradScaler is handed to it: the real scaler, the real update()
    cfg = parse_args(["--dataset-root", "x", "--base-model", tiny_model, "--run-name", "r", "--output-dir",
                      str(tmp_path), "--mixed-precision", "no", "--max-nonfinite", "3"])
    accelerator = Accelerator(mixed_precision="fp16")
    accelerator.scaler, accelerator.native_amp = torch.amp.GradScaler("cpu"), True
    whisper, groups = train_loop.build_model(cfg, accelerator)
    trainable = [p for ps in groups.values() for p in ps]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, fused=fused)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=10)
    model, optimizer, scheduler = accelerator.prepare(whisper.model, optimizer, scheduler)
    collate, state = Collator(whisper.tokenizer, "ko"), TrainState()
    watched = model.model.decoder.layers[-1].fc1.weight
    seen = []
    for step in range(3):
        batch = collate(samples()[:2])
        if step == 1:
            batch["audio"][0, 100] = float("nan")  # one bad clip: NaN loss, NaN gradients
        before, scale = watched.detach().clone(), accelerator.scaler.get_scale()
        loss_sum, _ = train_loop.forward_backward(accelerator, model, [batch], 80, torch.float32)
        train_loop.update(cfg, accelerator, model, optimizer, scheduler, trainable, loss_sum, state, False)
        seen.append((not torch.equal(watched, before), scheduler.scheduler.last_epoch, state.nonfinite_in_a_row,
                     accelerator.scaler.get_scale() < scale))
    # (weights moved, schedule position, non-finite steps in a row, scale backed off)
    assert seen == [(True, 1, 0, False), (False, 1, 1, True), (True, 2, 0, False)]


def test_a_deepspeed_config_written_inline_in_the_yaml_is_reconciled_too(monkeypatch):
    from wdx.train.accel import deepspeed_plugin

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # no deepspeed_config_file: the yaml's own fields
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    plugin = deepspeed_plugin(resolved({}, bf16=True, per_device_train_batch_size=3))
    ds = plugin.deepspeed_config
    assert (ds["train_micro_batch_size_per_gpu"], ds["bf16"], ds["fp16"]) == (3, {"enabled": True}, {"enabled": False})


def test_bf16_holds_frozen_weights_in_bf16_unchanged_and_final_has_the_bases_bits(tiny_model, tmp_path):
    """Issue 12.2, with a base stored in fp16 like openai/whisper-large-v3 (transformers 5 would
    load it in fp16 and leave the trained weights without fp32 masters)."""
    from safetensors.torch import load_file
    from transformers import WhisperForConditionalGeneration

    from wdx.train.accel import build_accelerator
    from wdx.train.export import write_final

    base = tmp_path / "fp16-base"
    WhisperForConditionalGeneration.from_pretrained(tiny_model).half().save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "special_tokens_map.json"):
        if (Path(tiny_model) / name).exists():
            (base / name).write_bytes((Path(tiny_model) / name).read_bytes())
    cfg = parse_args(["--dataset-root", "unused", "--base-model", str(base), "--run-name", "r", "--output-dir",
                      str(tmp_path), "--per-device-train-batch-size", "4", "--mixed-precision", "bf16",
                      "--learning-rate", "1e-2", "--train-encoder-layers", "1", "--train-decoder-layers", "1"])
    accelerator = build_accelerator(cfg)
    whisper, groups = train_loop.build_model(cfg, accelerator)
    trained = {id(p) for ps in groups.values() for p in ps}
    params = dict(whisper.model.named_parameters())
    assert {p.dtype for p in params.values() if id(p) in trained} == {torch.float32}
    frozen = {n: p for n, p in params.items() if id(p) not in trained}
    assert frozen["model.encoder.layers.0.fc1.weight"].dtype == torch.bfloat16
    assert frozen["model.decoder.embed_tokens.weight"].dtype == torch.bfloat16
    assert frozen["model.decoder.layers.0.final_layer_norm.weight"].dtype == torch.float32  # norms stay fp32
    assert frozen["model.decoder.embed_positions.weight"].dtype == torch.float32
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = train_loop.build_optimizer(cfg, groups, accelerator.device)
    model, optimizer = accelerator.prepare(whisper.model, optimizer)
    trainable = [p for ps in groups.values() for p in ps]
    micro = [Collator(whisper.tokenizer, "ko")(samples()[:4])]
    for _ in range(2):
        loss, _ = train_loop.forward_backward(accelerator, model, micro, 80, torch.bfloat16)
        accelerator.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert all(torch.equal(p, before[n]) for n, p in frozen.items())  # bit for bit
    assert all(not torch.equal(params[n], before[n]) for n in params if id(params[n]) in trained)
    final = write_final(accelerator, model, whisper.tokenizer, whisper.feature_extractor, tmp_path / "final",
                        json.dumps({"base_model": str(base)}), None)
    got, stored = load_file(final / "model.safetensors"), load_file(base / "model.safetensors")
    emb = "model.decoder.embed_tokens.weight"
    for name, value in stored.items():
        if name == emb:
            assert torch.equal(got[emb][: len(value)], value.float())
            assert torch.equal(got[emb][len(value):], params["model.decoder.embed_tokens.domain_rows"].detach())
        elif id(params[name]) not in trained:
            assert got[name].dtype == torch.float32 and torch.equal(got[name], value.float()), name
