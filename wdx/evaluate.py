"""Evaluate a trained model: per-sample hypotheses and CER/WER per domain.

    python -m wdx.evaluate MODEL --dataset ROOT [--split val_small]
    python -m wdx.evaluate MODEL --list samples.jsonl      # audio_path, text, domain per line
    python -m wdx.evaluate MODEL --dir DIR --domain normal # DIR/x.wav + DIR/x.txt pairs
    ... [--compare-domains] [--json OUT.json] [--batch-size 8]

MODEL is final/ (or any HF Whisper directory) or a training checkpoint. --compare-domains
decodes every clip once per domain token and reports how the prompt changes the result.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from .audio import AUDIO_EXTENSIONS, AudioDecodeError, decode_audio, resample, to_mono
from .data import MAX_SECONDS, ShardedSamples, make_loader
from .domains import DOMAINS
from .inference import Transcriber
from .metrics import by_domain, error_rates, format_table
from .shards import DatasetError, load_split
from .text import normalize_text
from .tracking import quiet_libraries

log = logging.getLogger(__name__)


class InputError(ValueError):
    """An input file or list entry that cannot be evaluated (names it)."""


def read_clip(path: Path, target_sr: int = 16000):
    ext = path.suffix.lower().lstrip(".")
    if ext not in AUDIO_EXTENSIONS:
        raise InputError(f"{path}: unsupported format .{ext} (expected {', '.join(AUDIO_EXTENSIONS)})")
    try:
        frames, rate = decode_audio(path.read_bytes(), ext)
    except (OSError, AudioDecodeError) as exc:
        raise InputError(f"{path}: {exc}") from None
    if frames.shape[1] == 0 or frames.shape[1] / rate > MAX_SECONDS:
        raise InputError(f"{path}: {frames.shape[1] / rate:.1f} s of audio; Whisper takes 0-30 s")
    return resample(to_mono(frames), rate, target_sr)


def list_items(path: Path) -> list[dict]:
    """JSON array or JSONL of {audio_path, text, domain}; paths relative to the list's folder."""
    raw = path.read_text(encoding="utf-8")
    rows = json.loads(raw) if raw.lstrip().startswith("[") else [json.loads(x) for x in raw.splitlines() if x.strip()]
    items = []
    for n, row in enumerate(rows, start=1):
        missing = [k for k in ("audio_path", "text", "domain") if not row.get(k)]
        if missing:
            raise InputError(f"{path}: entry {n} lacks {', '.join(missing)}")
        if row["domain"] not in DOMAINS:
            raise InputError(f"{path}: entry {n}: unknown domain {row['domain']!r}")
        items.append(dict(key=row.get("key", Path(row["audio_path"]).stem), path=path.parent / row["audio_path"],
                          text=normalize_text(row["text"]), domain=row["domain"]))
    return items


def dir_items(folder: Path, domain: str) -> list[dict]:
    """Audio files with a same-named .txt reference next to them."""
    items = []
    for audio in sorted(p for p in folder.iterdir() if p.suffix.lower().lstrip(".") in AUDIO_EXTENSIONS):
        ref = audio.with_suffix(".txt")
        if not ref.exists():
            raise InputError(f"{audio}: no reference {ref.name} next to it")
        items.append(dict(key=audio.stem, path=audio, text=normalize_text(ref.read_text(encoding="utf-8")),
                          domain=domain))
    if not items:
        raise InputError(f"{folder}: no audio files")
    return items


def file_batches(items: list[dict], batch_size: int) -> Iterator[list[dict]]:
    for i in range(0, len(items), batch_size):
        chunk = items[i: i + batch_size]
        yield [dict(item, audio=read_clip(item["path"])) for item in chunk]


def dataset_batches(root: str, split: str, batch_size: int, workers: int, default_domain: str | None):
    ds = ShardedSamples(load_split(root, split), rank=0, world_size=1, num_workers=workers, batch_size=batch_size,
                        train=False, seed=0, target_sr=16000, default_domain=default_domain, shuffle_block=1,
                        collate=lambda samples: {"samples": samples})
    ds.set_epoch(0)
    for batch in make_loader(ds, workers):
        yield batch["samples"]


def run(transcriber: Transcriber, batches, total: int | None, compare: bool) -> list[dict]:
    rows = []
    with tqdm(total=total, desc="transcribing", unit="clip") as bar:
        for samples in batches:
            clips = [s["audio"] for s in samples]
            hyps = transcriber(clips, [s["domain"] for s in samples])
            extra = {d: transcriber(clips, [d] * len(clips)) for d in DOMAINS} if compare else {}
            for i, s in enumerate(samples):
                row = dict(key=s["key"], domain=s["domain"], ref=s["text"], hyp=hyps[i],
                           cer=error_rates([s["text"]], [hyps[i]])["cer"])
                if compare:
                    row["hyp_by_prompt"] = {d: extra[d][i] for d in DOMAINS}
                rows.append(row)
            bar.update(len(samples))
    return rows


def compare_table(rows: list[dict]) -> dict:
    """CER for every (true domain, prompted domain) pair, and how often the prompt changes the text."""
    out = {}
    for true in DOMAINS:
        sub = [r for r in rows if r["domain"] == true]
        out[true] = {f"prompt_{p}": error_rates([r["ref"] for r in sub], [r["hyp_by_prompt"][p] for r in sub])["cer"]
                     for p in DOMAINS}
        out[true]["n"] = len(sub)
        out[true]["changed"] = sum(len(set(r["hyp_by_prompt"].values())) > 1 for r in sub)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wdx.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="final/ directory, HF Whisper directory, or training checkpoint")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="WebDataset root (documented layout)")
    src.add_argument("--list", type=Path, help="JSON/JSONL with audio_path, text, domain")
    src.add_argument("--dir", type=Path, help="folder of audio files with same-named .txt references")
    parser.add_argument("--split", default="val_small", help="split of --dataset")
    parser.add_argument("--domain", choices=DOMAINS, help="domain of every clip in --dir; default domain for "
                        "--dataset samples that name none")
    parser.add_argument("--compare-domains", action="store_true", help="also decode with every domain token")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=1, help="loader workers for --dataset")
    parser.add_argument("--max-new-tokens", type=int, default=225)
    parser.add_argument("--language", default="ko")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="write per-sample results and the tables here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    quiet_libraries()
    try:
        if args.dir and not args.domain:
            raise InputError("--dir needs --domain (the clips' speaker domain)")
        transcriber = Transcriber(args.model, args.language, args.device, args.max_new_tokens)
        if args.dataset:
            total = load_split(args.dataset, args.split).total
            batches = dataset_batches(args.dataset, args.split, args.batch_size, args.num_workers, args.domain)
        else:
            items = list_items(args.list) if args.list else dir_items(args.dir, args.domain)
            total, batches = len(items), file_batches(items, args.batch_size)
        rows = run(transcriber, batches, total, args.compare_domains)
    except (InputError, DatasetError, ValueError, OSError) as exc:
        print(f"wdx.evaluate: error: {exc}", file=sys.stderr)
        return 1
    results = by_domain(rows)
    report = {"model": str(args.model), "domain_prompt": transcriber.has_domains, "results": results, "samples": rows}
    print(format_table(results, title=f"{args.model} ({'with' if transcriber.has_domains else 'without'} "
                                      "domain prompt)"))
    if args.compare_domains:
        report["compare_domains"] = compare_table(rows)
        for true, r in report["compare_domains"].items():
            print(f"  {true:<9} CER with <|domain:normal|> {r['prompt_normal']:.4f}, with <|domain:dyslexic|> "
                  f"{r['prompt_dyslexic']:.4f}; text changed for {r['changed']}/{r['n']}")
    if args.json:
        args.json.write_text(json.dumps(report, ensure_ascii=False, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
