"""The WebDataset pipeline: shards -> decoded, resampled, labelled samples -> batches.

Stages, in order (each a plain generator, testable alone):
    read_slot      raw tar samples of this slot's range from several open shards at once
                   (interleaved, so batches mix shards), skipping before any decoding
    block_shuffle  seeded shuffle in fixed blocks, so a position can be resumed exactly
    decode         bytes -> mono float32 at the target rate, text, domain
    tokenize       label ids (optional), dropping transcripts the decoder cannot hold
    batch          fixed batch sizes (train) or everything once (eval)

Only `read_slot`, `decode` and `tokenize` may drop samples, and only through `Skips`, which counts
them by reason; each batch carries the counts since the previous batch so the main process
can report them for the whole run, workers and ranks included.
"""

from __future__ import annotations

import functools
import heapq
import json
import logging
import math
import multiprocessing as mp
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import webdataset as wds
from webdataset.tariterators import base_plus_ext, tar_file_expander

from wdx.data.audio import (
    AUDIO_EXTENSIONS,
    PCM,
    AudioDecodeError,
    decode_audio,
    decode_pcm,
    resample,
    to_mono,
    unusable,
)
from wdx.data.conventions import PLAIN, Convention, convert
from wdx.data.sharding import batch_sizes, shard_order, slot_bounds, slot_segments
from wdx.data.shards import DatasetError, Split, open_url
from wdx.model.domains import AGGREGATE, DOMAINS

log = logging.getLogger(__name__)

MAX_SECONDS = 30.0  # Whisper's encoder sees exactly 30 s; longer audio cannot be trained on
MIN_SECONDS = 0.1  # shorter audio cannot hold a spoken word
MIN_RATE, MAX_RATE = 1000, 384000  # Hz a headerless .pcm may declare
MAX_CHARS_PER_SECOND = 25  # 3x fast Korean speech: more characters than this per second cannot be in the audio
SKIP_LOG_LIMIT = 20  # per reason and process: the first few are logged with shard and key


class Skips:
    """The one place samples are dropped: counted by reason, the first few logged.

    `give_up_after` skips in a row end the stream with an error: a training slot reads its
    range in a loop, and a range with no usable sample would otherwise spin forever.
    """

    def __init__(self, give_up_after: int | None = None) -> None:
        self.counts: Counter[str] = Counter()
        self.give_up_after, self.in_a_row = give_up_after, 0

    def skip(self, reason: str, shard: str, key: str, detail: str = "", counted: bool = True) -> None:
        """`counted=False`: a sample read again to refill a slot's batches, already counted this epoch."""
        if counted:
            self.counts[reason] += 1
        self.in_a_row += 1
        if counted and self.counts[reason] <= SKIP_LOG_LIMIT:
            log.warning("skipped %s/%s: %s%s", shard, key, reason, f" ({detail})" if detail else "")
        if self.give_up_after is not None and self.in_a_row > self.give_up_after:
            raise DatasetError(f"{shard}/{key}: {self.in_a_row} samples in a row unusable "
                               f"(last: {reason}); see the skip log above")

    def record(self, verdict: str, shard: str, key: str, counted: bool = True) -> None:
        """Skip with a stage's verdict, written "reason: detail"."""
        reason, _, detail = verdict.partition(":")
        self.skip(reason, shard, key, detail.strip(), counted)

    def passed(self) -> None:
        """A sample made it through every skipping stage."""
        self.in_a_row = 0

    def take(self) -> dict[str, int]:
        """Counts since the last call (attached to each batch)."""
        out, self.counts = dict(self.counts), Counter()
        return out


MAX_DOMAIN_SKIP_SHARE = 0.05  # of an epoch's (or an evaluation's) samples: more is a labelling error, not noise
DOMAIN_SKIPS = ("unknown_domain", "no_domain")


def check_domain_skips(split: str, skips: dict[str, int], samples: int) -> None:
    """Refuse a split whose samples name domains the model does not know (or none) above
    MAX_DOMAIN_SKIP_SHARE: a corpus labelled with other names would otherwise train on the
    few samples left, or on nothing, and exit 0."""
    bad = sum(skips.get(r, 0) for r in DOMAIN_SKIPS)
    if samples and bad > MAX_DOMAIN_SKIP_SHARE * samples:
        detail = ", ".join(f"{r} {skips[r]}" for r in DOMAIN_SKIPS if skips.get(r))
        raise DatasetError(f"{split}: {bad} of {samples} samples skipped for their domain ({detail}; the log names "
                           f"the first ones): more than {MAX_DOMAIN_SKIP_SHARE:.0%}. Name every domain in --domains, "
                           "or fix the samples' domain (or the split's, or --default-domain)")


class Recount:
    """A `Skips` for a refill pass: the same give-up rule, no second count of what the first pass counted."""

    def __init__(self, skips: Skips) -> None:
        self.skips = skips

    def skip(self, reason: str, shard: str, key: str, detail: str = "") -> None:
        self.skips.skip(reason, shard, key, detail, counted=False)

    def record(self, verdict: str, shard: str, key: str) -> None:
        self.skips.record(verdict, shard, key, counted=False)


@dataclass(frozen=True)
class Position:
    """Where a slot's stream stands: `batches` batches done, item `offset` of shuffle
    block `block` is next. Each training batch carries the position after it."""

    batches: int = 0
    block: int = 0
    offset: int = 0


def shard_name(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def iter_shard(url: str) -> Iterator[dict]:
    """Raw samples (dicts of member bytes by extension) of one tar shard, in tar order."""
    stream = open_url(url)
    try:
        yield from group_members(tar_file_expander([{"url": url, "stream": stream}], eof_value=None), url)
    finally:
        stream.close()


MEMBER_TYPES = {*AUDIO_EXTENSIONS, PCM, "txt", "json", "domain", "states", "skip"}  # what a sample's members are


def split_member_name(name: str) -> tuple[str | None, str | None]:
    """A tar member name -> (sample key, extension).

    webdataset cuts at the first dot of the file name, which makes `spk.01.utt.wav` the key
    `spk` with extension `01.utt.wav`; here a name whose last extension is one of this
    format's member types is cut at its last dot instead (key `spk.01.utt`).
    """
    stem, dot, ext = name.rpartition(".")
    if dot and stem and "/" not in ext and ext.lower() in MEMBER_TYPES:
        return stem, ext
    return base_plus_ext(name)


def group_members(files: Iterable[dict], url: str) -> Iterator[dict]:
    """Tar members -> samples, as webdataset's group_by_keys does, except for duplicates.

    group_by_keys raises on a sample with two members of one extension (`a.wav` + `a.WAV`),
    which ends the shard: every later sample would be lost. Here such a sample is marked
    `__skip__` and counted as one skip, and the shard goes on. Members of a key that comes
    back after other samples (members not adjacent in the tar) form an `__extra__` record:
    it takes no sample position (metadata.json counts samples, not runs of members), so
    nothing after it shifts, and it is counted as the skip `non_adjacent_members`.

    A json named with a dot in its extension (`0001.meta.json` beside `0001.wav`, webdataset's
    way of naming it) belongs to the sample `0001`, whichever of the two comes first in the tar.
    """
    seen: set[str] = set()
    current: dict | None = None
    for member in files:
        key, ext = split_member_name(member["fname"])
        if key is None:
            continue  # a member without an extension (e.g. a directory entry)
        ext = ext.lower()
        if current is not None and key != current["__key__"]:
            key, ext = _join_dotted_json(current, key, ext)
            seen.add(current["__key__"])
        if current is None or key != current["__key__"]:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": url}
            if key in seen:
                current["__extra__"] = True
                current["__skip__"] = ("non_adjacent_members: more members of this key after other samples "
                                       "(its sample was read without them); write each sample's members together")
            seen.add(key)
        if ext in current:
            current["__skip__"] = f"duplicate_key: two .{ext} members"
        else:
            current[ext] = member["data"]
    if current is not None:
        yield current


def _join_dotted_json(current: dict, key: str, ext: str) -> tuple[str, str]:
    """(key, ext) of a member next to the sample being grouped: `K.meta` + json after sample K
    joins it as `meta.json`; sample K arriving after a record `K.meta` that holds only a json
    takes that record over (renamed in place)."""
    held = current["__key__"]
    if ext == "json" and key.startswith(held + "."):
        return held, f"{key[len(held) + 1:]}.json"
    members = [k for k in current if not k.startswith("__")]
    if held.startswith(key + ".") and members == ["json"] and "__extra__" not in current:
        current[f"{held[len(key) + 1:]}.json"] = current.pop("json")
        current["__key__"] = key
    return key, ext


def first_transcripts(split: Split, limit: int) -> list[str]:
    """Up to `limit` transcripts from the split's first shards, read without decoding audio:
    a look at how the corpus is written before anything trains on it."""
    out: list[str] = []
    for url in split.urls:
        try:
            for sample in iter_shard(url):
                if "txt" in sample:
                    out.append(sample["txt"].decode("utf-8-sig", "replace"))
                if len(out) >= limit:
                    return out
        except (tarfile.TarError, OSError, EOFError, ValueError):
            continue  # the loader counts a broken shard; this is only a look
    return out


def stream_length(length: int, lanes: int) -> int:
    """Stream indices per pass over a slot of `length` samples read through `lanes` lanes."""
    return lanes * math.ceil(length / lanes)


def read_slot(split: Split, segments: list, length: int, first: int, skips: Skips, repeat: bool,
              lanes: int = 1) -> Iterator[tuple[int, dict]]:
    """Yield (stream index, raw sample) for the slot's samples, from stream index `first` on.

    The slot's range is cut into `lanes` contiguous parts read side by side, one open shard
    each: sample t of lane j has stream index t * lanes + j, so consecutive indices (and the
    shuffle blocks made of them) hold samples of `lanes` different parts of the range. Real
    corpora are often written speaker by speaker or domain by domain; one lane would make
    every batch single-speaker. Indices count plan positions, not yielded samples, so a
    short or broken shard never shifts the positions after it. With `repeat`, the range is
    read again and again (index keeps growing by `stream_length` a pass), which lets a
    training slot that lost samples still fill its batches.
    """
    period = stream_length(length, lanes)
    parts = [cut_segments(segments, j * length // lanes, (j + 1) * length // lanes) for j in range(lanes)]
    for n_pass in range(first // period, 2**62 if repeat else 1):
        base = n_pass * period
        start = max(0, first - base)
        # a pass after the first refills a slot that lost samples: what it skips was counted this epoch
        pass_skips = skips if n_pass == 0 else Recount(skips)
        streams = [((base + t * lanes + j, _mark(sample, n_pass)) for t, sample in
                    read_segments(split, part, max(0, -(-(start - j) // lanes)), pass_skips))
                   for j, part in enumerate(parts)]
        yielded = 0
        for index, sample in heapq.merge(*streams, key=lambda item: item[0]):
            yielded += 1
            yield index, sample
        if yielded == 0 and n_pass > first // period:
            raise DatasetError(f"{split.name}: a slot's shards yielded no samples at all "
                               f"({', '.join(shard_name(split.urls[s.shard]) for s in segments)})")


def _mark(sample: dict, n_pass: int) -> dict:
    if n_pass:
        sample["__refill__"] = True
    return sample


def cut_segments(segments: list, lo: int, hi: int) -> list:
    """The part [lo, hi) of a slot's range (positions counted from the range's start), as segments."""
    out = []
    for offset, seg in _segment_offsets(segments):
        a, b = max(lo, offset), min(hi, offset + seg.stop - seg.start)
        if a < b:
            out.append(type(seg)(seg.shard, seg.start + a - offset, seg.start + b - offset))
    return out


def read_segments(split: Split, segments: list, first: int, skips: Skips,
                  extras: list | None = None) -> Iterator[tuple[int, dict]]:
    """(position within `segments`, raw sample) from position `first` on, one shard open at a time.
    `extras` (the encoder cache's build) collects each counted `__extra__` record in tar order,
    so that the cache can hold it where the source does and count it again each epoch."""
    for seg_base, seg in _segment_offsets(segments):
        if seg_base + (seg.stop - seg.start) <= first:
            continue  # whole segment before the resume point: not even opened
        url, declared = split.urls[seg.shard], split.counts[seg.shard]
        seen, i = 0, -1
        try:
            for sample in iter_shard(url):
                if "__extra__" in sample:  # belongs to sample i: counted where sample i is read
                    if seg.start <= i < seg.stop and seg_base + i - seg.start >= first:
                        skips.record(sample["__skip__"], shard_name(url), sample["__key__"])
                        if extras is not None:
                            extras.append(sample)
                    continue
                i += 1
                if i >= seg.stop:
                    if seg.stop == declared:
                        skips.skip("count_mismatch", shard_name(url), sample["__key__"],
                                   f"more samples than the {declared} metadata.json says; the rest are not read")
                    break
                seen = i + 1
                position = seg_base + i - seg.start
                if i < seg.start or position < first:
                    continue  # skipped before decoding
                yield position, sample
            else:
                if seg.start <= seen < seg.stop:  # counted once: by the segment where the shard falls short
                    skips.skip("count_mismatch", shard_name(url), "-", f"ended after {seen} samples; "
                               f"metadata.json says {declared}")
        except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
            skips.skip("corrupt_shard", shard_name(url), "-", f"rest of shard unreadable: {_first_arg(exc)}")


def _first_arg(exc: Exception) -> str:
    # webdataset appends the stream and URL to exception args; the first arg is the message
    return str(exc.args[0]).split(" @ ")[0] if exc.args else type(exc).__name__


def _segment_offsets(segments: list) -> Iterator[tuple[int, object]]:
    offset = 0
    for seg in segments:
        yield offset, seg
        offset += seg.stop - seg.start


def block_of(index: int, length: int, block: int) -> int:
    """The shuffle block of stream index `index`; blocks never straddle two passes."""
    per_pass = math.ceil(length / block)
    return (index // length) * per_pass + (index % length) // block


def block_start(b: int, length: int, block: int) -> int:
    """The first stream index of block `b` (inverse of `block_of`)."""
    per_pass = math.ceil(length / block)
    return (b // per_pass) * length + (b % per_pass) * block


def block_shuffle(src: Iterable[tuple[int, dict]], length: int, block: int, seed: str,
                  start: Position) -> Iterator[tuple[tuple[int, int], dict]]:
    """Shuffle within consecutive blocks of `block` stream indices.

    A rolling buffer would make the order after a resume depend on what was in the buffer
    when the run died; fixed blocks shuffled with a seed derived from the block number can
    be replayed from any (block, offset). Blocks hold raw bytes, so nothing is decoded for
    samples that are skipped on resume.
    """
    def flush(b: int, items: list) -> Iterator[tuple[tuple[int, int], dict]]:
        if block > 1:
            random.Random(f"{seed}-{b}").shuffle(items)
        for j, sample in enumerate(items):
            if (b, j) >= (start.block, start.offset):
                yield (b, j), sample

    current, items = start.block, []
    for index, sample in src:
        b = block_of(index, length, block)
        if b != current and items:
            yield from flush(current, items)
            items = []
        current = b
        items.append(sample)
    if items:
        yield from flush(current, items)


def decode(src: Iterable[tuple[tuple[int, int], dict]], decode_one: Callable[[dict], dict | str],
           skips: Skips) -> Iterator[dict]:
    """Raw member bytes -> {audio (or states), text, domain, key, shard, duration, pos}; bad samples skipped.
    `decode_one` is `decode_sample` with the split's settings, or the encoder cache's reader."""
    for pos, raw in src:
        shard, key = shard_name(raw.get("__url__", "?")), raw["__key__"]
        result = decode_one(raw)
        if isinstance(result, str):
            skips.record(result, shard, key, counted="__refill__" not in raw)
            continue
        result.update(key=key, shard=shard, pos=pos, refill="__refill__" in raw)
        yield result


def decode_sample(raw: dict, *, target_sr: int | None, split_domain: str | None,
                  default_domain: str | None, convention: Convention = PLAIN,
                  domains: tuple[str, ...] | None = DOMAINS) -> dict | str:
    """Decode one raw sample, or return the skip reason ("reason: detail").

    `target_sr=None` keeps the source rate (for `wdx.inspect`, which only measures). The
    transcript is read under its corpus `convention` (wdx.data.conventions); `fluent` is its form
    without fillers and marked repetitions (json `fluent_text`, written by wdx.pack, or the
    conversion's), None when it equals the text.
    """
    if "__skip__" in raw:
        return raw["__skip__"]
    audio = [e for e in (*AUDIO_EXTENSIONS, PCM) if e in raw]
    if len(audio) > 1:
        return f"ambiguous_audio: .{' and .'.join(audio)} members; which one the transcript belongs to is unknown"
    ext = audio[0] if audio else None
    if ext is None:
        members = [k for k in raw if not k.startswith("__") and k not in ("txt", "json", "domain")]
        return (f"unsupported_audio: .{', .'.join(members)} (expected {', '.join(AUDIO_EXTENSIONS)})" if members
                else "no_audio")
    if "txt" not in raw:
        return "no_transcript"
    try:
        written = raw["txt"].decode("utf-8-sig")
    except UnicodeDecodeError:
        return "bad_transcript_encoding: not UTF-8 (python -m wdx.pack --text-encoding cp949 decodes CP949)"
    converted = convert(written, convention)
    if converted.problem:
        return f"{converted.problem}: {written.strip()[:80]!r} under --text-convention {convention.name}"
    text = converted.text
    if not text:
        return "empty_transcript"
    meta = sample_meta(raw)
    if isinstance(meta, str):
        return meta
    domain = resolve_domain(raw, meta, split_domain, default_domain)
    if domain is None or domain == AGGREGATE or (domains is not None and domain not in domains):  # None: any
        return f"{'no_domain' if domain is None else 'unknown_domain'}: {domain!r}"
    try:
        if ext == PCM:
            rate = pcm_rate(meta.get("sample_rate"))
            if isinstance(rate, str):
                return rate
            frames, rate = decode_pcm(raw[ext], rate)
        else:
            frames, rate = decode_audio(raw[ext], ext)
    except AudioDecodeError as exc:
        return f"corrupt_audio: {exc}"
    if frames.shape[1] == 0:
        return "empty_audio"
    duration = frames.shape[1] / rate
    if duration > MAX_SECONDS:
        return f"too_long: {duration:.1f} s"
    chars = len(text.replace(" ", ""))
    if duration < max(MIN_SECONDS, chars / MAX_CHARS_PER_SECOND):
        return f"too_short: {duration:.3f} s of audio for {chars} characters"
    wave = to_mono(frames)
    problem = unusable(wave)
    if problem:
        return problem
    audio = wave if target_sr is None else resample(wave, rate, target_sr)
    # converted here, or by wdx.pack (a hand-made json may hold anything under these names: only the right types)
    marks = dict(converted.marks) or (meta["marks"] if isinstance(meta.get("marks"), dict) else {})
    raw_text = meta["raw_text"] if isinstance(meta.get("raw_text"), str) and meta["raw_text"] else written.strip()
    return dict(audio=audio, text=text, domain=domain, duration=duration, format=ext, sample_rate=rate,
                channels=frames.shape[0], target=clean_target(meta.get(TARGET_FIELD), convention),
                fluent=converted.fluent_form(clean_target(meta.get(FLUENT_FIELD))), marks=marks,
                raw_text=raw_text if marks else None, speaker=speaker_of(meta))


FLUENT_FIELD = "fluent_text"  # the transcript without fillers and marked repetitions (wdx.pack --text-convention)
TARGET_FIELD = "target_text"  # the sample json's text the reader was asked to read (misread-word fidelity)


def speaker_of(meta: dict) -> str | None:
    """The sample json's `speaker` (a name or an id), which the metrics resample by; None without one."""
    value = meta.get("speaker")
    return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value) else None


def clean_target(value, convention: Convention = PLAIN) -> str | None:
    """A `target_text` value under the transcripts' own convention (kspon's dual transcriptions
    on the same side), so that a misread is never a difference of conventions; None when
    absent, empty or not a string."""
    return (convert(value, convention).text or None) if isinstance(value, str) else None


def sample_meta(raw: dict) -> dict | str:
    """The sample's json object ({} without one), or the skip verdict "bad_sample_json: ...".

    Read (and refused) before anything uses it, whatever else the sample holds: falling back
    to the split's domain would train a dyslexic reader's clip as a typical one. The json is
    the `json` member, or a single dotted one (`KEY.meta.json`); UTF-8 with or without a BOM,
    as transcripts are read.
    """
    names = ["json"] if "json" in raw else [k for k in raw if k.endswith(".json")]
    if not names:
        return {}
    if len(names) > 1:
        return f"bad_sample_json: {len(names)} json members ({', '.join(sorted(names))}); which one holds the fields?"
    try:
        meta = json.loads(raw[names[0]].decode("utf-8-sig"))
    except UnicodeDecodeError:
        return "bad_sample_json: not UTF-8"
    except json.JSONDecodeError as exc:
        return f"bad_sample_json: {exc}"
    if not isinstance(meta, dict):
        return f"bad_sample_json: a {type(meta).__name__}, not an object"
    return meta


def resolve_domain(raw: dict, meta: dict, split_domain: str | None, default_domain: str | None) -> str | None:
    """Sample (`domain` member or json "domain") -> split's metadata.json -> --default-domain."""
    if "domain" in raw:
        return raw["domain"].decode("utf-8-sig", "replace").strip()
    if meta.get("domain") is not None:
        return str(meta["domain"])
    return split_domain or default_domain


def pcm_rate(value) -> int | str:
    """A headerless .pcm's rate from the sample json (an integral number of Hz), or the skip verdict."""
    if value is None:
        return ("pcm_without_rate: a headerless .pcm needs the sample json's sample_rate "
                "(python -m wdx.pack --pcm-rate writes it as wav)")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not MIN_RATE <= value <= MAX_RATE \
            or value != int(value):
        return f"pcm_bad_rate: sample_rate {value!r} in the sample json (whole Hz, {MIN_RATE} to {MAX_RATE})"
    return int(value)


def batched(src: Iterable[dict], sizes: list[int] | None, batch_size: int, collate: Callable,
            skips: Skips, done: int = 0) -> Iterator[dict]:
    """Group samples into batches: exactly `sizes` when given (train), else all, by `batch_size`.

    Each batch carries the skip counts since the previous one and, for resuming, the
    stream position just after its last sample. Skips after an evaluation slot's last
    sample come in a final batch with no samples (`"empty": True`).
    """
    src = iter(src)
    plan = iter(sizes) if sizes is not None else iter(lambda: batch_size, None)
    for k, size in enumerate(plan, start=done + 1):
        samples = [s for _, s in zip(range(size), src)]
        if not samples:
            if skips.counts:  # skips after the last sample: an empty batch carries them
                yield {"skips": skips.take(), "empty": True}
            return
        batch = collate(samples)
        batch["skips"] = skips.take()
        block, offset = samples[-1]["pos"]
        batch["resume"] = Position(k, block, offset + 1)
        yield batch


def pad_audio(samples: list[dict]) -> torch.Tensor:
    """[batch, longest] zero-padded audio.

    Padding to the full 30 s happens in `features.log_mel`, on the training device, so
    the workers and the host-to-device copy move only the real audio.
    """
    audio = torch.zeros(len(samples), max(len(s["audio"]) for s in samples))
    for i, s in enumerate(samples):
        audio[i, : len(s["audio"])] = torch.from_numpy(s["audio"])
    return audio


def default_collate(samples: list[dict]) -> dict:
    """Padded audio plus the per-sample fields as lists (the trainer uses collate.Collator)."""
    return dict(audio=pad_audio(samples), **{k: [s[k] for s in samples] for k in ("text", "domain", "key", "duration")})


def tokenize(src: Iterable[dict], encode_text: Callable[[str], list[int] | str] | None,
             skips: Skips) -> Iterator[dict]:
    """Add label ids; a transcript the decoder cannot hold is skipped (`encode_text` says why)."""
    for sample in src:
        if encode_text is not None:
            ids = encode_text(sample["text"])
            if isinstance(ids, str):
                skips.record(ids, sample["shard"], sample["key"], counted=not sample.get("refill"))
                continue
            sample["ids"] = ids
        skips.passed()
        yield sample


class ShardedSamples(torch.utils.data.IterableDataset):
    """One split's batches for one rank; each loader worker reads its own slot.

    Epoch and resume positions live in shared memory so that persistent workers see them.
    """

    def __init__(self, split: Split, *, rank: int, world_size: int, num_workers: int, batch_size: int,
                 train: bool, seed: int, target_sr: int, default_domain: str | None,
                 shuffle_block: int, convention: Convention = PLAIN, domains: tuple[str, ...] | None = DOMAINS,
                 open_shards: int = 1,
                 collate: Callable = default_collate, augment: Callable[[dict, int], dict] | None = None,
                 encode_text: Callable[[str], list[int] | str] | None = None,
                 read_sample: Callable[[dict], dict | str] | None = None) -> None:
        self.split, self.rank, self.world_size = split, rank, world_size
        self.workers = max(1, num_workers)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.shuffle_block = shuffle_block if train else 1
        self.lanes = open_shards if train else 1  # evaluation order does not matter
        self.collate, self.encode_text = collate, encode_text
        self.augment = augment if train else None  # evaluation is never augmented
        # raw tar sample -> decoded sample or skip verdict: the audio decoder, or the encoder cache's reader
        self.read_sample = read_sample or functools.partial(decode_sample, target_sr=target_sr,
                                                            split_domain=split.domain, default_domain=default_domain,
                                                            convention=convention, domains=domains)
        self._epoch = mp.Value("q", 0, lock=False)
        self._start = mp.Array("q", [0] * (3 * self.workers + 1), lock=False)
        n_slots = world_size * self.workers
        if train and split.total < n_slots:
            raise DatasetError(f"{split.name}: {split.total} samples cannot feed {n_slots} "
                               f"loader slots ({world_size} processes x {self.workers} workers)")

    @property
    def slots(self) -> int:
        return self.world_size * self.workers

    def samples_per_epoch(self) -> int:
        """Samples read per epoch over all ranks (training leaves out fewer than `slots`)."""
        return self.slots * (self.split.total // self.slots) if self.train else self.split.total

    def __len__(self) -> int:
        """Batches per epoch on this rank (train: the same on every rank)."""
        if self.train:
            return self.workers * len(batch_sizes(self.split.total // self.slots, self.batch_size))
        return sum(math.ceil((e - b) / self.batch_size) for b, e in
                   (slot_bounds(self.split.total, self.slots, self.rank * self.workers + w, equal=False)
                    for w in range(self.workers)))

    def set_epoch(self, epoch: int, starts: list[Position] | None = None) -> None:
        """Call before iterating; `starts` (one per worker, from the batches' "resume") resumes mid-epoch.

        A DataLoader always asks worker 0 first, but the next batch due may be worker 2's:
        loader worker i then plays slot worker (i + rotation) % workers, which keeps the
        round-robin order of the uninterrupted run.
        """
        self._epoch.value = epoch
        starts = starts or [Position()] * self.workers
        for w, p in enumerate(starts):
            self._start[3 * w: 3 * w + 3] = [p.batches, p.block, p.offset]
        self._start[3 * self.workers] = sum(p.batches for p in starts) % self.workers

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker = ((info.id if info is not None else 0) + self._start[3 * self.workers]) % self.workers
        slot = self.rank * self.workers + worker
        epoch = self._epoch.value
        start = Position(*self._start[3 * worker: 3 * worker + 3])
        order = shard_order(len(self.split.urls), self.seed, epoch, shuffle=self.train)
        begin, end = slot_bounds(self.split.total, self.slots, slot, equal=self.train)
        segments = slot_segments(self.split.counts, order, begin, end)
        length = end - begin
        sizes = batch_sizes(length, self.batch_size)[start.batches:] if self.train else None
        skips = Skips(give_up_after=length + self.shuffle_block if self.train else None)
        period = stream_length(max(length, 1), self.lanes)  # an eval slot may be empty
        first = block_start(start.block, period, self.shuffle_block)
        pipeline = wds.DataPipeline(
            lambda: read_slot(self.split, segments, max(length, 1), first, skips, repeat=self.train, lanes=self.lanes),
            lambda src: block_shuffle(src, period, self.shuffle_block, f"{self.seed}-{epoch}-{slot}", start),
            lambda src: decode(src, self.read_sample, skips),
            lambda src: (self.augment(s, epoch) for s in src) if self.augment else src,
            lambda src: tokenize(src, self.encode_text, skips),
            lambda src: batched(src, sizes, self.batch_size, self.collate, skips, done=start.batches),
        )
        for batch in pipeline:
            batch["worker"] = worker
            yield batch


def make_loader(dataset: ShardedSamples, num_workers: int, persistent_workers: bool = False,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over ready-made batches (batching happens in the workers).

    Not to be passed to `accelerator.prepare`: Accelerate would re-shard or broadcast an
    iterable loader (DESIGN.md); the slots above already split the data by rank and worker.
    """
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )
