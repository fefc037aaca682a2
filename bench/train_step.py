"""Training step, same model, freezing, batch, precision and data, three ways:

(a) wdx:      train_loop.main (the real loop: loader workers, log-mel on device, accumulate, clip,
              fused AdamW, cosine schedule, one host sync per step)
(b) trainer:  transformers Seq2SeqTrainer, the usual recipe: a map-style dataset doing
              soundfile + per-sample Resample + WhisperFeatureExtractor in loader workers
(c) floor:    forward + backward + AdamW step on one pre-collated batch, nothing else

Each variant runs in its own process (python -m bench.train_step VARIANT ...) so that
peak RSS is its own; it prints one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import soundfile as sf
import torch
import torchaudio


def steps_per_s(stamps: list[float], warmup: int) -> float:
    """Median rate over the steps after `warmup` (first steps pay one-off costs)."""
    gaps = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]
    return 1.0 / statistics.median(gaps)


def run_wdx(args) -> dict:
    import train_loop

    out = Path(tempfile.mkdtemp())
    argv = ["--dataset-root", args.data, "--base-model", args.model, "--run-name", "bench", "--output-dir", str(out),
            "--max-steps", str(args.steps), "--per-device-train-batch-size", str(args.batch), "--num-workers",
            str(args.workers), "--logging-steps", "1", "--eval-steps", str(10**6), "--save-steps", str(10**6),
            "--warmup-steps", "1", "--max-eval-samples", "1", "--generation-max-length", "2"]
    assert train_loop.main(argv) == 0
    rows = [json.loads(x) for x in open(out / "bench" / "metrics.jsonl") if '"train/loss"' in x]
    rates = [r["train/samples_per_s"] for r in rows][args.warmup:]
    return {"samples_per_s": statistics.median(rates)}


class UsualDataset(torch.utils.data.Dataset):
    """What the usual scripts do per sample, inside each loader worker."""

    def __init__(self, data: str, feature_extractor, tokenizer, prompt: list[int], eot: int) -> None:
        self.raw = []
        for tar in sorted(Path(data, "train").glob("*.tar")):
            with tarfile.open(tar) as tf:
                members = {}
                for m in tf.getmembers():
                    key, ext = m.name.split(".", 1)
                    members.setdefault(key, {})[ext] = tf.extractfile(m).read()
            self.raw += list(members.values())
        self.fe, self.tok, self.prompt, self.eot = feature_extractor, tokenizer, prompt, eot

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i: int) -> dict:
        from wdx.data.audio import decode_audio, to_mono

        raw = self.raw[i]
        ext = next(e for e in ("wav", "flac", "mp3", "ogg", "m4a") if e in raw)
        if ext == "m4a":
            frames, rate = decode_audio(raw[ext], ext)
            wave = torch.from_numpy(to_mono(frames))
        else:
            data, rate = sf.read(io.BytesIO(raw[ext]), dtype="float32", always_2d=True)
            wave = torch.from_numpy(data.mean(axis=1))
        wave = torchaudio.transforms.Resample(rate, 16000)(wave)
        features = self.fe(wave.numpy(), sampling_rate=16000, return_tensors="pt").input_features[0]
        ids = self.prompt + self.tok.encode(raw["txt"].decode(), add_special_tokens=False) + [self.eot]
        return {"input_features": features, "ids": ids}


def usual_collate(eot: int):
    def collate(items: list[dict]) -> dict:
        width = max(len(x["ids"]) for x in items) - 1
        dec = torch.full((len(items), width), eot)
        labels = torch.full((len(items), width), -100)
        for i, x in enumerate(items):
            dec[i, : len(x["ids"]) - 1] = torch.tensor(x["ids"][:-1])
            labels[i, 4: len(x["ids"]) - 1] = torch.tensor(x["ids"][5:])
        return {"input_features": torch.stack([x["input_features"] for x in items]), "decoder_input_ids": dec,
                "labels": labels}
    return collate


def run_trainer(args) -> dict:
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

    from wdx.data.collate import prompt_ids
    from wdx.model.whisper import setup

    w, _ = setup(args.model, language="ko", encoder_layers=4, decoder_layers=4)
    eot = w.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ds = UsualDataset(args.data, w.feature_extractor, w.tokenizer, prompt_ids(w.tokenizer, "ko", "normal"), eot)
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    targs = Seq2SeqTrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=1e-4, warmup_steps=1, lr_scheduler_type="cosine", logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to=[], dataloader_num_workers=args.workers, remove_unused_columns=False,
        optim="adamw_torch_fused", max_grad_norm=1.0, seed=0, disable_tqdm=True)
    Seq2SeqTrainer(model=w.model, args=targs, train_dataset=ds, data_collator=usual_collate(eot),
                   callbacks=[Clock()]).train()
    return {"samples_per_s": args.batch * steps_per_s(stamps, args.warmup)}


def run_floor(args) -> dict:
    from train_loop import build_optimizer
    from wdx.config import TrainConfig
    from wdx.data.collate import IGNORE, Collator
    from wdx.data.features import log_mel
    from wdx.data.pipeline import ShardedSamples, make_loader
    from wdx.data.shards import load_split
    from wdx.model.whisper import setup
    from wdx.scoring.forward import token_loss_sum

    w, groups = setup(args.model, language="ko", encoder_layers=4, decoder_layers=4)
    ds = ShardedSamples(load_split(args.data, "train"), rank=0, world_size=1, num_workers=0, batch_size=args.batch,
                        train=True, seed=0, target_sr=16000, default_domain=None, shuffle_block=1,
                        collate=Collator(w.tokenizer, "ko"))
    ds.set_epoch(0)
    batch = next(iter(make_loader(ds, 0)))
    features = log_mel(batch["audio"], w.model.config.num_mel_bins)
    opt = build_optimizer(TrainConfig(dataset_root="x", run_name="x"), groups, torch.device("cpu"))
    stamps = []
    for _ in range(args.steps):
        loss = token_loss_sum(w.model, {"input_features": features}, batch) / (batch["labels"] != IGNORE).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    return {"samples_per_s": args.batch * steps_per_s(stamps, args.warmup)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("variant", choices=("wdx", "trainer", "floor"))
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    result = {"wdx": run_wdx, "trainer": run_trainer, "floor": run_floor}[args.variant](args)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["peak_rss_children_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print("BENCH " + json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
