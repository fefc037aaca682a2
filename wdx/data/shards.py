"""A split on disk or behind a URL: its shard URLs, their sample counts and its domain.

Layout (docs/data.md):
    ROOT/<split>/shard_000000.tar ...  ROOT/<split>/metadata.json
    metadata.json: {"total_samples": N, "shards": [{"filename": ..., "samples": n}, ...],
                    "domain": "normal"}   # "domain" optional: the split's default
"""

from __future__ import annotations

import json
import logging
import os
import unicodedata
from dataclasses import dataclass
from typing import IO

from wdx.data.conventions import PLAIN, Convention
from wdx.model.domains import DOMAINS

log = logging.getLogger(__name__)

METADATA = "metadata.json"


class DatasetError(ValueError):
    """The dataset on disk does not match the documented format (one line, names the file)."""


@dataclass(frozen=True)
class Split:
    """What a split holds according to its metadata (or the fallback count)."""

    name: str
    urls: tuple[str, ...]
    counts: tuple[int, ...]  # samples per shard, in `urls` order
    domain: str | None  # the split-level default domain, if metadata.json names one
    files: tuple[str, ...] = ()  # the shards' names as metadata.json lists them (relative paths), in `urls` order
    convention: Convention | None = None  # what wdx.pack converted the transcripts under, if it did

    @property
    def total(self) -> int:
        return sum(self.counts)


def is_url(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def join(root: str, *parts: str) -> str:
    """Join path parts for local dirs and URLs alike (`pipe:` URLs are templates: see docs/data.md)."""
    if root.startswith("pipe:"):
        raise DatasetError(f"--dataset-root {root!r}: a pipe: root must contain '{{}}' for the file path")
    if is_url(root):
        return "/".join([root.rstrip("/"), *parts])
    return os.path.join(root, *parts)


def open_url(url: str) -> IO[bytes]:
    """Open a local path or any URL that WebDataset's gopen or fsspec understands."""
    import webdataset as wds  # here: it imports torch, which wdx.pack's workers do without

    scheme = url.split(":", 1)[0] if is_url(url) else ""
    if not scheme or scheme in wds.gopen_schemes or scheme == "file":
        return wds.gopen(url, "rb")
    try:  # s3://, gcs://, az:// ...: needs fsspec and the matching backend (s3fs, gcsfs, adlfs)
        import fsspec

        return fsspec.open(url, "rb").open()
    except ImportError as exc:
        raise DatasetError(f"{url}: reading {scheme}:// needs a package that is not installed ({exc.msg}); "
                           f"install fsspec and its {scheme} backend") from None
    except ValueError as exc:  # fsspec: "Protocol not known"
        raise DatasetError(f"{url}: {exc}") from None


def _read_metadata(url: str) -> dict | None:
    try:
        with open_url(url) as f:
            raw = f.read()
    except (FileNotFoundError, OSError):
        return None
    if not raw:
        return None  # pipe: URLs report a missing file as an empty stream
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{url}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("shards"), list):
        raise DatasetError(f'{url}: expected {{"total_samples": N, "shards": [{{"filename": ..., "samples": n}}]}}')
    return meta


def _parse_shards(meta: dict, url: str) -> tuple[list[str], list[int]]:
    names, counts = [], []
    for i, entry in enumerate(meta["shards"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            raise DatasetError(f"{url}: shards[{i}] has no 'filename'")
        if entry["filename"] in names:
            raise DatasetError(f"{url}: shards[{i}] ({entry['filename']}) is listed twice; its samples would be "
                               "trained twice per epoch")
        n = entry.get("samples")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise DatasetError(f"{url}: shards[{i}] ({entry['filename']}) has no valid 'samples' count")
        names.append(entry["filename"])
        counts.append(n)
    total = meta.get("total_samples")
    if total is not None and total != sum(counts):
        log.warning("%s: total_samples=%s but the shards' counts add up to %d; using %d",
                    url, total, sum(counts), sum(counts))
    return names, counts


def _list_local_shards(split_dir: str) -> list[str]:
    if not os.path.isdir(split_dir):
        raise DatasetError(f"{split_dir}: split directory not found")
    return sorted(f for f in os.listdir(split_dir) if f.endswith(".tar"))


def _shard_url(root: str, split: str, name: str) -> str:
    if root.startswith("pipe:"):
        if "{}" not in root:
            raise DatasetError(f"--dataset-root {root!r}: a pipe: root must contain '{{}}' where the file path goes "
                               "(e.g. 'pipe:aws s3 cp s3://bucket/data/{} -')")
        try:
            return root.format(f"{split}/{name}")
        except (IndexError, KeyError, ValueError):
            raise DatasetError(f"--dataset-root {root!r}: a pipe: root takes exactly one '{{}}' for the file path; "
                               "write other braces as '{{' and '}}'") from None
    return join(root, split, name)


def _as_stored(split_dir: str, name: str) -> str:
    """A listed shard name as the file system spells it: a Korean name written in NFC by one tool
    and stored in NFD by another (macOS, some archivers) is the same shard."""
    if os.path.isfile(os.path.join(split_dir, name)):
        return name
    head, base = os.path.split(name)
    folder = os.path.join(split_dir, head)
    if os.path.isdir(folder):
        for entry in os.listdir(folder):
            if unicodedata.normalize("NFC", entry) == unicodedata.normalize("NFC", base):
                log.info("%s: listed as %r, stored as %r (another Unicode normalisation); reading it", split_dir,
                         name, os.path.join(head, entry))
                return os.path.join(head, entry)
    return name


def recorded_convention(meta: dict | None) -> Convention | None:
    """The convention wdx.pack converted a split's transcripts under (None: as written)."""
    if not meta or meta.get("text_convention", PLAIN.name) == PLAIN.name:
        return None
    return Convention(meta["text_convention"], meta.get("dual_transcription", PLAIN.dual))


def split_convention(root: str, split: str) -> Convention | None:
    """`recorded_convention` of ROOT/split/metadata.json (None where there is none)."""
    return recorded_convention(_read_metadata(_shard_url(root, split, METADATA)))


def check_convention(meta: dict, url: str, convention: Convention | None) -> None:
    """Refuse to read a split packed under one convention as if written under another: the
    run records its convention (train_config.json, the model card, the encoder cache), and a
    kspon split's dual side was chosen at packing time; training another would be a silent lie."""
    packed = recorded_convention(meta)
    if convention is None or packed is None or packed == convention:
        return
    raise DatasetError(f"{url}: packed with --text-convention {packed.name} --dual-transcription {packed.dual} "
                       f"(converted then); this run reads it with --text-convention {convention.name}"
                       + (f" --dual-transcription {convention.dual}" if convention.name != PLAIN.name else "")
                       + ": pass the packing's flags, or pack the corpus again with this run's")


def load_split(root: str, split: str, samples_per_shard: int | None = None,
               domains: tuple[str, ...] | None = DOMAINS, convention: Convention | None = None) -> Split:
    """Read `ROOT/split/metadata.json`; without one, count `samples_per_shard` per listed shard.
    A split-wide `domain` must be one of `domains` (the run's); a split converted at packing
    time (wdx.pack --text-convention kspon records it) must be read under that `convention`."""
    meta_url = _shard_url(root, split, METADATA)
    meta = _read_metadata(meta_url)
    domain = None
    if meta is not None:
        check_convention(meta, meta_url, convention)
        names, counts = _parse_shards(meta, meta_url)
        domain = meta.get("domain")
        if domain is not None and domains is not None and domain not in domains:
            raise DatasetError(f"{meta_url}: unknown domain {domain!r} (expected one of {', '.join(domains)}; "
                               "train_loop.py --domains names a run's)")
    else:
        if is_url(root):
            raise DatasetError(f"{meta_url}: not found (a URL root needs metadata.json to list its shards)")
        names = _list_local_shards(os.path.join(root, split))
        if not samples_per_shard:
            raise DatasetError(f"{meta_url}: not found; pass --samples-per-shard to count shards without it")
        log.warning("%s: not found; assuming %d samples in each of %d shards", meta_url, samples_per_shard,
                    len(names))
        counts = [samples_per_shard] * len(names)
    if not names:
        raise DatasetError(f"{_shard_url(root, split, '')}: no shards")
    if not is_url(root):
        names = [_as_stored(os.path.join(root, split), n) for n in names]
        missing = [n for n in names if not os.path.isfile(os.path.join(root, split, n))]
        if missing:
            raise DatasetError(f"{os.path.join(root, split, missing[0])}: listed in {METADATA} but missing"
                               + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        unlisted = sorted(set(_list_local_shards(os.path.join(root, split))) - set(names))
        if meta is not None and unlisted:
            log.warning("%s: %d .tar file(s) in the split are not listed in %s and will not be read: %s",
                        os.path.join(root, split), len(unlisted), METADATA,
                        ", ".join(unlisted[:5]) + (" ..." if len(unlisted) > 5 else ""))
    urls = tuple(_shard_url(root, split, n) for n in names)
    return Split(name=split, urls=urls, counts=tuple(counts), domain=domain, files=tuple(names),
                 convention=recorded_convention(meta))
