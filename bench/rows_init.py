"""How the domain-token rows start and learn: the measurement behind --domain-rows-init's default.

    python -m bench.rows_init [--demo demo_out] [--json bench/rows_init.json]

On the demo's data and base model (run `make demo` first), the demo's fine-tune (wdx.demo.pipeline
.train_command: 80 clips, 2 epochs of 8 at lr 1e-4) with the rows started at the embedding's mean
row (--domain-rows-init 0) or one standard deviation of noise apart (1.0, the default), each with
the rows' learning rate x1 and x10 (--domain-rows-lr-scale). For each: how far apart the two rows
end (L2), and final/ on val_small decoded with both tokens (wdx.evaluate --compare-domains): how
many transcripts the token changed, dyslexic CER under the right and the wrong token, and the
misread-word shares. docs/evaluation.md's rows table is rendered from the JSON (`python -m wdx.demo.readme`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from wdx import strictjson
from wdx.demo.pipeline import BATCH, MAX_NEW_TOKENS, train_command
from wdx.scoring import evaluate

REPO = Path(__file__).resolve().parents[1]
VARIANTS = [(0.0, 1.0), (0.0, 10.0), (1.0, 1.0), (1.0, 10.0)]  # (--domain-rows-init, --domain-rows-lr-scale)
RECIPE = ("make demo's fine-tune (wdx.demo.pipeline.train_command: 80 clips, 2 epochs of 8 at lr 1e-4) with "
          "--domain-rows-init and --domain-rows-lr-scale as in each row, --num-examples 0")


def rows_apart(final: Path) -> float:
    """L2 distance between the two domain-token rows of final/'s (tied) embedding."""
    weights = load_file(str(final / "model.safetensors"))
    embedding = weights["model.decoder.embed_tokens.weight"]
    tokenizer = Tokenizer.from_file(str(final / "tokenizer.json"))
    ids = [tokenizer.token_to_id(f"<|domain:{d}|>") for d in ("normal", "dyslexic")]
    return float(np.linalg.norm(embedding[ids[0]].astype(np.float64) - embedding[ids[1]]))


def measure(demo: Path, init: float, scale: float, work: Path) -> dict:
    name = f"rows-{init:g}-x{scale:g}"
    cmd = [*train_command(demo / "data", demo / "whisper-base", work), "--run-name", name,
           "--domain-rows-init", str(init), "--domain-rows-lr-scale", str(scale), "--num-examples", "0"]
    print("==", name, flush=True)
    if subprocess.run(cmd, cwd=REPO).returncode:
        raise SystemExit(f"bench.rows_init: training {name} failed")
    final, out = work / name / "final", work / f"{name}.json"
    if evaluate.main([str(final), "--dataset", str(demo / "data"), "--split", "val_small", "--compare-domains",
                      "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", str(BATCH), "--json", str(out)]):
        raise SystemExit(f"bench.rows_init: evaluating {name} failed")
    result = json.loads(out.read_text())
    tokens, dyslexic = result["compare_domains"], result["results"]["dyslexic"]
    return {"init": init, "lr_scale": scale, "rows_apart": rows_apart(final),
            "changed": {d: tokens[d]["changed"] for d in ("dyslexic", "normal")}, "n": tokens["dyslexic"]["n"],
            "cer_right": tokens["dyslexic"]["prompt_dyslexic"], "cer_wrong": tokens["dyslexic"]["prompt_normal"],
            "cer_lo": dyslexic["cer_lo"], "cer_hi": dyslexic["cer_hi"],
            "faithful": dyslexic["misread_faithful"], "repaired": dyslexic["misread_repaired"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rows_init", description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=REPO / "demo_out", help="make demo's output directory")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "rows_init.json")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    rows = [measure(args.demo, init, scale, args.demo / "rows_init") for init, scale in VARIANTS]
    run = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
           "minutes": (time.perf_counter() - t0) / 60, "variants": rows, "recipe": RECIPE}
    args.json.write_text(strictjson.dumps(run, indent=1) + "\n")
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
