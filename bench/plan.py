"""How good `--plan` is, and what it says for large-v3: the figures of docs/performance.md's Memory section.

    python -m bench.plan [--json bench/plan.json]

1. Accuracy: the plan (two steps of the loop's own code on fake tensors, `wdx.train.plan.simulate`)
   against the CPU allocator's measured peak of the same two steps on real tensors of a
   random-init model, for the shapes below (`tests/test_plan.py` checks two of them within
   +-15 % on every run; this writes all four).
2. `train_loop.py --plan` for large-v3 in bf16 at batch 8 (its default 448 decoder tokens),
   without and with gradient checkpointing: the loop's own output, run as README shows it.
3. `python -m wdx.train.plan`'s largest-batch tables, without and with gradient checkpointing.
About 2 minutes on 2 cores. The page's blocks are is rendered from the JSON (`python -m wdx.demo.readme`).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path

from transformers import WhisperConfig

from wdx import strictjson
from wdx.train.plan import batch_table, simulate

MIB = 2**20
REPO = Path(__file__).resolve().parents[1]
LARGE_V3 = "openai/whisper-large-v3"
PLAN_COMMAND = ["--plan", "--base-model", LARGE_V3, "--bf16", "--per-device-train-batch-size", "8"]
# (name, d_model, layers, precision, batch, decoder tokens)
SHAPES = [("whisper-tiny's shape", 384, 4, "no", 2, 100),
          ("whisper-base's shape", 512, 6, "no", 2, 200),
          ("a 128-wide model", 128, 2, "bf16", 1, 40),
          ("a 64-wide model", 64, 2, "bf16", 2, 100)]


def shaped(d_model: int, layers: int, n_mels: int = 80, vocab_size: int = 51865) -> WhisperConfig:
    """Random-init geometry of a Whisper size (the real vocabulary: the loss's share is real)."""
    return WhisperConfig(d_model=d_model, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=4 * d_model, decoder_ffn_dim=4 * d_model,
                         num_mel_bins=n_mels, vocab_size=vocab_size)


def printed_plan(*extra: str) -> str:
    """What `python train_loop.py --plan ...` prints (stdout), as a user runs it."""
    done = subprocess.run([sys.executable, str(REPO / "train_loop.py"), *PLAN_COMMAND, *extra], cwd=REPO,
                          capture_output=True, text=True, check=True)
    return done.stdout.rstrip("\n")


def accuracy(name: str, d_model: int, layers: int, precision: str, batch: int, tokens: int) -> dict:
    """Planned and measured peak (MiB) of two training steps, the last 2 + 2 blocks trained."""
    config = shaped(d_model, layers)
    planned = simulate(config, 2, 2, batch, tokens, precision, deepspeed=False)
    measured = simulate(config, 2, 2, batch, tokens, precision, deepspeed=False, fake=False)
    return {"shape": name, "d_model": d_model, "layers": layers, "precision": precision, "batch": batch,
            "tokens": tokens, "planned_mib": planned.peak / MIB, "measured_mib": measured.peak / MIB}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=Path("bench/plan.json"))
    args = parser.parse_args(argv)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU allocator",
              "accuracy": [accuracy(*shape) for shape in SHAPES],
              "large_v3": {"off": printed_plan(), "on": printed_plan("--gradient-checkpointing")},
              "batch_tables": {mode: batch_table(LARGE_V3, "bf16", checkpointing)
                               for mode, checkpointing in (("off", False), ("on", True))}}
    for row in result["accuracy"]:
        print(f"{row['shape']}: planned {row['planned_mib']:.1f} MiB, measured {row['measured_mib']:.1f} MiB")
    args.json.write_text(strictjson.dumps(result, indent=1) + "\n")
    print("wrote", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
