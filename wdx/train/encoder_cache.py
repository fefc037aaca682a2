"""The frozen-prefix encoder cache: the frozen encoder blocks run once per clip, not once per epoch.

    train_loop.py ... --encoder-cache DIR [--rebuild-encoder-cache]

With the default freeze, everything of the encoder below its last 4 blocks (conv stem,
positions, 28 of large-v3's 32 blocks) never changes, and nothing random comes before it
(no dropout there, no input augmentation): its output for a clip is the same every epoch.
The cache keeps that output in the compute dtype, next to what the loader needs:

    DIR/fingerprint.json        what the states depend on (below); a mismatch is refused
    DIR/<split>/<shard name>    one tar per source shard (its metadata.json name, '/' written '__'),
                                the same samples in the same order:
                                KEY.states  [frames, d_model] raw, in the fingerprint's dtype
                                KEY.json    {"text", "domain", "duration"}
                                or KEY.skip why the source sample is unusable (counted as a
                                skip again every epoch, exactly as the audio path counts it)
    DIR/<split>/<name>.done     the finished shard's size, written after its fsync and rename: a
                                shard without it, or of another size (truncated, overwritten), is
                                built again

A source shard is recognised as changed by its size and modification time (a URL shard by
its sha256): a tool that rewrites a shard keeping both (rsync --inplace -t, a restored
backup) needs --rebuild-encoder-cache.

Mirroring the source shards keeps every slot, shuffle and resume rule of wdx.data.pipeline as it is:
the loader reads cache shards instead of audio shards, and `read_cached` stands in for
audio decoding. Shard i is built by rank i % world_size, written to NAME.partial and renamed
when complete, so an interrupted build resumes with the shards not yet renamed. Every process
checks the fingerprint it sees (per-node copies included) and every shard after the build; the
verdict is agreed, so a disagreement is one line on every rank, never a hang.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import importlib.metadata
import inspect
import json
import logging
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import torch
import webdataset as wds

from wdx.config import ConfigError, TrainConfig
from wdx.data import audio, conventions, features, text
from wdx.data import pipeline as data
from wdx.data.augment import SpecAugment
from wdx.data.conventions import Convention
from wdx.data.features import HOP_LENGTH, N_FFT, SAMPLE_RATE
from wdx.data.pipeline import Skips, decode_sample, pad_audio, read_segments
from wdx.data.sharding import Segment
from wdx.data.shards import Split, is_url, open_url
from wdx.model.domains import trained_domains
from wdx.model.lm_head import DomainWhisper
from wdx.model.whisper import tensors_sha256
from wdx.scoring.forward import model_input
from wdx.train.accel import agree, gather_list, sum_counts, zero_stage

log = logging.getLogger(__name__)

FINGERPRINT = "fingerprint.json"
VERSION = 3  # 3: the transcript convention, and each record's fluent text
RECORD = ("text", "domain", "duration", "target", "fluent")  # what a cached sample keeps besides its states
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# fingerprint field -> what the user changes to change it (the refusal names it)
CAUSES = {"version": "the cache format of this trainer", "prefix_sha256": "--base-model (its frozen weights)",
          "code": "this trainer's audio decoding, text normalisation or log-mel code (changed since the build)",
          "frozen_blocks": "--train-encoder-layers", "d_model": "--base-model", "n_mels": "--base-model",
          "mel": "the log-mel settings of wdx.data.features", "dtype": "--mixed-precision",
          "target_sr": "--target-sr", "default_domain": "--default-domain", "splits": "--dataset-root",
          "convention": "--text-convention / --dual-transcription", "domains": "--domains",
          "libraries": "the versions of the libraries that decode and encode the clips"}


class CacheError(ConfigError):
    """The cache directory cannot serve this run (one line: what differs, and what to do)."""


def prefix_sha256(model) -> str:
    """A hash of every weight the cached states depend on, as held (dtype included)."""
    encoder = model.model.encoder
    modules = (encoder.conv1, encoder.conv2, encoder.embed_positions, *encoder.layers[: model.frozen_prefix])
    return tensors_sha256(item for module in modules for item in module.state_dict().items())


def code_sha256() -> str:
    """A hash of the code that turns a tar sample into cached states and records: a fix there
    must not be bypassed by states made before it."""
    parts = [inspect.getsource(m) for m in (audio, conventions, features, text)]
    parts += [inspect.getsource(f) for f in (decode_sample, data.sample_meta, data.resolve_domain, data.pcm_rate,
                                             data.clean_target, data.group_members, data._join_dotted_json,
                                             data.split_member_name, model_input,
                                             DomainWhisper.encoder_prefix)]
    parts.append(repr((data.MAX_SECONDS, data.MIN_SECONDS, data.MAX_CHARS_PER_SECOND, data.MIN_RATE, data.MAX_RATE,
                       sorted(data.MEMBER_TYPES))))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


# what decodes, resamples and encodes a clip: another version may give other states for the same bytes
LIBRARIES = ("torch", "torchaudio", "transformers", "numpy", "soundfile", "av")


def library_versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in LIBRARIES}


def cache_names(split: Split) -> list[str]:
    """The cache's file name of each shard: its metadata.json name with '/' written '__', so that
    shards of one name in different folders never share a cache file."""
    files = split.files or tuple(u.rsplit("/", 1)[-1] for u in split.urls)
    names = [f.replace("/", "__") for f in files]
    if len(set(names)) < len(names):  # "a/b.tar" and "a__b.tar" both listed: number them
        names = [f"{i:06d}-{n}" for i, n in enumerate(names)]
    return names


def shard_sha256(url: str) -> str:
    digest = hashlib.sha256()
    with open_url(url) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def remote_digests(accelerator, splits: list[Split]) -> dict[str, str]:
    """sha256 of every URL (pipe:, http, s3 ...) shard, which cannot be stat'ed: each process reads
    its share once per start (no decoding), so a rewritten remote shard is never served stale."""
    urls = [u for s in splits for u in s.urls if is_url(u)]
    mine = {u: shard_sha256(u) for i, u in enumerate(urls) if i % accelerator.num_processes ==
            accelerator.process_index}
    return {u: h for part in gather_list(accelerator, [mine]) for u, h in part.items()}


def shard_list(split: Split, remote: dict[str, str]) -> list[list]:
    """[name, samples, bytes, mtime_ns] per local shard, [name, samples, sha256] per URL shard."""
    out = []
    for url, file, count in zip(split.urls, split.files or split.urls, split.counts):
        entry = [file, count]
        if is_url(url):
            entry.append(remote[url])
        else:
            st = os.stat(url)
            entry += [st.st_size, st.st_mtime_ns]
        out.append(entry)
    return out


def fingerprint(cfg: TrainConfig, model, splits: list[Split], dtype: torch.dtype, remote: dict[str, str]) -> dict:
    """Everything the cached states and their records depend on."""
    c = model.config
    return {"version": VERSION, "prefix_sha256": prefix_sha256(model), "code": code_sha256(),
            "frozen_blocks": model.frozen_prefix, "d_model": c.d_model, "n_mels": c.num_mel_bins,
            "mel": [SAMPLE_RATE, N_FFT, HOP_LENGTH], "dtype": str(dtype).removeprefix("torch."),
            "target_sr": cfg.target_sr, "default_domain": cfg.default_domain, "convention": list(cfg.convention),
            "domains": sorted(trained_domains(c, cfg.domain_names)),  # a set: reordering --domains changes nothing
            "libraries": library_versions(),
            "splits": {s.name: {"domain": s.domain, "shards": shard_list(s, remote)} for s in splits}}


def differences(saved: dict, want: dict) -> list[str]:
    """What differs, each as "cause (detail)"."""
    out = []
    for key in want:
        if key == "splits":
            for name, split in want["splits"].items():
                have = saved.get("splits", {}).get(name)
                if have is None:
                    continue  # a split not cached yet: added
                if have.get("domain") != split["domain"]:
                    out.append(f"--dataset-root ({name}/metadata.json domain {have.get('domain')} -> "
                               f"{split['domain']})")
                if have.get("shards") != split["shards"]:
                    changed = next((s[0] for s, h in zip(split["shards"], have.get("shards", [])) if s != h), None)
                    what = f"{name}/{changed} changed" if changed else f"{name} has other shards"
                    out.append(f"--dataset-root ({what})")
        elif key == "prefix_sha256" and any(saved.get(k) != want[k] for k in ("dtype", "frozen_blocks")):
            continue  # the hash covers the prefix as held: another dtype or depth is reported as that
        elif saved.get(key) != want[key]:
            out.append(f"{CAUSES[key]} ({key} {saved.get(key)} -> {want[key]})"
                       if key not in ("prefix_sha256", "code") else CAUSES[key])
    return out


def read_fingerprint(root: Path) -> dict | None:
    path = root / FINGERPRINT
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CacheError(f"--encoder-cache {root}: {FINGERPRINT} unreadable ({exc}); "
                         "pass --rebuild-encoder-cache") from None


def refusal(root: Path, differ: list[str]) -> CacheError:
    return CacheError(f"--encoder-cache {root}: built for another set-up: {'; '.join(differ)}; pass "
                      "--rebuild-encoder-cache to build it again, or name another directory")


def open_cache(root: Path, want: dict, rebuild: bool) -> None:
    """Make `root` a cache for `want`: new, matching (splits may be added), or wiped when `rebuild`.
    A matching fingerprint is not written again (a cache on a read-only file system serves)."""
    saved = read_fingerprint(root)
    if saved is not None:
        differ = differences(saved, want)
        if differ and not rebuild:
            raise refusal(root, differ)
        if differ:
            log.warning("--encoder-cache %s: rebuilding (%s)", root, "; ".join(differ))
            for entry in root.iterdir():
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        else:
            want = {**want, "splits": {**saved.get("splits", {}), **want["splits"]}}
            if want == saved:
                return
    elif root.exists() and not root.is_dir():
        raise CacheError(f"--encoder-cache {root}: not a directory")
    elif root.exists() and any(root.iterdir()):
        raise CacheError(f"--encoder-cache {root}: holds files but no {FINGERPRINT}; name an empty or new directory")
    root.mkdir(parents=True, exist_ok=True)
    tmp = (root / FINGERPRINT).with_suffix(".tmp")
    tmp.write_text(json.dumps(want, indent=1))
    os.replace(tmp, root / FINGERPRINT)


def check_copy(root: Path, want: dict, rank: int) -> None:
    """Another process's view of the cache: on a file system it does not share with the main
    process (a per-node copy), the fingerprint must be there and match too."""
    saved = read_fingerprint(root)
    if saved is None:
        raise CacheError(f"--encoder-cache {root}: no {FINGERPRINT} where process {rank} looks; the directory must be "
                         "shared by every process, or copied to every node after a build (docs/encoder-cache.md)")
    differ = differences(saved, want)
    if differ:
        raise refusal(root, [f"{d} in process {rank}'s copy" for d in differ])


def complete(path: Path) -> bool:
    """A cache shard that was written whole: renamed, with a matching `.done` size record."""
    done = path.with_name(path.name + ".done")
    try:
        size = json.loads(done.read_text())["bytes"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if path.is_file() and path.stat().st_size == size:
        return True
    log.warning("encoder cache shard %s: %s; building it again", path,
                f"{path.stat().st_size} bytes, {size} were written" if path.is_file() else "missing")
    return False


def cached_split(root: Path, split: Split) -> Split:
    """The cache's mirror of `split`: same shards in the same order and counts, states instead of audio."""
    names = cache_names(split)
    return Split(name=split.name, urls=tuple(str(root / split.name / n) for n in names), counts=split.counts,
                 domain=split.domain, files=tuple(names))


def read_cached(raw: dict, *, dtype: torch.dtype, shape: tuple[int, int]) -> dict | str:
    """A cache tar sample -> {states, text, domain, duration}, or the source sample's skip verdict."""
    if "__skip__" in raw:
        return raw["__skip__"]
    if "skip" in raw:
        return raw["skip"].decode("utf-8")
    try:
        meta = json.loads(raw["json"])
        states = torch.frombuffer(bytearray(raw["states"]), dtype=dtype).view(shape)
    except (KeyError, ValueError, RuntimeError) as exc:
        return f"corrupt_cache: {type(exc).__name__} {exc}"
    return dict(states=states, text=meta["text"], domain=meta["domain"], duration=meta["duration"],
                target=meta.get("target"), fluent=meta.get("fluent"))


class _ShardClips(torch.utils.data.IterableDataset):
    """The decoded clips of some shards in tar order, in batches; loader worker w reads shards w, w+W, ...

    Every batch carries its shard, its samples' records (skips included, in order) and
    whether it closes the shard, so the main process can write each shard as it arrives.
    """

    def __init__(self, split: Split, shards: list[int], batch_size: int, target_sr: int,
                 default_domain: str | None, convention: Convention, domains: tuple[str, ...]) -> None:
        self.split, self.shards, self.batch_size = split, shards, batch_size
        self.decode = functools.partial(decode_sample, target_sr=target_sr, split_domain=split.domain,
                                        default_domain=default_domain, convention=convention, domains=domains)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for shard in self.shards[worker::workers]:
            skips, records, clips, extras = Skips(), [], [], []
            segment = [Segment(shard, 0, self.split.counts[shard])]
            for _, raw in read_segments(self.split, segment, 0, skips, extras):
                records += self._extras(extras)
                result = self.decode(raw)
                if isinstance(result, str):
                    skips.record(result, data.shard_name(raw.get("__url__", "?")), raw["__key__"])
                    records.append({"key": raw["__key__"], "skip": result})
                    continue
                clips.append(result)
                records.append({"key": raw["__key__"], **{k: result[k] for k in RECORD}})
                if len(clips) == self.batch_size:
                    yield self._batch(shard, records, clips, skips, done=False)
                    records, clips = [], []
            yield self._batch(shard, records + self._extras(extras), clips, skips, done=True)

    @staticmethod
    def _extras(extras: list) -> list[dict]:
        """Records for the source's non-adjacent members, in their place: the cache shard has them
        after other samples too, so reading it counts them as the audio path does, every epoch."""
        out = [{"key": raw["__key__"], "skip": raw["__skip__"]} for raw in extras]
        extras.clear()
        return out

    @staticmethod
    def _batch(shard: int, records: list, clips: list, skips: Skips, done: bool) -> dict:
        return {"shard": shard, "records": records, "audio": pad_audio(clips) if clips else None, "done": done,
                "skips": skips.take()}


def build_split(model, split: Split, out_dir: Path, shards: list[int], *, batch_size: int, workers: int,
                target_sr: int, default_domain: str | None, convention: Convention, domains: tuple[str, ...],
                dtype: torch.dtype, autocast,
                device: torch.device) -> tuple[int, Counter]:
    """Write the cache shards `shards` of `split` into `out_dir`; returns (clips encoded, skips).

    Encoding runs on the device while a thread writes the previous batch's states to disk
    and the loader workers decode the next ones.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    names = cache_names(split)
    loader = torch.utils.data.DataLoader(_ShardClips(split, shards, batch_size, target_sr, default_domain, convention,
                                                     domains),
                                         batch_size=None, num_workers=workers)
    writers: dict[int, wds.TarWriter] = {}
    try:
        return _encode_and_write(model, loader, writers, out_dir, names, dtype, autocast, device)
    finally:  # after a failed write (a full disk): close now, or the file's finaliser fails again, as a traceback
        for writer in writers.values():
            try:
                writer.close()
            except OSError:
                pass


def _encode_and_write(model, loader, writers: dict, out_dir: Path, names: list[str], dtype: torch.dtype, autocast,
                      device: torch.device) -> tuple[int, Counter]:
    clips, skips = 0, Counter()
    with concurrent.futures.ThreadPoolExecutor(1) as disk:
        pending = None
        for batch in loader:
            states = None
            if batch["audio"] is not None:
                inputs = model_input({"audio": batch["audio"].to(device)}, model.config.num_mel_bins, model.dtype)
                with torch.no_grad(), autocast():
                    states = model.encoder_prefix(inputs["input_features"]).to(dtype).cpu()
                clips += len(states)
            if pending is not None:
                pending.result()  # one batch in flight: disk errors surface here, in order
            pending = disk.submit(_write, writers, out_dir / names[batch["shard"]], batch, states)
            skips.update(batch["skips"])
        if pending is not None:
            pending.result()
    return clips, skips


def _write(writers: dict, path: Path, batch: dict, states: torch.Tensor | None) -> None:
    partial = path.with_name(path.name + ".partial")
    writer = writers.get(batch["shard"])
    if writer is None:
        writer = writers[batch["shard"]] = wds.TarWriter(str(partial))
    k = 0
    for record in batch["records"]:
        if "skip" in record:
            writer.write({"__key__": record["key"], "skip": record["skip"].encode("utf-8")})
            continue
        meta = {name: record[name] for name in RECORD}
        writer.write({"__key__": record["key"], "states": states[k].contiguous().view(torch.uint8).numpy().tobytes(),
                      "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
        k += 1
    if batch["done"]:
        writers.pop(batch["shard"]).close()
        with open(partial, "rb+") as f:  # on disk before the rename: a crash never leaves a renamed, empty shard
            os.fsync(f.fileno())
        os.replace(partial, path)
        done = path.with_name(path.name + ".done")
        done.with_suffix(".tmp").write_text(json.dumps({"bytes": path.stat().st_size}))
        os.replace(done.with_suffix(".tmp"), done)


def check_fixed(cfg: TrainConfig, config) -> None:
    """Refuse a base model whose config makes the prefix's output random in training: SpecAugment
    masks the log-mel, dropout in the frozen blocks; the cache would silently train without them."""
    if cfg.spec_augment is None and SpecAugment.from_config(config):
        raise CacheError(f"--encoder-cache: --base-model {cfg.base_model} enables SpecAugment (apply_spec_augment, "
                         f"mask_time_prob {config.mask_time_prob}, mask_feature_prob {config.mask_feature_prob}), "
                         "which training honours: its masks change the encoder input every epoch, which a cache of "
                         "fixed states cannot serve; pass --no-spec-augment or train without --encoder-cache")
    for name in ("attention_dropout", "activation_dropout"):
        if getattr(config, name, 0.0) > 0:
            raise CacheError(f"--encoder-cache: --base-model {cfg.base_model} has {name} {getattr(config, name)}: "
                             "the frozen blocks' output would change every epoch; set it to 0 in its config.json or "
                             "train without --encoder-cache")


def ensure(cfg: TrainConfig, accelerator, model, splits: list[Split], dtype: torch.dtype
           ) -> tuple[list[Split], functools.partial, dict]:
    """Check `cfg.encoder_cache` against this run (refusing a mismatch in one line), build
    the shards it lacks (each rank its share) and return (cached splits, the reader for
    ShardedSamples, build stats). `model` is the unwrapped model, ready on the device."""
    root = Path(cfg.encoder_cache)
    if zero_stage(accelerator) == 3:
        raise CacheError("--encoder-cache: not supported under ZeRO-3 (the prefix runs outside the engine's "
                         "parameter gathering); use ZeRO-2, which the cache makes fit more often")
    if model.config.encoder_layerdrop > 0:
        raise CacheError(f"--encoder-cache: --base-model {cfg.base_model} drops encoder layers at random "
                         f"(encoder_layerdrop {model.config.encoder_layerdrop}); its prefix output is not fixed")
    if model.frozen_prefix == 0:
        raise CacheError(f"--encoder-cache: --train-encoder-layers {cfg.train_encoder_layers} trains every encoder "
                         "block; there is no frozen prefix to cache")
    check_fixed(cfg, model.config)
    want = fingerprint(cfg, model, splits, dtype, remote_digests(accelerator, splits))
    rank, world = accelerator.process_index, accelerator.num_processes
    problem = None
    try:
        if accelerator.is_main_process:
            open_cache(root, want, cfg.rebuild_encoder_cache)
    except (CacheError, OSError) as exc:
        problem = str(exc) if isinstance(exc, CacheError) else f"--encoder-cache {root}: {exc}"
    if agree(accelerator, problem is not None)[0]:
        raise CacheError(problem or f"--encoder-cache {root}: refused on the main process")
    try:
        if not accelerator.is_main_process:  # after the main process wrote it: each node's view, copies included
            check_copy(root, want, rank)
    except CacheError as exc:
        problem = str(exc)
    if agree(accelerator, problem is not None)[0]:
        raise CacheError(problem or f"--encoder-cache {root}: another process's copy differs (see its log)")

    t0, clips, skips = time.perf_counter(), 0, Counter()
    try:
        for split in splits:
            names = cache_names(split)
            todo = [i for i in range(len(split.urls)) if i % world == rank
                    and not complete(root / split.name / names[i])]
            if todo:
                log.info("encoder cache: building %d of %s's %d shards on process %d", len(todo), split.name,
                         len(split.urls), rank)
                n, s = build_split(model, split, root / split.name, todo, batch_size=cfg.per_device_eval_batch_size,
                                   workers=cfg.num_workers, target_sr=cfg.target_sr,
                                   default_domain=cfg.default_domain, convention=cfg.convention,
                                   domains=trained_domains(model.config, cfg.domain_names), dtype=dtype,
                                   autocast=accelerator.autocast,
                                   device=accelerator.device)
                clips, skips = clips + n, skips + s
    except OSError as exc:  # a full or read-only disk: every rank stops with the same line
        problem = f"--encoder-cache {root}: cannot write ({exc})"
    if agree(accelerator, problem is not None)[0]:
        raise CacheError(problem or f"--encoder-cache {root}: the build failed on another process")
    seconds = time.perf_counter() - t0
    missing = [f"{s.name}/{n}" for s in splits for n in cache_names(s) if not complete(root / s.name / n)]
    if missing:
        problem = (f"--encoder-cache {root}: {missing[0]} missing after the build where process {rank} looks; is the "
                   "directory shared by every process (or copied to every node)?")
    if agree(accelerator, problem is not None)[0]:  # decided together: a rank that raised alone would hang the rest
        raise CacheError(problem or f"--encoder-cache {root}: a shard is missing where another process looks")
    built = torch.tensor([clips], device=accelerator.device)
    total_built = int(accelerator.reduce(built, reduction="sum").item())
    all_skips = dict(sum_counts(accelerator, skips))
    frames = model.config.max_source_positions
    shape = (frames, model.config.d_model)
    per_clip = frames * model.config.d_model * torch.finfo(dtype).bits // 8
    if total_built:
        log.info("encoder cache %s: %d clips encoded in %.1f s (%.2f MB each; skipped: %s)", root, total_built,
                 seconds, per_clip / 1e6, all_skips or "none")
    else:
        log.info("encoder cache %s: complete, reused (%d blocks of states, %s)", root, model.frozen_prefix, dtype)
    stats = {"encoder_cache/build_seconds": seconds if total_built else 0.0, "encoder_cache/clips_built": total_built,
             "encoder_cache/mb_per_clip": per_clip / 1e6}
    reader = functools.partial(read_cached, dtype=dtype, shape=shape)
    return [cached_split(root, s) for s in splits], reader, stats
