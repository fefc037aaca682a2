"""Does the domain token help? The recipe with and without it, on the same data, the base model beside.

    python -m wdx.study --dataset-root ROOT --base-model MODEL --out DIR [--splits val_unseen]
                        [--select-split val_small] [--seeds 42 43 44] [--accelerate-config FILE]
                        -- [train_loop.py flags: steps, batch, lr, ...]

Trains with `accelerate launch train_loop.py`, `--domain-conditioning token` and `none`, once
per seed, everything else equal (the flags after `--`, the data, the freeze, the number of
steps), all from one encoder cache (DIR/cache: the frozen encoder prefix does not depend on the
prompt or the seed, so later runs read what the first built). The loop evaluates on
`--select-split` only, which the study never reports; early stopping is refused (the arms are
compared at equal steps). Then evaluates the base model and every final/ on each reported split
with wdx.evaluate, and compares the arms on the same utterances, every seed pooled
(wdx.scoring.metrics.compare: CER per domain with the paired bootstrap interval of the difference, over
speakers when the data names them, and the share of misread words written as said, where the
data has `target_text`; a real difference is one that survives Holm's correction over the
table). Writes DIR/study.json and DIR/STUDY.md, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from wdx import strictjson
from wdx.config import TrainConfig
from wdx.scoring import evaluate
from wdx.scoring.metrics import compare, interval_text, mark_real, real_rule

REPO = Path(__file__).resolve().parents[2]
ARMS = ("token", "none")
# set by the study itself, the same for both arms (or per arm and seed): never after `--`
OWNED = ("--dataset-root", "--base-model", "--output-dir", "--run-name", "--overwrite", "--domain-conditioning",
         "--encoder-cache", "--eval-split", "--seed")


def check_flags(extra: list[str], splits: list[str], select: str) -> None:
    """One line for a study that would select on what it reports, or compare arms at unequal steps."""
    if select in splits:
        raise SystemExit(f"wdx.study: error: --select-split {select} is also reported (--splits {' '.join(splits)}); "
                         "the split the loop evaluates on must be one the study does not report")
    for flag in extra:
        name = flag.split("=", 1)[0]
        if name in OWNED:
            raise SystemExit(f"wdx.study: error: {name} after --: the study sets it (--select-split for the loop's "
                             "evaluation split, --seeds for seeds)")
        if name == "--early-stopping-patience":
            value = flag.split("=", 1)[1] if "=" in flag else extra[extra.index(flag) + 1]
            if value.strip() not in ("0", ""):
                raise SystemExit("wdx.study: error: --early-stopping-patience after --: the arms would stop at "
                                 "different steps; the study compares them at equal steps (set --max-steps)")


def run_name(arm: str, seed: int) -> str:
    return f"{arm}-seed{seed}"


def train(arm: str, seed: int, args: argparse.Namespace, extra: list[str]) -> Path:
    """One arm of the study through the real launcher and loop; returns its final/."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    if args.accelerate_config:
        launcher += ["--config_file", str(args.accelerate_config)]
    name = run_name(arm, seed)
    cmd = [*launcher, str(REPO / "train_loop.py"), "--dataset-root", args.dataset_root, "--base-model",
           args.base_model, "--output-dir", str(args.out / "runs"), "--run-name", name, "--overwrite",
           "--domain-conditioning", arm, "--encoder-cache", str(args.out / "cache"), "--eval-split", args.select_split,
           "--seed", str(seed), *extra]
    print(f"== training {name}: {' '.join(cmd[2:])}", flush=True)
    if subprocess.run(cmd, cwd=REPO).returncode:
        raise SystemExit(f"wdx.study: error: training {name} failed (see above)")
    return args.out / "runs" / name / "final"


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


def pooled(evals: dict[str, dict], arm: str, seeds: list[int]) -> list[dict]:
    """Every seed's rows of one arm, each id prefixed by its seed (a pair is one clip, one seed)."""
    return [dict(row, id=f"{seed}/{row.get('id', row['key'])}") for seed in seeds
            for row in evals[run_name(arm, seed)]["samples"]]


def figures(evals: dict[str, dict[str, dict]], seeds: list[int]) -> dict:
    """What the tables show, for study.json: per reported split the comparison of the arms (every
    seed pooled, Holm over the whole table), the base model's CER, and each seed's figures."""
    comparisons = {split: compare(pooled(by, "none", seeds), pooled(by, "token", seeds), correct=False)
                   for split, by in evals.items()}
    mark_real(list(comparisons.values()))  # one family: every comparison of the table
    base = {split: {d: r.get("cer") for d, r in by["base"]["results"].items()} for split, by in evals.items()}
    def dyslexic(by: dict, arm: str, seed: int) -> dict:
        r = by[run_name(arm, seed)]["results"].get("dyslexic", {})
        return {"cer": r.get("cer"), "faithful": r.get("misread_faithful")}

    per_seed = {split: {str(seed): {arm: dyslexic(by, arm, seed) for arm in ARMS} for seed in seeds}
                for split, by in evals.items()}
    return {"comparisons": comparisons, "base_cer": base, "per_seed": per_seed}


def _show(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def table(result: dict) -> list[str]:
    """Markdown: per split and domain the CERs (base, none, token), token - none with its paired
    interval, and the faithful share of misread words for both arms; the rule of the marks; each
    seed's dyslexic figures. From study.json alone (README renders it too)."""
    rows = ["| held out | domain | n | CER base | CER none | CER token | token - none (95 % CI) | misread words | "
            "faithful none | faithful token | token - none (95 % CI) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for split, versus in result["comparisons"].items():
        for d, v in versus.items():  # every domain the data has, then "all"
            if not v.get("n"):
                rows.append(f"| {split} | {d} | 0 | - | - | - | - | - | - | - | - |")
                continue
            cer_ci = f"{v['diff']:+.3f} ({interval_text(v['diff_lo'], v['diff_hi'])}){' *' if v['real'] else ''}"
            if v.get("faithful_diff") is None:
                faithful = "0 | n/a | n/a | n/a"
            else:
                mark = " *" if v["faithful_real"] else ""
                faithful = (f"{v['misread_words']} | {v['faithful_a']:.3f} | {v['faithful_b']:.3f} | "
                            f"{v['faithful_diff']:+.3f} ({interval_text(v['faithful_lo'], v['faithful_hi'])}){mark}")
            rows.append(f"| {split} | {d} | {v['n']} | {_show(result['base_cer'][split].get(d))} | {v['cer_a']:.3f} | "
                        f"{v['cer_b']:.3f} | {cer_ci} | {faithful} |")
    rows += ["", "* " + real_rule(list(result["comparisons"].values())), "", "Each seed, dyslexic clips:", "",
             "| held out | seed | CER none | CER token | faithful none | faithful token |",
             "|---|---:|---:|---:|---:|---:|"]
    for split, seeds in result["per_seed"].items():
        for seed, arms in seeds.items():
            rows.append(f"| {split} | {seed} | {_show(arms['none']['cer'])} | {_show(arms['token']['cer'])} | "
                        f"{_show(arms['none']['faithful'])} | {_show(arms['token']['faithful'])} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(prog="python -m wdx.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset-root", required=True)
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--out", type=Path, required=True, help="runs, cache, evaluations and STUDY.md go here")
    parser.add_argument("--splits", nargs="+", default=["val_unseen"], help="held-out splits to report")
    parser.add_argument("--select-split", default=TrainConfig.eval_split,
                        help="the split the training loop evaluates on (never reported)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[TrainConfig.seed],
                        help="one run per arm and seed; the comparison pools them")
    parser.add_argument("--accelerate-config", type=Path, help="accelerate launch --config_file (default: yours)")
    parser.add_argument("--max-new-tokens", type=int, default=225)
    parser.add_argument("--batch-size", type=int, default=8, help="evaluation batch")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    check_flags(extra, args.splits, args.select_split)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    finals = {run_name(arm, seed): str(train(arm, seed, args, extra)) for seed in args.seeds for arm in ARMS}
    evals = evaluate_all({"base": args.base_model, **finals}, args)
    minutes = (time.perf_counter() - t0) / 60
    command = "python -m wdx.study " + " ".join(argv)
    result = {"command": command, "minutes": minutes, "extra": extra, "seeds": args.seeds,
              "select_split": args.select_split, **figures(evals, args.seeds)}
    text = "\n".join([
        "# Does the domain token help?", "",
        f"`{command}` ({minutes:.1f} min). Both arms: the same flags, data, freeze and steps, for each seed "
        f"({', '.join(map(str, args.seeds))}); `none` has the 4-token prompt and no domain rows; the loop evaluated "
        f"on {args.select_split} only. Every seed pooled: n counts clip x seed pairs. Faithful: the share of misread "
        "words (said unlike `target_text`) the transcript keeps as said; n/a where there is no misread word to count "
        "(no `target_text`, or every word read as given).", "", *table(result), ""])
    (args.out / "STUDY.md").write_text(text)
    (args.out / "study.json").write_text(strictjson.dumps(result, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
