"""Does the domain token help? The recipe with and without it, on the same data, the base model beside.

    python -m wdx.study --dataset-root ROOT --base-model MODEL --out DIR [--splits val_small val_unseen]
                        [--accelerate-config FILE] -- [train_loop.py flags: steps, batch, lr, ...]

Trains twice with `accelerate launch train_loop.py`, `--domain-conditioning token` and `none`,
everything else equal (the flags after `--`, the seed, the data, the freeze), both from one
encoder cache (DIR/cache: the frozen encoder prefix does not depend on the prompt, so the
second run reads what the first built). Then evaluates the base model and both final/ models
on every held-out split with wdx.evaluate, and compares them on the same utterances
(wdx.metrics.compare: CER per domain with the paired bootstrap interval of the difference, and
the share of misread words written as said, where the data has `target_text`). Writes
DIR/study.json and DIR/STUDY.md, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from . import evaluate, strictjson
from .metrics import compare, interval_text, mark_real, real_rule

REPO = Path(__file__).resolve().parents[1]
ARMS = ("token", "none")


def train(arm: str, args: argparse.Namespace, extra: list[str]) -> Path:
    """One arm of the study through the real launcher and loop; returns its final/."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    if args.accelerate_config:
        launcher += ["--config_file", str(args.accelerate_config)]
    cmd = [*launcher, str(REPO / "train_loop.py"), "--dataset-root", args.dataset_root, "--base-model",
           args.base_model, "--output-dir", str(args.out / "runs"), "--run-name", arm, "--overwrite",
           "--domain-conditioning", arm, "--encoder-cache", str(args.out / "cache"), *extra]
    print(f"== training, --domain-conditioning {arm}: {' '.join(cmd[2:])}", flush=True)
    if subprocess.run(cmd, cwd=REPO).returncode:
        raise SystemExit(f"wdx.study: error: training with --domain-conditioning {arm} failed (see above)")
    return args.out / "runs" / arm / "final"


def evaluate_all(models: dict[str, str], args: argparse.Namespace) -> dict[str, dict[str, dict]]:
    """{split: {model name: wdx.evaluate --json output}}."""
    out = {}
    for split in args.splits:
        out[split] = {}
        for name, model in models.items():
            path = args.out / f"eval_{name}_{split}.json"
            print(f"== evaluating {name} on {split}", flush=True)
            if evaluate.main([model, "--dataset", args.dataset_root, "--split", split, "--json", str(path),
                              "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size)]):
                raise SystemExit(f"wdx.study: error: evaluating {model} on {split} failed (see above)")
            out[split][name] = json.loads(path.read_text())
    return out


def table(evals: dict[str, dict[str, dict]]) -> tuple[list[str], dict]:
    """Markdown rows: per split and domain the three CERs, token - none with its paired interval,
    and the faithful share of misread words for both arms; and the comparisons themselves."""
    rows = ["| held out | domain | n | CER base | CER none | CER token | token - none (95 % CI) | faithful none | "
            "faithful token | token - none (95 % CI) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    comparisons = {split: compare(by["none"]["samples"], by["token"]["samples"], correct=False)
                   for split, by in evals.items()}
    mark_real(list(comparisons.values()))  # one family: every comparison of the table
    for split, by in evals.items():
        versus = comparisons[split]
        for d in versus:  # every domain the data has, then "all"
            v, base = versus[d], by["base"]["results"].get(d, {}).get("cer", float("nan"))
            if not v.get("n"):
                rows.append(f"| {split} | {d} | 0 | - | - | - | - | - | - | - |")
                continue
            cer_ci = f"{v['diff']:+.3f} ({interval_text(v['diff_lo'], v['diff_hi'])}){' *' if v['real'] else ''}"
            if v.get("faithful_diff") is None:
                faithful = "n/a | n/a | n/a"
            else:
                mark = " *" if v["faithful_real"] else ""
                faithful = (f"{v['faithful_a']:.3f} | {v['faithful_b']:.3f} | {v['faithful_diff']:+.3f} "
                            f"({interval_text(v['faithful_lo'], v['faithful_hi'])}){mark}")
            rows.append(f"| {split} | {d} | {v['n']} | {base:.3f} | {v['cer_a']:.3f} | {v['cer_b']:.3f} | "
                        f"{cer_ci} | {faithful} |")
    return rows, comparisons


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(prog="python -m wdx.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset-root", required=True)
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--out", type=Path, required=True, help="runs, cache, evaluations and STUDY.md go here")
    parser.add_argument("--splits", nargs="+", default=["val_small"], help="held-out splits to evaluate")
    parser.add_argument("--accelerate-config", type=Path, help="accelerate launch --config_file (default: yours)")
    parser.add_argument("--max-new-tokens", type=int, default=225)
    parser.add_argument("--batch-size", type=int, default=8, help="evaluation batch")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    finals = {arm: str(train(arm, args, extra)) for arm in ARMS}
    evals = evaluate_all({"base": args.base_model, **finals}, args)
    rows, comparisons = table(evals)
    minutes = (time.perf_counter() - t0) / 60
    command = "python -m wdx.study " + " ".join(argv)
    text = "\n".join([
        "# Does the domain token help?", "",
        f"`{command}` ({minutes:.1f} min). Both arms: the same flags, seed, data and freeze; `none` has the 4-token "
        "prompt and no domain rows. Faithful: the share of misread words (said unlike `target_text`) the transcript "
        "keeps as said; n/a where there is no misread word to count (no `target_text`, or every word read as "
        "given).", "", *rows, "", "* " + real_rule(list(comparisons.values())), ""])
    (args.out / "STUDY.md").write_text(text)
    (args.out / "study.json").write_text(strictjson.dumps({"command": command, "minutes": minutes, "extra": extra,
                                                     "comparisons": comparisons}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
