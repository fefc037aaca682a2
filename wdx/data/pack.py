"""Build a dataset in the documented format from a manifest of audio files.

    python -m wdx.pack MANIFEST OUT_ROOT [--max-samples-per-shard N] [--max-shard-mb M]
    python -m wdx.pack KsponSpeech_scripts/train.trn OUT_ROOT --audio-root KSPON_DIR --domain normal

MANIFEST is CSV (with a header) or JSONL with the fields `audio_path`, `text`, `domain`,
`split` (train / val_small / ...; `--domain` / `--split` fill in rows without them); any
other field (e.g. `speaker`) goes into the sample's json member. Or a KsponSpeech `.trn`
script (UTF-8 lines `path :: text`): it implies `--text-convention kspon`, `--pcm-rate
16000` and `--split` its own name (train.trn: train). Audio bytes are stored as they are (no
re-encoding). Relative audio paths are taken relative to `--audio-root` (default: the
manifest's directory).

A row that cannot be packed (a missing, empty or undecodable audio file, an odd-length
pcm, a transcript that is empty after conversion or still marked up, an undecodable
transcript file, an unknown domain, a missing field) is skipped, counted by reason and
listed with its line in OUT_ROOT/<manifest name>.skipped.tsv; the summary names the counts.
Above --max-skip-fraction of the manifest's rows the command stops with one line naming the
first problem: a systematic one (a missing flag, the wrong encoding) stops it early, and
the shards written so far are a complete, valid split. Rows are shuffled within each split (seeded) before
they are cut into shards: a manifest sorted by domain or speaker would otherwise give shards of
one domain, and a batch mixes only the few shards a loader worker has open (--keep-order keeps
the manifest's order).

Corpus conventions (wdx/data/conventions.py): `--text-convention kspon` converts KsponSpeech / AI
Hub markup at packing time; the sample's json keeps the transcript as written (`raw_text`),
its fluent form (`fluent_text`) and `text_convention`. `--text-encoding cp949` reads CP949 /
EUC-KR transcripts (a manifest's `text` is already text; this is for `text_path` rows, a
transcript file next to each clip, as KsponSpeech ships them). Headerless `.pcm` audio
(16-bit little-endian mono) needs `--pcm-rate` and is stored as wav (the same samples).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import multiprocessing
import os
import random
import re
import sys
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

from tqdm import tqdm

from wdx.data import conventions
from wdx.data.audio import AUDIO_EXTENSIONS, PCM, AudioDecodeError, decode_audio, pcm_to_wav
from wdx.data.conventions import PLAIN, Convention, convert, kspon_warning, looks_kspon
from wdx.data.shards import METADATA
from wdx.model.domains import DOMAINS, domains_flag

log = logging.getLogger(__name__)
REQUIRED = ("audio_path", "domain", "split")  # and `text`, or `text_path`


class ManifestError(ValueError):
    """The manifest or the output cannot be used (names the file, and the line)."""


class RowError(ManifestError):
    """One row that cannot be packed: skipped and counted under `reason`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


TRN_SEPARATOR = " :: "  # KsponSpeech_scripts/*.trn: `KsponSpeech_01/KsponSpeech_0001/KsponSpeech_000001.pcm :: text`


class ShardWriter:
    """Samples (dicts of tar members: `__key__`, `wav`, `txt`, ...) into tar files, the next one
    opened when the current holds `max_count` samples or `max_bytes` of member data.

    Plain `tarfile`, not webdataset's TarWriter (which imports torch: ~800 MB a packing
    worker does without); members get fixed metadata (mode 0444, mtime 0), so the same
    samples give the same bytes.
    """

    def __init__(self, split_dir: Path, name: Callable[[int], str], max_count: int, max_bytes: int) -> None:
        self.split_dir, self.name, self.max_count, self.max_bytes = split_dir, name, max_count, max_bytes
        self.shards: list[dict] = []  # metadata.json's entries
        self.tar: tarfile.TarFile | None = None
        self.size = 0

    def write(self, sample: dict) -> None:
        if self.tar is None or self.shards[-1]["samples"] >= self.max_count or self.size >= self.max_bytes:
            self._next()
        for ext, data in sample.items():
            if ext.startswith("__"):
                continue
            info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o444, 0
            self.tar.addfile(info, io.BytesIO(data))
            self.size += len(data)
        self.shards[-1]["samples"] += 1

    def _next(self) -> None:
        self.close()
        self.shards.append({"filename": self.name(len(self.shards)), "samples": 0})
        self.split_dir.mkdir(parents=True, exist_ok=True)
        path = self.split_dir / self.shards[-1]["filename"]
        self.tar, self.size = tarfile.open(path, "w", format=tarfile.GNU_FORMAT), 0

    def close(self) -> list[dict]:
        if self.tar is not None:
            self.tar.close()
            self.tar = None
        return self.shards


def write_metadata(split_dir: Path, shards: list[dict], domain: str | None = None,
                   convention: Convention = PLAIN) -> None:
    """metadata.json, written last (to a temporary name, then renamed): a split with one is a
    complete split. It records the `convention` the transcripts were converted under (every
    reader then must use it)."""
    meta = {"total_samples": sum(s["samples"] for s in shards), "shards": shards}
    if domain is not None:
        meta["domain"] = domain
    if convention != PLAIN:
        meta.update(text_convention=convention.name, dual_transcription=convention.dual)
    split_dir.mkdir(parents=True, exist_ok=True)
    tmp = split_dir / (METADATA + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, split_dir / METADATA)


def write_split(split_dir: str | Path, samples: Iterable[dict], *, max_count: int = 1000,
                max_bytes: int = 1 << 30, domain: str | None = None, convention: Convention = PLAIN) -> list[dict]:
    """Write samples as shards `shard_NNNNNN.tar` + metadata.json; returns the shard list.
    A shard closes when it holds `max_count` samples or `max_bytes` of member data."""
    split_dir = Path(split_dir)
    writer = ShardWriter(split_dir, lambda k: f"shard_{k:06d}.tar", max_count, max_bytes)
    for sample in samples:
        writer.write(sample)
    shards = writer.close()
    write_metadata(split_dir, shards, domain, convention)
    return shards


def read_manifest(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) for a CSV, JSONL or KsponSpeech .trn manifest (a BOM is dropped)."""
    with open(path, encoding="utf-8-sig") as f:
        if path.suffix.lower() == ".trn":
            for n, line in enumerate(f, start=1):
                if line.strip():
                    audio, sep, text = line.rstrip("\r\n").partition(TRN_SEPARATOR)
                    yield n, ({"audio_path": audio.strip(), "text": text.strip()} if sep else
                              {"__bad__": f"not 'path{TRN_SEPARATOR}text': {line.strip()[:80]!r}"})
        elif path.suffix.lower() in (".jsonl", ".json"):
            for n, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        row = {"__bad__": f"not valid JSON ({exc.msg})"}
                    yield n, row if isinstance(row, dict) else {"__bad__": f"a {type(row).__name__}, not an object"}
        else:
            for n, row in enumerate(csv.DictReader(f), start=2):
                yield n, row


class Reading(NamedTuple):
    """How the rows' transcripts and audio are read."""

    convention: Convention = PLAIN
    text_encoding: str = "utf-8"
    pcm_rate: int | None = None
    domains: tuple[str, ...] = DOMAINS
    domain: str | None = None  # for rows without one (--domain)
    split: str | None = None  # for rows without one (--split)


AS_WRITTEN = Reading()


def transcript(row: dict, where: str, base: Path, encoding: str) -> str:
    """The row's `text`, or the file `text_path` names, decoded as `encoding` (never guessed)."""
    if str(row.get("text") or "").strip():
        return str(row["text"])
    if not str(row.get("text_path") or "").strip():
        raise RowError("missing_fields", f"{where}: missing text (or text_path)")
    path = base / row["text_path"]
    try:
        return path.read_bytes().decode(encoding)
    except OSError as exc:
        raise RowError("missing_transcript", f"{where}: {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        hint = " (Korean corpora are often CP949: --text-encoding cp949)" if encoding.replace("-", "") == "utf8" else ""
        raise RowError("bad_encoding", f"{where}: {path}: not {encoding}{hint}") from None


def to_sample(row: dict, where: str, base: Path, index: int, reading: Reading = AS_WRITTEN) -> tuple[str, dict]:
    """One manifest row -> (split, tar members); a RowError says why it cannot be packed.
    The audio file is read once, and decoded to check it (what the data layer would skip)."""
    if "__bad__" in row:
        raise RowError("bad_line", f"{where}: {row['__bad__']}")
    row = {**row, "domain": row.get("domain") or reading.domain, "split": row.get("split") or reading.split}
    missing = [k for k in REQUIRED if not str(row.get(k) or "").strip()]
    if missing:
        raise RowError("missing_fields", f"{where}: missing {', '.join(missing)}")
    audio = base / row["audio_path"]
    ext = audio.suffix.lower().lstrip(".")
    if ext not in (*AUDIO_EXTENSIONS, PCM):
        raise RowError("unsupported_audio", f"{where}: {audio.name}: unsupported format .{ext} "
                       f"(expected {', '.join(AUDIO_EXTENSIONS)}, or pcm with --pcm-rate)")
    if ext == PCM and not reading.pcm_rate:
        raise RowError("pcm_without_rate", f"{where}: {audio.name}: headerless .pcm: state its sample rate with "
                       "--pcm-rate (KsponSpeech: 16000)")
    if row["domain"] not in reading.domains:
        raise RowError("unknown_domain", f"{where}: unknown domain {row['domain']!r} (expected "
                       f"{', '.join(reading.domains)}; --domains names others)")
    written = transcript(row, where, base, reading.text_encoding)
    converted = convert(written, reading.convention)
    if converted.problem or not converted.text:
        state = "empty" if not converted.text else f"still marked up ({converted.problem})"
        raise RowError("empty_transcript" if not converted.text else converted.problem,
                       f"{where}: transcript {written.strip()[:80]!r} is {state} under --text-convention "
                       f"{reading.convention.name}")
    try:
        data = audio.read_bytes()
        if ext == PCM:
            data, ext = pcm_to_wav(data, reading.pcm_rate), "wav"
        frames, _ = decode_audio(data, ext)
    except OSError as exc:
        raise RowError("missing_audio", f"{where}: {audio}: {exc.strerror}") from None
    except AudioDecodeError as exc:
        raise RowError("corrupt_audio", f"{where}: {audio}: {exc}") from None
    if frames.shape[1] == 0:
        raise RowError("empty_audio", f"{where}: {audio}: no audio samples")
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


SKIP_LOG_LIMIT = 20  # skipped rows logged one by one; all are listed in the .skipped.tsv


class Skipped:
    """Rows of `manifest` that could not be packed: counted by reason, listed with their line,
    and the verdict on the share (--max-skip-fraction) of its `total` rows."""

    def __init__(self, manifest: Path, total: int, max_fraction: float) -> None:
        self.manifest, self.total, self.max_fraction = manifest, total, max_fraction
        self.counts: Counter = Counter()
        self.rows: list[tuple[int, str, str]] = []  # (manifest line, reason, message)
        self.kspon_looking = 0  # packed rows whose plain text carries Kspon markup (warned once, at the end)

    def add(self, line: int, reason: str, message: str) -> None:
        self.counts[reason] += 1
        self.rows.append((line, reason, message))
        if len(self.rows) <= SKIP_LOG_LIMIT:
            log.warning("skipped %s", message)

    @property
    def too_many(self) -> bool:
        return len(self.rows) > self.max_fraction * self.total

    def refusal(self) -> ManifestError:
        first = min(self.rows)  # by line: rows are packed shuffled
        return ManifestError(f"{len(self.rows)} of {self.total} rows cannot be packed, more than --max-skip-fraction "
                             f"{self.max_fraction:g} ({self.summary()}); the first: {first[2]}")

    def summary(self) -> str:
        return ", ".join(f"{reason} {n}" for reason, n in sorted(self.counts.items(), key=lambda c: (-c[1], c[0])))

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write("line\treason\twhat\n")
            f.writelines(f"{self.manifest}:{line}\t{reason}\t{' '.join(message.split())}\n"
                         for line, reason, message in sorted(self.rows))


def skipped_list(manifest: Path, out: Path) -> Path:
    """Where the rows that could not be packed are listed: beside the splits."""
    return out / f"{manifest.stem}.skipped.tsv"


def pack(manifest: Path, out: Path, max_count: int, max_bytes: int, seed: int | None = 0,
         reading: Reading = AS_WRITTEN, base: Path | None = None, max_skip_fraction: float = 0.01,
         workers: int = 1) -> tuple[dict[str, list[dict]], Skipped]:
    """Pack every split named in the manifest, its rows shuffled by `seed` (None: manifest order);
    rows that cannot be packed are skipped (see the module docstring). Returns (each split's
    shard list, the skipped rows).

    Each split's shuffled rows are cut into units of `max_count`; unit u becomes
    `shard_{u:06d}.tar` (and `shard_{u:06d}_1.tar` ... past `max_bytes`), packed by one of
    `workers` processes, so the same rows land in the same shards for any worker count.
    Each audio file is read once.
    """
    base = manifest.parent if base is None else base
    by_split: dict[str, list[tuple[int, dict]]] = {}  # (line, row): what the main process holds per row
    total = 0
    for n, row in read_manifest(manifest):
        split = str(row.get("split") or reading.split or "").strip() if "__bad__" not in row else ""
        by_split.setdefault(split, []).append((n, row))
        total += 1
    skipped = Skipped(manifest, total, max_skip_fraction)
    for split in by_split:
        if split and (out / split / METADATA).exists():
            raise ManifestError(f"{out / split}: already holds a dataset; choose another output root")
    for n, row in by_split.pop("", []):  # no split to put them in: to_sample says why (and writes nothing)
        _merge(skipped, pack_unit(out, -1, [(0, n, row)], manifest, base, reading, max_bytes))
    written = {}
    with _pool(workers) as pool:
        for split, split_rows in by_split.items():
            if skipped.too_many:
                break
            if seed is not None:
                random.Random(f"{seed}-{split}").shuffle(split_rows)
            units = [(out / split, u, [(start + j, n, row) for j, (n, row) in
                                       enumerate(split_rows[start:start + max_count])], manifest, base, reading,
                      max_bytes) for u, start in enumerate(range(0, len(split_rows), max_count))]
            shards = _pack_units(pool, units, skipped, split)
            if shards:
                write_metadata(out / split, shards, convention=reading.convention)
                written[split] = shards
    if skipped.rows and written:
        skipped.write(skipped_list(manifest, out))
    if skipped.too_many:
        raise skipped.refusal()
    if skipped.kspon_looking:
        log.warning(kspon_warning(skipped.kspon_looking, skipped.total - len(skipped.rows), str(manifest)))
    return written, skipped


def _pool(workers: int):
    """Worker processes, or an in-process stand-in for one worker. forkserver: a worker starts
    from a clean process that imports wdx.pack alone (no torch), not from a fork of this one,
    whose memory (every manifest row) it would carry."""
    if workers > 1:
        return multiprocessing.get_context("forkserver").Pool(workers)
    return contextlib.nullcontext(SimpleNamespace(imap=map, terminate=lambda: None))


def _pack_units(pool, units: list[tuple], skipped: Skipped, split: str) -> list[dict]:
    """Pack the units in order of their results; stop (and delete the unfinished units' files)
    once `skipped` holds too many. Returns the shard list of the units packed."""
    shards: list[dict] = []
    done = 0
    with tqdm(total=sum(len(u[2]) for u in units), desc=f"packing {split}", unit="row") as bar:
        for result in pool.imap(_pack_unit_task, units):
            shards += _merge(skipped, result)
            done += 1
            bar.update(len(units[done - 1][2]))
            if skipped.too_many:
                pool.terminate()
                break
    for _, u, *_ in units[done:]:  # written by a worker that was stopped, or never started
        for path in units[0][0].glob(f"shard_{u:06d}*.tar"):
            path.unlink()
    return shards


def _merge(skipped: Skipped, result: tuple[list[dict], list[tuple[int, str, str]], int]) -> list[dict]:
    shards, rows, kspon_looking = result
    for row in rows:
        skipped.add(*row)
    skipped.kspon_looking += kspon_looking
    return shards


def _pack_unit_task(args: tuple) -> tuple[list[dict], list[tuple[int, str, str]], int]:
    return pack_unit(*args)  # Pool.imap passes one argument


def pack_unit(out_dir: Path, unit: int, rows: list[tuple[int, int, dict]], manifest: Path, base: Path,
              reading: Reading, max_bytes: int) -> tuple[list[dict], list[tuple[int, str, str]], int]:
    """Pack one unit of rows (index in the split, manifest line, row) into its shard files.
    Returns (shard entries, skipped rows as (line, reason, message), the count of rows whose
    plain text looks like Kspon markup)."""
    writer = ShardWriter(out_dir, lambda k: f"shard_{unit:06d}.tar" if k == 0 else f"shard_{unit:06d}_{k}.tar",
                         max_count=len(rows) + 1, max_bytes=max_bytes)
    skips, kspon_looking = [], 0
    try:
        for i, n, row in rows:
            where = f"{manifest}:{n}"
            try:
                members = to_sample(row, where, base, i, reading)[1]
            except RowError as exc:
                skips.append((n, exc.reason, str(exc)))
                continue
            if reading.convention == PLAIN:
                kspon_looking += looks_kspon(members["txt"].decode("utf-8"))
            writer.write(members)
    finally:
        shards = writer.close()
    return shards, skips, kspon_looking


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wdx.pack", description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest", type=Path, help="CSV or JSONL (audio_path, text or text_path, domain, split), "
                        "or a KsponSpeech .trn script")
    parser.add_argument("out", type=Path, help="dataset root to create (ROOT/<split>/shard_*.tar)")
    parser.add_argument("--audio-root", type=Path, help="what relative audio and transcript paths are relative to "
                        "(default: the manifest's directory; KsponSpeech: the folder holding KsponSpeech_01 ...)")
    parser.add_argument("--domain", help="domain of rows without one (a .trn has none)")
    parser.add_argument("--split", help="split of rows without one (default for a .trn: its name, train.trn: train)")
    parser.add_argument("--max-skip-fraction", type=float, default=0.01, help="stop when more than this share of "
                        "the rows cannot be packed (each is listed in OUT/<manifest>.skipped.tsv)")
    parser.add_argument("--max-samples-per-shard", type=int, default=1000, help="close a shard at this many samples")
    parser.add_argument("--max-shard-mb", type=float, default=1024, help="close a shard at this much audio+text")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle of each split's rows")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="packing processes "
                        "(default: every core this process may use); the shards are the same for any number")
    parser.add_argument("--keep-order", action="store_true", help="write rows in manifest order (no shuffle): "
                        "only for manifests already shuffled, or evaluation sets read in order")
    conventions.add_flags(parser, "converted at packing time (see wdx/data/conventions.py); a .trn implies kspon")
    parser.add_argument("--text-encoding", default="utf-8", help="encoding of text_path files (cp949 / euc-kr for "
                        "KsponSpeech); never guessed")
    parser.add_argument("--domains", type=domains_flag, default=DOMAINS, help="the domains rows may name, "
                        "comma-separated (as train_loop.py --domains)")
    parser.add_argument("--pcm-rate", type=int, help="sample rate of headerless 16-bit .pcm audio (KsponSpeech: 16000; "
                        "a .trn implies it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        "".encode(args.text_encoding)
    except LookupError:
        parser.error(f"--text-encoding {args.text_encoding}: unknown encoding")
    if not 0 <= args.max_skip_fraction <= 1:
        parser.error(f"--max-skip-fraction {args.max_skip_fraction}: between 0 and 1")
    trn = args.manifest.suffix.lower() == ".trn"
    args.text_convention = args.text_convention or ("kspon" if trn else PLAIN.name)
    split = args.split or (args.manifest.stem if trn else None)
    reading = Reading(conventions.from_args(args), args.text_encoding, args.pcm_rate or (16000 if trn else None),
                      args.domains, args.domain, split)
    try:
        written, skipped = pack(args.manifest, args.out, args.max_samples_per_shard, int(args.max_shard_mb * 2**20),
                                None if args.keep_order else args.seed, reading, args.audio_root,
                                args.max_skip_fraction, max(1, args.workers))
    except (ManifestError, OSError) as exc:
        print(f"wdx.pack: error: {exc}", file=sys.stderr)
        return 1
    for name, shards in written.items():
        log.info("%s: %d samples in %d shards", args.out / name, sum(s["samples"] for s in shards), len(shards))
    if skipped.rows:
        log.info("skipped %d of %d rows: %s (listed in %s)", len(skipped.rows), skipped.total, skipped.summary(),
                 skipped_list(args.manifest, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
