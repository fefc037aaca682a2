import argparse
import dataclasses

import pytest

import train_loop
from wdx.plan import count_params, load_config, plan_table, strategies


def test_large_v3_counts_from_its_config_alone():
    c = count_params(load_config("openai/whisper-large-v3"), encoder_layers=4, decoder_layers=4)
    assert c.config.num_mel_bins == 128 and c.config.vocab_size == 51866
    assert c.total == 1_543_490_560 + 2 * 1280  # the published size + two domain-token rows
    d = 1280
    enc_block = 4 * (d * d + d) - d + 2 * 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)  # k_proj has no bias
    dec_attn = 2 * (4 * (d * d + d) - d)
    dec_mlp = (d * 4 * d + 4 * d) + (4 * d * d + d)
    assert c.trainable == 4 * enc_block + 4 * (dec_attn + dec_mlp) + 2 * d


def test_plan_says_what_fits_on_16_and_24_gib_cards(capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # as `accelerate launch` with a GPU preset
    assert train_loop.main(["--plan", "--base-model", "openai/whisper-large-v3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("precision bf16 (the accelerate config)")
    assert "16 GiB card" in out and "24 GiB card" in out
    for name in ("DDP", "ZeRO-2", "ZeRO-3", "ZeRO-3+offload"):
        assert f"\n  {name} " in out
    assert "DeepSpeed's estimators" in out


def test_sharding_shrinks_per_gpu_state():
    c = count_params(load_config("openai/whisper-large-v3"), 4, 4)
    one, eight = strategies(c, 1), strategies(c, 8)
    assert eight["ZeRO-3"]["weights"] < one["ZeRO-3"]["weights"] / 4
    assert eight["ZeRO-2"]["optimizer"] == pytest.approx(one["ZeRO-2"]["optimizer"] / 8)
    assert eight["DDP"] == one["DDP"]


def test_plan_table_for_a_local_tiny_model(tiny_model):
    assert "memory plan for" in plan_table(tiny_model, 1, 1, batch=2)


def test_every_flag_default_comes_from_the_dataclass():
    from wdx.config import TrainConfig, build_parser, flag

    parser = build_parser()
    defaults = {a.dest: a.default for a in parser._actions if a.dest != "help" and a.help != argparse.SUPPRESS}
    for f in dataclasses.fields(TrainConfig):
        if not f.init:  # resolved at start-up (precision_source), not a flag
            continue
        assert defaults[f.name] == f.default, f.name
        assert f"--{flag(f.name)}" in parser.format_help()
