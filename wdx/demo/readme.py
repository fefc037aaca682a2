"""The figures of README.md and docs/*.md, rendered from committed JSON, so they cannot drift.

    python -m wdx.demo.readme demo_out/summary.json [--check]

`make demo` writes OUT/summary.json (every figure REPORT.md quotes, without the per-clip
samples); the run it came from is kept as bench/demo.json. The other blocks come from the
bench JSON files named below. Each block between `<!-- demo:NAME -->` and `<!-- /demo:NAME -->`
sits in exactly one page; this rewrites it, and a test checks that the pages equal what the
committed JSON renders. --check only compares.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from bench.encoder_cache import GEOMETRIES
from bench.flops import cache_bound, train_flops_per_sample
from bench.plan import shaped
from wdx.demo.report import cost_table, deploy_table, longform_table, no_speech_table, table, token_table
from wdx.model.domains import ROWS_INIT
from wdx.scoring.metrics import interval_text
from wdx.scoring.study import table as study_table
from wdx.train.plan import load_config

BLOCKS = ("results", "deploy", "augment", "rows", "study", "perf", "cache", "cache_why", "cache_scale", "memory",
          "plan_accuracy", "plan", "plan_batches", "plan_batches_gc")
ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
AUGMENT = BENCH / "augment.json"  # the augmentation measurement
ROWS = BENCH / "rows_init.json"  # python -m bench.rows_init
STUDY = BENCH / "study.json"  # make study
PERF = BENCH / "results.json"  # python -m bench.run --json bench/results.json
CACHE = BENCH / "encoder_cache.json"  # python -m bench.encoder_cache
PLAN = BENCH / "plan.json"  # python -m bench.plan


def render(figures: dict) -> dict[str, str]:
    """{block name: markdown} for every block the README holds."""
    timings = ", ".join(f"{name.split(' ', 1)[1]} {seconds:.0f} s" for name, seconds in figures["timings"].items())
    results = [f"Measured by `make demo` on {figures['date']} ({figures['machine']}): {figures['total_s'] / 60:.1f} "
               f"min for the run, installs excluded. Stages: {timings}.", "",
               *table(figures["evals"], figures["labels"]), "",
               "Every clip of the seen-voice split decoded with each domain token (the right one in bold):", "",
               *token_table(figures["tokens"])]
    n = next(iter(figures["deployed"].values()))["n"]
    deploy = [f"The same {n} seen-voice held-out clips decoded each way (greedy, CPU; the first row's seconds are "
              f"those of the {n} unseen-voice clips, since the seen ones were decoded with both tokens):", "",
              *deploy_table(figures["deployed"]), "",
              "Each way as a deployment runs it, in its own process, over the same clips as wav files:", "",
              *cost_table(figures["costs"]), "",
              "`DomainWhisperModel` (int8) on the dyslexic clips with each `no_speech_threshold`, as read and as a "
              "hesitant reader says them (silence before the first word, a pause inside):", "",
              *no_speech_table(figures["no_speech"]), "", no_speech_verdict(figures["no_speech"]), "",
              "Held-out sentences of one domain read one after another with 0.6 s pauses, each recording decoded "
              "whole:", "", *longform_table(figures["longform"])]
    perf, cache = json.loads(PERF.read_text()), json.loads(CACHE.read_text())
    return {"results": "\n".join(results), "deploy": "\n".join(deploy),
            "augment": "\n".join(augment_table(json.loads(AUGMENT.read_text()))),
            "rows": "\n".join(rows_table(json.loads(ROWS.read_text()))),
            "study": "\n".join(study_block(json.loads(STUDY.read_text()))),
            "perf": "\n".join(perf_block(perf)), "memory": "\n".join(memory_block(perf)),
            "cache": "\n".join(cache_block(cache)), "cache_why": cache_why(cache), "cache_scale": cache_scale(),
            **plan_blocks(json.loads(PLAN.read_text()))}


def rows_table(run: dict) -> list[str]:
    """bench/rows_init.json: how the domain rows start and learn, and what the token then changes."""
    lines = [f"Measured on {run['date']} ({run['machine']}, {run['minutes']:.0f} min; `python -m bench.rows_init`): "
             f"{run['recipe']}; `final/` decoded with both tokens on the {run['variants'][0]['n']} dyslexic clips of "
             "`val_small` (seen voices).", "",
             "| rows start (`--domain-rows-init`) | row lr (`--domain-rows-lr-scale`) | rows apart (L2) | transcripts "
             "the token changed (dyslexic + normal) | dyslexic CER, right token / wrong token (95 % CI of the right) "
             "| misread words faithful / repaired |", "|---|---|---:|---:|---:|---:|"]
    for v in run["variants"]:
        start = "the mean row, both" if v["init"] == 0 else f"mean + {v['init']:g} std of noise each"
        shares = ("n/a" if v["faithful"] is None else f"{v['faithful']:.2f} / {v['repaired']:.2f}")
        lines.append(f"| {start} | x{v['lr_scale']:g} | {v['rows_apart']:.4f} | {v['changed']['dyslexic']} + "
                     f"{v['changed']['normal']} | {v['cer_right']:.3f} / {v['cer_wrong']:.3f} "
                     f"({interval_text(v['cer_lo'], v['cer_hi'], '.3f')}) | {shares} |")
    same = [v for v in run["variants"] if v["init"] == 0]
    default = next(v for v in run["variants"] if v["init"] == ROWS_INIT and v["lr_scale"] == 1)
    best = min(run["variants"], key=lambda v: v["cer_right"])
    lines += ["", f"Rows started identical changed {' and '.join(str(v['changed']['dyslexic']) for v in same)} "
              f"dyslexic transcripts (x1, x10); the default ({ROWS_INIT:g}, x1) changed "
              f"{default['changed']['dyslexic']}, with a dyslexic CER of {default['cer_right']:.3f} under the right "
              f"token and {default['cer_wrong']:.3f} under the wrong one. The lowest right-token CER here is "
              f"{best['cer_right']:.3f} (start {best['init']:g}, x{best['lr_scale']:g}); on "
              f"{best['n']} clips that is not a reason to change the default; `make study` (below) measures the token "
              "at the default."]
    return lines


def perf_block(run: dict) -> list[str]:
    """bench/results.json: the data path and the training step against the usual way."""
    data, step = run["data_path"], run["train_step"]
    usual, ours = data["usual"], data["wdx"]
    clips = round(usual["samples_per_s"] * usual["seconds"])
    device = data["wdx_worker_only_samples_per_s"]
    ms = {k: 1000 * v / clips for k, v in usual["stages_s"].items()}
    lines = [f"Data path ({run['machine']}), one worker process, {clips} clips:", "",
             "| path | samples/s | decode | resample | log-mel | collate |", "|---|---:|---:|---:|---:|---:|",
             f"| usual: soundfile, `Resample` built per clip, `WhisperFeatureExtractor` per clip | "
             f"{usual['samples_per_s']:.1f} | " + " | ".join(f"{usual['stages_s'][k]:.3f} s" for k in
                                                      ("decode", "resample", "log-mel", "collate")) + " |",
             f"| wdx, log-mel in the worker | {ours['samples_per_s']:.1f} (**{data['ratio']:.2f}x**) | "
             f"{ours['stages_s']['decode+resample']:.3f} s (with resample) | | {ours['stages_s']['log-mel']:.3f} s | "
             f"{ours['stages_s']['collate']:.3f} s |",
             f"| wdx as the loop runs it: log-mel on the training device | {device:.1f} "
             f"(**{device / usual['samples_per_s']:.2f}x**) | {ours['stages_s']['decode+resample']:.3f} s (with "
             f"resample) | | (device) | {ours['stages_s']['collate']:.3f} s |", "",
             f"Both paths produce the same features (max difference {data['max_abs_feature_difference']:.1e}). Both "
             f"use the same decoders (libsndfile, FFmpeg), which alone take {ms['decode']:.1f} ms of the usual path's "
             f"{1000 / usual['samples_per_s']:.1f} ms per clip: no path with these decoders can exceed about "
             f"{1000 / usual['samples_per_s'] / ms['decode']:.1f}x.", "",
             "Training step (whisper-base, fp32, the default freeze):", "",
             "| way | loader workers | samples/s | peak RSS (main) |", "|---|---:|---:|---:|"]
    names = {"floor/w0": ("floor: forward + backward + AdamW on one pre-collated batch", "-"),
             "wdx/w0": ("`train_loop.py`", "0"), "trainer/w0": ("`Seq2SeqTrainer`, same model, freezing, batch, "
                                                               "precision, data", "0"),
             "wdx/w1": ("`train_loop.py`", "1"), "trainer/w1": ("`Seq2SeqTrainer`", "1")}
    for key, (name, workers) in names.items():
        r = step[key]
        rate = f"**{r['samples_per_s']:.2f}**" if key == "wdx/w0" else f"{r['samples_per_s']:.2f}"
        lines.append(f"| {name} | {workers} | {rate} | {r['peak_rss_mib']:.0f} MiB |")
    met = step["overhead_w0"] <= 1.05 and step["speedup_w0"] >= 1.0
    lines += ["", f"With 0 workers the loop takes {step['overhead_w0']:.2f}x the floor's time per sample and runs "
              f"{step['speedup_w0']:.2f}x as fast as `Seq2SeqTrainer`; with 1 worker, {step['overhead_w1']:.2f}x and "
              f"{step['speedup_w1']:.2f}x. Targets with 0 workers (overhead <= 1.05x, at least as fast as "
              f"`Seq2SeqTrainer`): **{'met' if met else 'not met in this run'}**."]
    return lines


def memory_block(run: dict) -> list[str]:
    """bench/results.json's memory section: one training step's peak, before and after issue 12."""
    shape = run["memory_shape"]
    lines = [f"Peak GiB of one step, the bench's model ({shape['model']}) at batch {shape['batch']} x "
             f"{shape['tokens']} decoder tokens unless the row says otherwise:", "",
             "| step (last 4 + 4 blocks trained) | before | after | after / before |", "|---|---:|---:|---:|"]
    for name, r in run["memory"].items():
        lines.append(f"| {name} | {r['before_gib']:.2f} | **{r['after_gib']:.2f}** | "
                     f"{r['after_gib'] / r['before_gib']:.2f} |")
    big = next((r for name, r in run["memory"].items() if name.startswith("large-v3")), None)
    if big:
        lines += ["", f"Trained parameters held by AdamW for large-v3: {big['trained_before'] / 1e6:.1f} M before (the "
                  f"whole tied embedding), {big['trained_after'] / 1e6:.1f} M after."]
    return lines


def cache_block(run: dict) -> list[str]:
    """bench/encoder_cache.json: epochs from audio against epochs from the encoder cache, per geometry."""
    names = {"base": "whisper-base shapes (d_model {d_model}, {layers} + {layers} layers)",
             "32+32": "large-v3's layer counts ({layers} + {layers}, 128 mel bins) at d_model {d_model}"}
    lines = [f"{run['machine']}, {run['train_clips']} training clips, batch {run['batch']}:", "",
             "| geometry | frozen blocks | epoch from audio | build | cached epoch 1 | cached epoch 2 | speed-up | "
             "FLOP bound | of bound | first epoch (build + epoch) | disk per clip |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, g in run["geometries"].items():
        audio = g["epoch_s_audio"][-1]  # the last epoch from audio: the one the ratios compare against
        lines.append(f"| {names.get(key, key).format(**g)} | {g['frozen_blocks']} | {audio:.1f} s | "
                     f"{g['build_s']:.1f} s ({g['clips_built']} clips) | {g['epoch_s_cached'][0]:.1f} s | "
                     f"{g['epoch_s_cached'][1]:.1f} s | **{g['speedup']:.2f}x** | {g['flop_bound']:.2f}x | "
                     f"{100 * g['of_bound']:.0f} % | {g['first_epoch_ratio']:.2f}x | "
                     f"{g['mb_per_clip']:.2f} MB (fp32) |")
    big = run["geometries"].get("32+32")
    if big:
        met = big["speedup"] >= 2.0 and big["of_bound"] >= 0.85 and big["first_epoch_ratio"] <= 1.15
        lines += ["", "Targets for the 32 + 32 model (>= 2.0x per epoch after the first, >= 85 % of the bound, first "
                  f"epoch <= 1.15x an epoch from audio): **{'met' if met else 'not met on this CPU'}** "
                  f"({big['speedup']:.2f}x, {100 * big['of_bound']:.0f} %, {big['first_epoch_ratio']:.2f}x)."]
    return lines


def cache_why(run: dict, key: str = "32+32") -> str:
    """Why the speed-up falls short of the FLOP bound: the rate of the work removed against the rate of the rest,
    from the run's seconds per clip and bench.flops' count of the same geometry."""
    g, shape = run["geometries"][key], GEOMETRIES[key]
    config = shaped(shape["d_model"], shape["layers"], shape["n_mels"], shape["vocab_size"])
    flops = train_flops_per_sample(config, round(g["label_tokens"]), 4, 4)
    frozen = flops["conv_stem"] + flops["encoder_frozen"]
    rest = flops["total"] - frozen
    audio, cached = g["epoch_s_audio"][-1] / run["train_clips"], g["epoch_s_cached"][-1] / run["train_clips"]
    frozen_rate, rest_rate = frozen / (audio - cached) / 1e9, rest / cached / 1e9
    build = g["build_s"] / g["clips_built"]
    return (f"Why: the bound counts FLOPs as if all cost the same, and the work the cache removes is the cheapest "
            f"per FLOP on this CPU. In the {key.replace('+', ' + ')} run the frozen blocks' forward "
            f"({frozen / 1e9:.0f} GFLOP a clip, "
            f"bench.flops) took {audio - cached:.2f} s a clip (an epoch from audio less a cached one): "
            f"{frozen_rate:.0f} GFLOP/s, large no-grad matmuls and attention forward. What remains ({rest / 1e12:.2f} "
            f"TFLOP a clip: forward + backward of the trained blocks, attention's backward kernel, the decoder's thin "
            f"matmuls at {g['label_tokens']:.0f} + 5 tokens, its cross-attention projections over 1500 frames) ran at "
            f"{rest_rate:.0f} GFLOP/s. So the speed-up is 1 + (bound - 1) x {rest_rate:.0f}/{frozen_rate:.0f} = "
            f"1 + {g['flop_bound'] - 1:.2f} x {rest_rate / frozen_rate:.2f} = {g['speedup']:.2f}x. The build ran at "
            f"{build:.2f} s a clip against the {audio - cached:.2f} s the frozen blocks take inside a step (one loader "
            "worker decoding on the second of two cores, plus the states written), hence the first epoch's "
            f"{g['first_epoch_ratio']:.2f}x.")


def cache_scale(label_tokens: int = 50, tflops: float = 400, gpus: int = 8) -> str:
    """What the cache is worth and costs at real sizes, counted by bench.flops from the published geometries."""
    large, base = load_config("openai/whisper-large-v3"), load_config("openai/whisper-base")
    flops = train_flops_per_sample(large, label_tokens, 4, 4)
    cached = flops["total"] - flops["conv_stem"] - flops["encoder_frozen"]
    mb = {name: 1500 * load_config(f"openai/whisper-{name}").d_model * 2 / 1e6
          for name in ("large-v3", "medium", "small", "base")}
    clips_s = tflops * 1e12 / cached
    disk = ", ".join(f"{name} {v:.2f} MB" for name, v in list(mb.items())[1:])
    return (f"When it pays off. The build costs about one epoch of the frozen blocks' forward (plus writing), which a "
            "first epoch from audio spends anyway; every later epoch runs only the trained part. Over 50-200 epochs "
            f"that is up to the FLOP bound: {cache_bound(large, label_tokens, 4, 4):.2f}x for large-v3 with "
            f"{label_tokens} label tokens per clip (`bench.flops.cache_bound`), "
            f"{cache_bound(base, label_tokens, 4, 4):.2f}x "
            f"for base, whose {base.encoder_layers - 4} frozen of {base.encoder_layers} blocks are a small share. It "
            "needs the disk to hold it and to feed it:\n"
            f"- disk per clip (1500 x d_model x 2 bytes in bf16): large-v3 {mb['large-v3']:.2f} MB (10K clips "
            f"{mb['large-v3'] * 1e4 / 1e3:.0f} GB, 100K {mb['large-v3'] * 1e5 / 1e3:.0f} GB, 1M "
            f"{mb['large-v3'] * 1e6 / 1e6:.2f} TB), {disk}; fp32 twice that;\n"
            f"- read rate = clips per second x MB per clip. A cached large-v3 step is about {cached / 1e12:.2f} TFLOP "
            f"per clip; at {tflops} TFLOP/s sustained (40 % of an H100's dense bf16 peak) a GPU trains about "
            f"{clips_s:.0f} clips/s and reads about {clips_s * mb['large-v3'] / 1e3:.1f} GB/s, {gpus} GPUs about "
            f"{gpus * clips_s * mb['large-v3'] / 1e3:.0f} GB/s. Network file systems rarely sustain that: put DIR "
            "on local NVMe, and keep `--num-workers` >= 2 so reading overlaps compute.")


def plan_blocks(run: dict) -> dict[str, str]:
    """bench/plan.json: the plan against measured peaks, large-v3's plan as --plan prints it, the batch tables."""
    rows = ["| shape | precision | batch x decoder tokens | planned | measured | planned / measured - 1 |",
            "|---|---|---:|---:|---:|---:|"]
    for r in run["accuracy"]:
        precision = "fp32" if r["precision"] == "no" else r["precision"]
        rows.append(f"| {r['shape']} (d_model {r['d_model']}, {r['layers']} + {r['layers']} layers) | {precision} | "
                    f"{r['batch']} x {r['tokens']} | {r['planned_mib']:.1f} MiB | {r['measured_mib']:.1f} MiB | "
                    f"{100 * (r['planned_mib'] / r['measured_mib'] - 1):+.1f} % |")
    printed = ["```", run["large_v3"]["off"], run["large_v3"]["on"], "```"]
    return {"plan_accuracy": "\n".join(rows), "plan": "\n".join(printed),
            "plan_batches": run["batch_tables"]["off"], "plan_batches_gc": run["batch_tables"]["on"]}


def study_block(run: dict) -> list[str]:
    """bench/study.json: the command, the table and what it says."""
    unseen = run["comparisons"]["val_unseen"]
    d = unseen["dyslexic"]
    faithful = ("no misread word was counted" if d.get("faithful_diff") is None else
                f"the token arm kept {d['faithful_b']:.3f} of {d['misread_words']} misread words as said against "
                f"{d['faithful_a']:.3f} without it (difference {d['faithful_diff']:+.3f}, 95 % interval "
                f"{interval_text(d['faithful_lo'], d['faithful_hi'])}, "
                f"{'real after Holm' if d['faithful_real'] else 'within noise'})")
    verdict = (f"On unseen voices the dyslexic CER was {d['cer_b']:.3f} with the token and {d['cer_a']:.3f} without "
               f"(difference {d['diff']:+.3f}, 95 % interval {interval_text(d['diff_lo'], d['diff_hi'])}, "
               f"{'real after Holm' if d['real'] else 'within noise'}), and {faithful}.")
    return [f"`make study` on {run['date']} ({run['machine']}, {run['total_minutes']:.0f} min): `{run['command']}`, "
            f"{len(run['seeds'])} seeds per arm, the reported split read by {run['voices']} espeak-ng voices training "
            "never heard.", "", *study_table(run), "", verdict]


def no_speech_verdict(rows: list[dict]) -> str:
    """The sentence that says which no_speech_threshold DomainWhisperModel uses, and why, from the rows."""
    top = max((r["max_no_speech_prob"] for r in rows if r["max_no_speech_prob"] is not None), default=None)
    blanked = sum(r["empty"] for r in rows if r["threshold"] is not None)
    default = next((r["threshold"] for r in rows if r["threshold"] is not None), None)
    if top is None or default is None:
        return "No clip was decoded with a threshold, so none was measured."
    return (f"`DomainWhisperModel.transcribe` keeps faster-whisper's `no_speech_threshold={default}`: the largest "
            f"no-speech probability of any of these clips was {top:.3f}, and it blanked {blanked} of them (a window "
            "of silence in a long file is still dropped rather than transcribed as text nobody said). Measure it on "
            "your own readers' recordings before relying on it: `no_speech_threshold=None` never drops a window.")


def augment_table(run: dict) -> list[str]:
    """bench/augment.json: the demo's fine-tune with and without augmentation, paired per clip."""
    lines = [f"Measured on {run['date']} ({run['machine']}): {run['baseline']}, against the same with "
             f"`{run['augmented_flags']}` (everything else equal; {run['command']}). The augmenter costs "
             f"{run['augmenter_ms_per_sample']:.1f} ms per sample ({run['mean_clip_s']:.1f} s clips) in the loader, "
             "against about a second of training compute per sample on this CPU.", "",
             "| held out | domain | n | CER without | CER with | with - without (95 % CI, paired) | misread words "
             "kept as said, without / with |", "|---|---|---:|---:|---:|---:|---:|"]
    for split, result in run["splits"].items():
        for domain, r in result["compare"].items():
            faithful = (f"{r['faithful_a']:.3f} / {r['faithful_b']:.3f}" if r.get("faithful_diff") is not None
                        else "n/a")
            lines.append(f"| {split} | {domain} | {r['n']} | {r['cer_a']:.3f} | {r['cer_b']:.3f} | {r['diff']:+.3f} "
                         f"({interval_text(r['diff_lo'], r['diff_hi'])}){' *' if r['real'] else ''} | {faithful} |")
    real = sum(r.get("real", False) for result in run["splits"].values() for r in result["compare"].values())
    lines += ["", f"* marks a difference that survives Holm's correction over the table: {real} here."]
    return lines


def pattern(name: str) -> re.Pattern:
    return re.compile(rf"<!-- demo:{name} -->\n(.*?)<!-- /demo:{name} -->", re.S)


def pages(root: Path = ROOT) -> dict[Path, str]:
    """README.md and every docs page, by path: the texts the blocks live in."""
    paths = (root / "README.md", *sorted((root / "docs").glob("*.md")))
    return {path: path.read_text(encoding="utf-8") for path in paths}


def update(texts: dict[Path, str], figures: dict) -> dict[Path, str]:
    """Every page with its blocks re-rendered. A block missing from every page, or in two, is an
    error: a figure with no place, or two places that could disagree."""
    out = dict(texts)
    for name, text in render(figures).items():
        found = [path for path, page in texts.items() if pattern(name).search(page)]
        if len(found) != 1:
            where = "no page has" if not found else f"{len(found)} pages have"
            raise ValueError(f"{where} a <!-- demo:{name} --> ... <!-- /demo:{name} --> block (README.md, docs/*.md)")
        block = f"<!-- demo:{name} -->\n{text}\n<!-- /demo:{name} -->"
        out[found[0]] = pattern(name).sub(lambda _, block=block: block, out[found[0]])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wdx.demo.readme", description=__doc__.split("\n\n")[0])
    parser.add_argument("summary", type=Path, help="OUT/summary.json of a `make demo` run (or bench/demo.json)")
    parser.add_argument("--check", action="store_true", help="only report whether the pages match")
    args = parser.parse_args(argv)
    try:
        figures = json.loads(args.summary.read_text())
        texts = pages()
        new = update(texts, figures)
    except (OSError, ValueError, KeyError) as exc:
        print(f"wdx.demo.readme: error: {exc}", file=sys.stderr)
        return 1
    changed = [path for path in texts if new[path] != texts[path]]
    if args.check:
        for path in changed:
            print(f"wdx.demo.readme: {path.relative_to(ROOT)} differs from {args.summary}", file=sys.stderr)
        return 1 if changed else 0
    for path in changed:
        path.write_text(new[path], encoding="utf-8")
    print(f"{len(changed)} page(s) rewritten from {args.summary} and bench/*.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
