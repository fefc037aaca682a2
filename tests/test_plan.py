"""--plan: a simulation of the loop's own step, checked against the CPU allocator's measurement."""

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

import train_loop
from bench.plan import LARGE_V3, SHAPES, shaped
from wdx.train.plan import GIB, Step, card_needs, load_config, per_gpu, plan_table, simulate


@pytest.mark.parametrize("name,d_model,layers,precision,batch,tokens", [
    SHAPES[0],  # whisper-tiny's shape (base's, in bench/plan.json, takes 16 s more)
    SHAPES[2],  # bf16 at a size this CPU runs (its bf16 kernels are slow)
])
def test_the_plan_is_within_15_percent_of_the_measured_peak(name, d_model, layers, precision, batch, tokens):
    config = shaped(d_model, layers)
    planned = simulate(config, 2, 2, batch, tokens, precision, deepspeed=False)
    measured = simulate(config, 2, 2, batch, tokens, precision, deepspeed=False, fake=False)
    assert planned.trainable == measured.trainable and planned.weights == measured.weights
    assert planned.peak == pytest.approx(measured.peak, rel=0.15)


def test_large_v3_bf16_batch_8_by_448_fits_a_24_gb_card_by_the_plan():
    step = simulate(load_config("openai/whisper-large-v3"), 4, 4, 8, 448, "bf16", deepspeed=False)
    assert step.params == 1_543_490_560 + 2 * 1280 + 2 * 1280  # published size + 2 embedding rows + domain rows
    d = 1280
    enc_block = 4 * (d * d + d) - d + 2 * 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)  # k_proj has no bias
    dec_block = 2 * (4 * (d * d + d) - d) + (d * 4 * d + 4 * d) + (4 * d * d + d)  # attention + MLP
    assert step.trainable == 4 * enc_block + 4 * dec_block + 2 * d
    frozen = step.params - step.trainable
    assert step.weights < 2 * frozen + 4 * step.trainable + 16 * 2**20  # frozen bf16 (norms, positions: fp32)
    total = per_gpu(step, "DDP", 1)
    assert total["step"] / GIB <= 20 and card_needs(total["step"]) < 24e9


def test_sharding_shrinks_per_gpu_state():
    step = Step(params=1_500_000_000, trainable=180_000_000, largest=66_000_000, weights=3 * GIB, peak=12 * GIB)
    one, eight = per_gpu(step, "ZeRO-2", 1), per_gpu(step, "ZeRO-2", 8)
    assert eight["states"] == pytest.approx(one["states"] / 8)
    assert per_gpu(step, "ZeRO-3", 8)["step"] < per_gpu(step, "ZeRO-3", 1)["step"] - 2.5 * GIB
    assert per_gpu(step, "DDP", 8)["buckets"] == 4 * step.trainable  # gradients as bucket views: one copy
    assert per_gpu(step, "ZeRO-3+offload", 1)["states"] == 0


def test_plan_prints_every_strategy_and_card(tiny_model, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # as `accelerate launch` with a GPU preset
    assert train_loop.main(["--plan", "--base-model", tiny_model, "--plan-tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("precision bf16 (the accelerate config)")
    assert "16 GB card" in out and "24 GB card" in out and "x 64 decoder tokens" in out
    for name in ("DDP", "ZeRO-2", "ZeRO-3", "ZeRO-3+offload"):
        assert f"\n  {name} " in out


def test_every_flag_default_comes_from_the_dataclass():
    from wdx.config import TrainConfig, build_parser, flag

    parser = build_parser()
    defaults = {a.dest: a.default for a in parser._actions if a.dest != "help" and a.help != argparse.SUPPRESS}
    for f in dataclasses.fields(TrainConfig):
        if not f.init:  # resolved at start-up (precision_source), not a flag
            continue
        assert defaults[f.name] == f.default, f.name
        assert f"--{flag(f.name)}" in parser.format_help()


def test_processes_come_from_the_launcher_else_the_default_accelerate_config(tmp_path, monkeypatch):
    import accelerate.commands.config.config_args as config_args

    from wdx.train.plan import processes

    config = tmp_path / "default_config.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 4\n"
                      "machine_rank: 0\nnum_machines: 1\nuse_cpu: false\n")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(config_args, "default_config_file", str(tmp_path / "none.yaml"))
    assert processes() == 1
    monkeypatch.setattr(config_args, "default_config_file", str(config))
    assert processes() == 4
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert processes() == 8


def test_the_plan_prices_gradient_checkpointing_and_zero_s_16_bit_gradient_partition():
    # issue 22.13: main's plan ignored --gradient-checkpointing and left out ZeRO-2's bf16 gradient partition
    config = shaped(128, 4)
    plain = simulate(config, 4, 4, 4, 100, "no", deepspeed=False)
    checkpointed = simulate(config, 4, 4, 4, 100, "no", deepspeed=False, checkpointing=True)
    measured = simulate(config, 4, 4, 4, 100, "no", deepspeed=False, fake=False, checkpointing=True)
    assert checkpointed.peak < 0.8 * plain.peak  # activations of the 4+4 trained blocks are recomputed
    assert checkpointed.peak == pytest.approx(measured.peak, rel=0.15)
    step = Step(params=10**9, trainable=10**8, largest=10**7, weights=2 * GIB, peak=8 * GIB)
    # fp32 master, fp32 gradients for Adam, Adam moments, and the fp32 accumulation partition of ds_configs/
    assert per_gpu(step, "ZeRO-2", 4)["states"] == (4 + 4 + 8 + 4) * 10**8 / 4
    assert per_gpu(step, "ZeRO-3", 4)["states"] == (4 + 4 + 8 + 4) * 10**8 / 4
    assert per_gpu(step, "ZeRO-2", 4)["buckets"] == (2 * 5e7 + 5e7) * 2 + 5e7 * 4  # + the bucket reduced in fp32


def test_bench_plan_json_holds_what_the_plan_prints_at_this_code():
    # README's --plan block is rendered from bench/plan.json: a change to the plan re-makes it (python -m bench.plan)
    run = json.loads((Path(__file__).resolve().parents[1] / "bench" / "plan.json").read_text())
    precision, plan = run["large_v3"]["off"].split("\n", 1)
    assert precision == "precision bf16 (--bf16)"
    assert plan == plan_table(LARGE_V3, 4, 4, 8, 448, "bf16", 1, False)
