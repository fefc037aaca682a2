"""REPORT.md for the demo: CER/WER per held-out split and domain before and after, with
intervals and error anatomy, the right-vs-wrong domain token table, curves, deployment
parity, long recordings, examples."""

from __future__ import annotations

import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from wdx import strictjson  # noqa: E402
from wdx.model.domains import DOMAINS  # noqa: E402
from wdx.scoring.metrics import interval_text  # noqa: E402


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def plot_curves(metrics: list[dict], before: dict, out: Path) -> tuple[Path, Path]:
    """loss.png (train loss by step) and cer.png (eval CER by step per domain; step 0 = base model)."""
    train = [(m["step"], m["train/loss"]) for m in metrics if m.get("train/loss") is not None]
    evals = [m for m in metrics if "eval/all/cer" in m]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*train), marker=".", label="train loss")
    ev = [(m["step"], m["eval/loss"]) for m in evals]
    if ev:
        ax.plot(*zip(*ev), marker="o", label="eval loss")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy", title="Loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for domain in (*DOMAINS, "all"):
        points = [(0, before["results"][domain]["cer"])] + [(m["step"], m[f"eval/{domain}/cer"]) for m in evals]
        ax.plot(*zip(*points), marker="o", label=domain)
    ax.set(xlabel="optimizer step (0 = base model, zero-shot)", ylabel="CER", title="Character error rate, held out")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "cer.png", dpi=110)
    plt.close(fig)
    return out / "loss.png", out / "cer.png"


def table(evals: dict[str, tuple[dict, dict]], labels: dict[str, str]) -> list[str]:
    """Per held-out split and domain: CER before/after with the after's 95 % interval and its
    anatomy, runaway hypotheses, WER."""
    lines = ["| held out | domain | n | CER base | CER fine-tuned (95 % CI) | sub / del / ins | runaway base -> "
             "fine-tuned | WER base | WER fine-tuned |", "|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for split, (before, after) in evals.items():
        for d in (*DOMAINS, "all"):
            b, a = before["results"][d], after["results"][d]
            lines.append(f"| {labels[split]} | {d} | {a['n']} | {b['cer']:.3f} | **{a['cer']:.3f}** "
                         f"({interval_text(a['cer_lo'], a['cer_hi'], '.3f')}) | "
                         f"{a['sub']:.3f} / {a['del']:.3f} / {a['ins']:.3f} | "
                         f"{b['runaway']} -> {a['runaway']} | {b['wer']:.3f} | **{a['wer']:.3f}** |")
    return lines


def token_table(tokens: dict) -> list[str]:
    """CER of each domain's clips under each domain token: does the token matter?"""
    lines = ["| clips | " + " | ".join(f"CER with `<|domain:{p}|>`" for p in DOMAINS) + " | transcripts the token "
             "changed |", "|---|" + "---:|" * (len(DOMAINS) + 1)]
    for true, r in tokens.items():
        cells = [f"**{r[f'prompt_{p}']:.3f}**" if p == true else f"{r[f'prompt_{p}']:.3f}" for p in DOMAINS]
        lines.append(f"| {true} | {' | '.join(cells)} | {r['changed']}/{r['n']} |")
    return lines


def deployed_summary(deployed: dict[str, tuple[dict, float]]) -> dict[str, dict]:
    """Each way of decoding: CER per domain, how many clips give the first way's text, seconds."""
    reference = {s["key"]: s["hyp"] for s in next(iter(deployed.values()))[0]["samples"]}
    return {name: {"cer": {d: result["results"][d]["cer"] for d in (*DOMAINS, "all")},
                   "same": sum(s["hyp"] == reference.get(s["key"]) for s in result["samples"]),
                   "n": len(result["samples"]), "seconds": seconds}
            for name, (result, seconds) in deployed.items()}


def deploy_table(deployed: dict[str, dict]) -> list[str]:
    """CER per domain, agreement with the transformers model and seconds for each way of decoding."""
    lines = ["| decoded with | CER normal | CER dyslexic | CER all | same text as transformers | seconds |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in deployed.items():
        cer = [f"{r['cer'][d]:.3f}" for d in (*DOMAINS, "all")]
        lines.append(f"| {name} | {' | '.join(cer)} | {r['same']}/{r['n']} | {r['seconds']:.1f} |")
    return lines


def cost_table(costs: dict[str, dict]) -> list[str]:
    """Each backend as its own process: wall seconds per clip (loading included) and peak memory."""
    lines = ["| backend (own process, model loading included) | clips | seconds per clip | peak memory (MB) |",
             "|---|---:|---:|---:|"]
    for name, c in costs.items():
        lines.append(f"| {name} | {c['clips']} | {c['seconds'] / c['clips']:.2f} | {c['peak_mb']:.0f} |")
    return lines


def examples(before: dict, after: dict, n_per_domain: int = 3) -> list[str]:
    base = {s["key"]: s["hyp"] for s in before["samples"]}
    lines = []
    for d in DOMAINS:
        lines += [f"### {d}", ""]
        for s in [s for s in after["samples"] if s["domain"] == d][:n_per_domain]:
            lines += [f"- `{s['key']}`", f"  - said (reference): {s['ref']}",
                      f"  - base model: {base.get(s['key'], '')}", f"  - fine-tuned: {s['hyp']}"]
        lines.append("")
    return lines


LONGFORM = {"cer_one_by_one": "sentences one by one", "cer_long": "`wdx.transcribe` (cut at pauses)",
            "cer_faster_whisper": "faster-whisper batched + VAD (`wdx.deploy`)",
            "cer_pipeline": "transformers pipeline, `chunk_length_s=30`"}


def longform_table(rows: list[dict]) -> list[str]:
    """CER of each long recording decoded every way, against its sentences decoded one by one."""
    columns = [k for k in LONGFORM if rows and k in rows[0]]
    lines = ["| domain | sentences | seconds of audio | " + " | ".join(f"CER, {LONGFORM[k]}" for k in columns) + " |",
             "|---|---:|---:|" + "---:|" * len(columns)]
    for r in rows:
        lines.append(f"| {r['domain']} | {r['sentences']} | {r['seconds']:.0f} | "
                     + " | ".join(f"{r[k]:.3f}" for k in columns) + " |")
    return lines


def no_speech_table(rows: list[dict]) -> list[str]:
    """DomainWhisperModel on the dyslexic clips with each no_speech_threshold."""
    lines = ["| dyslexic clips | `no_speech_threshold` | clips | CER | clips decoded empty | largest no-speech "
             "probability |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        prob = "n/a" if r["max_no_speech_prob"] is None else f"{r['max_no_speech_prob']:.3f}"
        lines.append(f"| {r['clips']} | {r['threshold']} | {r['n']} | {r['cer']:.3f} | {r['empty']} | {prob} |")
    return lines


def summary(evals: dict[str, tuple[dict, dict]], labels: dict[str, str], tokens: dict, deployed: dict,
            costs: dict, longform: list[dict], no_speech: list[dict], timings: dict, settings: str) -> dict:
    """Every figure the report and the README quote, without the per-clip samples: the demo
    writes it as summary.json, and `python -m wdx.demo.readme` renders the README from it."""
    return {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "settings": settings,
            "evals": {split: [{"results": b["results"]}, {"results": a["results"]}] for split, (b, a) in evals.items()},
            "labels": labels, "tokens": tokens, "deployed": deployed, "costs": costs, "longform": longform,
            "no_speech": no_speech, "timings": timings, "total_s": sum(timings.values())}


def machine() -> str:
    import os
    import platform

    return f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU used"


def write_report(out: Path, evals: dict[str, tuple[dict, dict]], run_dir: Path, figures: dict) -> Path:
    """REPORT.md (the tables, the two PNG curves, deployment parity and cost, examples, how it
    was made) and summary.json (`figures`, from `summary`)."""
    before, after = evals["val_small"]
    metrics = read_metrics(run_dir)
    plot_curves(metrics, before, out)
    in_loop = [m["eval/samples_per_s"] for m in metrics if "eval/samples_per_s" in m]
    n_unseen = len(evals["val_unseen"][1]["samples"])
    timings = figures["timings"]
    unseen_s = next(v for k, v in timings.items() if k.startswith("5 evaluate fine-tuned, val_unseen"))
    lines = ["# Demo report: Whisper base fine-tuned on two Korean speaker domains", "",
             f"Made by `make demo` on {figures['date']} ({figures['machine']}), {figures['total_s']:.0f} s in all. "
             "Two held-out splits, sentences never seen in training: `val_small`, read by the synthetic voices "
             "training used (other sentences), and `val_unseen`, read by espeak-ng voices training never heard "
             "(other variants, pitch and speed outside the training ranges). The first row of each shows "
             "adaptation with a known voice; the second, what carries over to a new one. CER: punctuation and "
             "spaces removed (the Korean convention), with its 95 % bootstrap interval (speakers resampled, "
             "1000 draws) and its parts (substitutions / deletions / insertions, fractions of the reference "
             "characters); runaway: hypotheses more than twice their reference. The base model is prompted "
             "without a domain token (it has none), the fine-tuned one with `<|domain:X|>`.", "",
             *table(evals, figures["labels"]), "", "## Does the domain token matter?", "",
             "The fine-tuned model on `val_small`, every clip decoded with each domain token (the right one in "
             "bold).", "", *token_table(figures["tokens"]), "",
             "![loss](loss.png) ![cer](cer.png)", "",
             "## Evaluation cost", "",
             f"In the training loop (loss + greedy generation, the encoder run once per batch, batch 8, CPU): "
             f"{100 / in_loop[-1]:.0f} s per 100 clips. `wdx.evaluate` on `val_unseen`: "
             f"{100 * unseen_s / n_unseen:.0f} s per 100 clips, model loading included." if in_loop else "", "",
             "## Deployed", "", "The fine-tuned model decoded greedily with the domain prompt by each way of "
             "deploying it (`val_small`, same clips, CPU, model loading included in the seconds).", "",
             *deploy_table(figures["deployed"]), "", *cost_table(figures["costs"]), "",
             "faster-whisper (`DomainWhisperModel`, int8) drops a window whose no-speech probability is above "
             "`no_speech_threshold` (when its mean log-probability is below -1 too):", "",
             *no_speech_table(figures["no_speech"]), "",
             "## Recordings longer than 30 s", "",
             "Held-out sentences of one domain joined with 0.6 s pauses, each recording decoded whole by each "
             "long-form path (every piece or window with the domain prompt), against the same sentences decoded "
             "one by one.", "", *longform_table(figures["longform"]),
             "", "## Example transcripts (val_small)", "", *examples(before, after),
             "## How this was made", "", "```", figures["settings"], "```", "",
             "| stage | seconds |", "|---|---:|", *(f"| {k} | {v:.0f} |" for k, v in timings.items()), ""]
    (out / "summary.json").write_text(strictjson.dumps(figures, ensure_ascii=False, indent=1))
    path = out / "REPORT.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
