"""Build a dataset in the documented format from a manifest of audio files.

    python -m wdx.pack MANIFEST OUT_ROOT [--max-samples-per-shard N] [--max-shard-mb M]

MANIFEST is CSV (with a header) or JSONL with the fields `audio_path`, `text`, `domain`,
`split` (train / val_small / ...); any other field (e.g. `speaker`) goes into the sample's
json member. Audio bytes are stored as they are (no re-encoding). Relative audio paths are
taken relative to the manifest's directory. Rows are shuffled within each split (seeded) before
they are cut into shards: a manifest sorted by domain or speaker would otherwise give shards of
one domain, and a batch mixes only the few shards a loader worker has open (--keep-order keeps
the manifest's order).

Corpus conventions (wdx/conventions.py): `--text-convention kspon` converts KsponSpeech / AI
Hub markup at packing time; the sample's json keeps the transcript as written (`raw_text`),
its fluent form (`fluent_text`) and `text_convention`. `--text-encoding cp949` reads CP949 /
EUC-KR transcripts (a manifest's `text` is already text; this is for `text_path` rows, a
transcript file next to each clip, as KsponSpeech ships them). Headerless `.pcm` audio
(16-bit little-endian mono) needs `--pcm-rate` and is stored as wav (the same samples).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import webdataset as wds
from tqdm import tqdm

from . import conventions
from .audio import AUDIO_EXTENSIONS, PCM, AudioDecodeError, pcm_to_wav
from .conventions import PLAIN, Convention, convert
from .domains import DOMAINS, domains_flag
from .shards import METADATA

log = logging.getLogger(__name__)
REQUIRED = ("audio_path", "domain", "split")  # and `text`, or `text_path`


class ManifestError(ValueError):
    """A manifest row that cannot be packed (names the file and line)."""


def write_split(split_dir: str | Path, samples: Iterable[dict], *, max_count: int = 1000,
                max_bytes: int = 1 << 30, domain: str | None = None) -> list[dict]:
    """Write samples (dicts of tar members: `__key__`, `wav`, `txt`, ...) as shards + metadata.json.

    A shard closes when it holds `max_count` samples or `max_bytes` of member data.
    Returns the metadata's shard list. metadata.json is written last, to a temporary name
    then renamed, so a split with a metadata.json is a complete split.
    """
    split_dir = Path(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    writer, size = None, 0
    for sample in samples:
        if writer is None or shards[-1]["samples"] >= max_count or size >= max_bytes:
            if writer is not None:
                writer.close()
            shards.append({"filename": f"shard_{len(shards):06d}.tar", "samples": 0})
            writer, size = wds.TarWriter(str(split_dir / shards[-1]["filename"])), 0
        writer.write(sample)
        shards[-1]["samples"] += 1
        size += sum(len(v) for k, v in sample.items() if not k.startswith("__"))
    if writer is not None:
        writer.close()
    meta = {"total_samples": sum(s["samples"] for s in shards), "shards": shards}
    if domain is not None:
        meta["domain"] = domain
    tmp = split_dir / (METADATA + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, split_dir / METADATA)
    return shards


def read_manifest(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) for a CSV or JSONL manifest."""
    with open(path, encoding="utf-8") as f:
        if path.suffix.lower() in (".jsonl", ".json"):
            for n, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield n, json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ManifestError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        else:
            for n, row in enumerate(csv.DictReader(f), start=2):
                yield n, row


class Reading(NamedTuple):
    """How the rows' transcripts and audio are read."""

    convention: Convention = PLAIN
    text_encoding: str = "utf-8"
    pcm_rate: int | None = None
    domains: tuple[str, ...] = DOMAINS


AS_WRITTEN = Reading()


def transcript(row: dict, where: str, base: Path, encoding: str) -> str:
    """The row's `text`, or the file `text_path` names, decoded as `encoding` (never guessed)."""
    if str(row.get("text") or "").strip():
        return str(row["text"])
    if not str(row.get("text_path") or "").strip():
        raise ManifestError(f"{where}: missing text (or text_path)")
    path = base / row["text_path"]
    try:
        return path.read_bytes().decode(encoding)
    except OSError as exc:
        raise ManifestError(f"{where}: {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        hint = " (Korean corpora are often CP949: --text-encoding cp949)" if encoding.replace("-", "") == "utf8" else ""
        raise ManifestError(f"{where}: {path}: not {encoding}{hint}") from None


def to_sample(row: dict, where: str, base: Path, index: int, reading: Reading = AS_WRITTEN) -> tuple[str, dict]:
    """One manifest row -> (split, tar members)."""
    missing = [k for k in REQUIRED if not str(row.get(k) or "").strip()]
    if missing:
        raise ManifestError(f"{where}: missing {', '.join(missing)}")
    audio = base / row["audio_path"]
    ext = audio.suffix.lower().lstrip(".")
    if ext not in (*AUDIO_EXTENSIONS, PCM):
        raise ManifestError(f"{where}: {audio.name}: unsupported format .{ext} "
                            f"(expected {', '.join(AUDIO_EXTENSIONS)}, or pcm with --pcm-rate)")
    if ext == PCM and not reading.pcm_rate:
        raise ManifestError(f"{where}: {audio.name}: headerless .pcm: state its sample rate with --pcm-rate "
                            "(KsponSpeech: 16000)")
    if row["domain"] not in reading.domains:
        raise ManifestError(f"{where}: unknown domain {row['domain']!r} (expected {', '.join(reading.domains)}; "
                            "--domains names others)")
    written = transcript(row, where, base, reading.text_encoding)
    converted = convert(written, reading.convention)
    if converted.problem or not converted.text:
        state = "empty" if not converted.text else f"still marked up ({converted.problem})"
        raise ManifestError(f"{where}: transcript {written.strip()[:80]!r} is {state} under --text-convention "
                            f"{reading.convention.name}; fix the row or the convention")
    try:
        data = audio.read_bytes()
        if ext == PCM:
            data, ext = pcm_to_wav(data, reading.pcm_rate), "wav"
    except OSError as exc:
        raise ManifestError(f"{where}: {audio}: {exc.strerror}") from None
    except AudioDecodeError as exc:
        raise ManifestError(f"{where}: {audio}: {exc}") from None
    extra = {k: v for k, v in row.items()
             if k not in ("audio_path", "text", "text_path", "split") and v not in (None, "")}
    if reading.convention != PLAIN:
        extra.update(raw_text=written.strip(), text_convention=reading.convention.name,
                     dual_transcription=reading.convention.dual, marks=dict(converted.marks))
        if converted.fluent_form():
            extra["fluent_text"] = converted.fluent_form()
    key = f"{index:08d}_" + re.sub(r"[^0-9A-Za-z_-]", "_", audio.stem)[:80]  # no dots: wds splits on them
    members = {"__key__": key, ext: data, "txt": converted.text.encode("utf-8"),
               "json": json.dumps(extra, ensure_ascii=False).encode("utf-8")}
    return row["split"], members


def pack(manifest: Path, out: Path, max_count: int, max_bytes: int, seed: int | None = 0,
         reading: Reading = AS_WRITTEN) -> dict[str, list[dict]]:
    """Pack every split named in the manifest, its rows shuffled by `seed` (None: manifest order);
    validates the whole manifest before writing."""
    by_split: dict[str, list[tuple[str, dict]]] = {}
    base = manifest.parent
    for i, (n, row) in enumerate(tqdm(list(read_manifest(manifest)), desc="reading manifest", unit="row")):
        split, _ = to_sample(row, f"{manifest}:{n}", base, i, reading)  # validate all first: fail before writing
        by_split.setdefault(split, []).append((f"{manifest}:{n}", row))
    written = {}
    for split, rows in by_split.items():
        if (out / split / METADATA).exists():
            raise ManifestError(f"{out / split}: already holds a dataset; choose another output root")
        if seed is not None:
            random.Random(f"{seed}-{split}").shuffle(rows)
        samples = (to_sample(row, where, base, i, reading)[1] for i, (where, row) in enumerate(rows))
        written[split] = write_split(out / split, tqdm(samples, total=len(rows), desc=f"packing {split}",
                                                       unit="sample"), max_count=max_count, max_bytes=max_bytes)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wdx.pack", description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest", type=Path, help="CSV or JSONL: audio_path, text (or text_path), domain, split")
    parser.add_argument("out", type=Path, help="dataset root to create (ROOT/<split>/shard_*.tar)")
    parser.add_argument("--max-samples-per-shard", type=int, default=1000, help="close a shard at this many samples")
    parser.add_argument("--max-shard-mb", type=float, default=1024, help="close a shard at this much audio+text")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle of each split's rows")
    parser.add_argument("--keep-order", action="store_true", help="write rows in manifest order (no shuffle): "
                        "only for manifests already shuffled, or evaluation sets read in order")
    conventions.add_flags(parser, "converted at packing time (see wdx/conventions.py)")
    parser.add_argument("--text-encoding", default="utf-8", help="encoding of text_path files (cp949 / euc-kr for "
                        "KsponSpeech); never guessed")
    parser.add_argument("--domains", type=domains_flag, default=DOMAINS, help="the domains rows may name, "
                        "comma-separated (as train_loop.py --domains)")
    parser.add_argument("--pcm-rate", type=int, help="sample rate of headerless 16-bit .pcm audio (KsponSpeech: 16000)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        "".encode(args.text_encoding)
    except LookupError:
        parser.error(f"--text-encoding {args.text_encoding}: unknown encoding")
    reading = Reading(conventions.from_args(args), args.text_encoding, args.pcm_rate, args.domains)
    try:
        written = pack(args.manifest, args.out, args.max_samples_per_shard, int(args.max_shard_mb * 2**20),
                       None if args.keep_order else args.seed, reading)
    except (ManifestError, OSError) as exc:
        print(f"wdx.pack: error: {exc}", file=sys.stderr)
        return 1
    for split, shards in written.items():
        log.info("%s: %d samples in %d shards", args.out / split, sum(s["samples"] for s in shards), len(shards))
    return 0


if __name__ == "__main__":
    sys.exit(main())
