"""The frozen-prefix encoder cache: the frozen encoder blocks run once per clip, not once per epoch.

    train_loop.py ... --encoder-cache DIR [--rebuild-encoder-cache]

With the default freeze, everything of the encoder below its last 4 blocks (conv stem,
positions, 28 of large-v3's 32 blocks) never changes, and nothing random comes before it
(no dropout there, no input augmentation): its output for a clip is the same every epoch.
The cache keeps that output in the compute dtype, next to what the loader needs:

    DIR/fingerprint.json        what the states depend on (below); a mismatch is refused
    DIR/<split>/<shard name>    one tar per source shard, the same samples in the same order:
                                KEY.states  [frames, d_model] raw, in the fingerprint's dtype
                                KEY.json    {"text", "domain", "duration"}
                                or KEY.skip why the source sample is unusable (counted as a
                                skip again every epoch, exactly as the audio path counts it)

Mirroring the source shards keeps every slot, shuffle and resume rule of wdx.data as it is:
the loader reads cache shards instead of audio shards, and `read_cached` stands in for
audio decoding. Shard i is built by rank i % world_size, written to NAME.partial and renamed
when complete, so an interrupted build resumes with the shards not yet renamed.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import logging
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import torch
import webdataset as wds

from .accel import agree, sum_counts, zero_stage
from .config import ConfigError, TrainConfig
from .data import Skips, decode_sample, pad_audio, read_segments, shard_name
from .evaluation import model_input
from .features import HOP_LENGTH, N_FFT, SAMPLE_RATE
from .model import tensors_sha256
from .sharding import Segment
from .shards import Split, is_url

log = logging.getLogger(__name__)

FINGERPRINT = "fingerprint.json"
VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# fingerprint field -> what the user changes to change it (the refusal names it)
CAUSES = {"version": "the cache format of this trainer", "prefix_sha256": "--base-model (its frozen weights)",
          "frozen_blocks": "--train-encoder-layers", "d_model": "--base-model", "n_mels": "--base-model",
          "mel": "the log-mel settings of wdx.features", "dtype": "--mixed-precision",
          "target_sr": "--target-sr", "default_domain": "--default-domain", "splits": "--dataset-root"}


class CacheError(ConfigError):
    """The cache directory cannot serve this run (one line: what differs, and what to do)."""


def prefix_sha256(model) -> str:
    """A hash of every weight the cached states depend on, as held (dtype included)."""
    encoder = model.model.encoder
    modules = (encoder.conv1, encoder.conv2, encoder.embed_positions, *encoder.layers[: model.frozen_prefix])
    return tensors_sha256(item for module in modules for item in module.state_dict().items())


def shard_list(split: Split) -> list[list]:
    """[name, samples, bytes, mtime_ns] per shard (name and samples only for URLs, which cannot be stat'ed)."""
    out = []
    for url, count in zip(split.urls, split.counts):
        entry = [shard_name(url), count]
        if not is_url(url):
            st = os.stat(url)
            entry += [st.st_size, st.st_mtime_ns]
        out.append(entry)
    return out


def fingerprint(cfg: TrainConfig, model, splits: list[Split], dtype: torch.dtype) -> dict:
    """Everything the cached states and their records depend on."""
    c = model.config
    return {"version": VERSION, "prefix_sha256": prefix_sha256(model), "frozen_blocks": model.frozen_prefix,
            "d_model": c.d_model, "n_mels": c.num_mel_bins, "mel": [SAMPLE_RATE, N_FFT, HOP_LENGTH],
            "dtype": str(dtype).removeprefix("torch."), "target_sr": cfg.target_sr,
            "default_domain": cfg.default_domain, "splits": {s.name: shard_list(s) for s in splits}}


def differences(saved: dict, want: dict) -> list[str]:
    """What differs, each as "cause (detail)"."""
    out = []
    for key in want:
        if key == "splits":
            for name, shards in want["splits"].items():
                have = saved.get("splits", {}).get(name)
                if have is not None and have != shards:
                    changed = next((s[0] for s, h in zip(shards, have) if s != h), None)
                    what = f"{name}/{changed} changed" if changed else f"{name} has other shards"
                    out.append(f"--dataset-root ({what})")
        elif key == "prefix_sha256" and any(saved.get(k) != want[k] for k in ("dtype", "frozen_blocks")):
            continue  # the hash covers the prefix as held: another dtype or depth is reported as that
        elif saved.get(key) != want[key]:
            out.append(f"{CAUSES[key]} ({key} {saved.get(key)} -> {want[key]})" if key != "prefix_sha256"
                       else f"{CAUSES[key]}")
    return out


def open_cache(root: Path, want: dict, rebuild: bool) -> None:
    """Make `root` a cache for `want`: new, matching (splits may be added), or wiped when `rebuild`."""
    path = root / FINGERPRINT
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CacheError(f"--encoder-cache {root}: {FINGERPRINT} unreadable ({exc}); "
                             "pass --rebuild-encoder-cache") from None
        differ = differences(saved, want)
        if differ and not rebuild:
            raise CacheError(f"--encoder-cache {root}: built for another set-up: {'; '.join(differ)}; pass "
                             "--rebuild-encoder-cache to build it again, or name another directory")
        if differ:
            log.warning("--encoder-cache %s: rebuilding (%s)", root, "; ".join(differ))
            for entry in root.iterdir():
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        else:
            want = {**want, "splits": {**saved.get("splits", {}), **want["splits"]}}
    elif root.exists() and not root.is_dir():
        raise CacheError(f"--encoder-cache {root}: not a directory")
    elif root.exists() and any(root.iterdir()):
        raise CacheError(f"--encoder-cache {root}: holds files but no {FINGERPRINT}; name an empty or new directory")
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(want, indent=1))
    os.replace(tmp, path)


def cached_split(root: Path, split: Split) -> Split:
    """The cache's mirror of `split`: same shard names and counts, states instead of audio."""
    return Split(name=split.name, urls=tuple(str(root / split.name / shard_name(u)) for u in split.urls),
                 counts=split.counts, domain=split.domain)


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
    return dict(states=states, text=meta["text"], domain=meta["domain"], duration=meta["duration"])


class _ShardClips(torch.utils.data.IterableDataset):
    """The decoded clips of some shards in tar order, in batches; loader worker w reads shards w, w+W, ...

    Every batch carries its shard, its samples' records (skips included, in order) and
    whether it closes the shard, so the main process can write each shard as it arrives.
    """

    def __init__(self, split: Split, shards: list[int], batch_size: int, target_sr: int,
                 default_domain: str | None) -> None:
        self.split, self.shards, self.batch_size = split, shards, batch_size
        self.decode = functools.partial(decode_sample, target_sr=target_sr, split_domain=split.domain,
                                        default_domain=default_domain)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for shard in self.shards[worker::workers]:
            skips, records, clips = Skips(), [], []
            segment = [Segment(shard, 0, self.split.counts[shard])]
            for _, raw in read_segments(self.split, segment, 0, skips):
                result = self.decode(raw)
                if isinstance(result, str):
                    skips.record(result, shard_name(raw.get("__url__", "?")), raw["__key__"])
                    records.append({"key": raw["__key__"], "skip": result})
                    continue
                clips.append(result)
                records.append({"key": raw["__key__"], "text": result["text"], "domain": result["domain"],
                                "duration": result["duration"]})
                if len(clips) == self.batch_size:
                    yield self._batch(shard, records, clips, skips, done=False)
                    records, clips = [], []
            yield self._batch(shard, records, clips, skips, done=True)

    @staticmethod
    def _batch(shard: int, records: list, clips: list, skips: Skips, done: bool) -> dict:
        return {"shard": shard, "records": records, "audio": pad_audio(clips) if clips else None, "done": done,
                "skips": skips.take()}


def build_split(model, split: Split, out_dir: Path, shards: list[int], *, batch_size: int, workers: int,
                target_sr: int, default_domain: str | None, dtype: torch.dtype, autocast,
                device: torch.device) -> tuple[int, Counter]:
    """Write the cache shards `shards` of `split` into `out_dir`; returns (clips encoded, skips).

    Encoding runs on the device while a thread writes the previous batch's states to disk
    and the loader workers decode the next ones.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    loader = torch.utils.data.DataLoader(_ShardClips(split, shards, batch_size, target_sr, default_domain),
                                         batch_size=None, num_workers=workers)
    writers: dict[int, wds.TarWriter] = {}
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
            pending = disk.submit(_write, writers, out_dir / shard_name(split.urls[batch["shard"]]), batch, states)
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
        meta = {name: record[name] for name in ("text", "domain", "duration")}
        writer.write({"__key__": record["key"], "states": states[k].contiguous().view(torch.uint8).numpy().tobytes(),
                      "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
        k += 1
    if batch["done"]:
        writers.pop(batch["shard"]).close()
        os.replace(partial, path)


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
    problem = None
    if accelerator.is_main_process:
        try:
            open_cache(root, fingerprint(cfg, model, splits, dtype), cfg.rebuild_encoder_cache)
        except (CacheError, OSError) as exc:
            problem = str(exc) if isinstance(exc, CacheError) else f"--encoder-cache {root}: {exc}"
    if agree(accelerator, problem is not None)[0]:
        raise CacheError(problem or f"--encoder-cache {root}: refused on the main process")

    t0, clips, skips, problem = time.perf_counter(), 0, Counter(), None
    rank, world = accelerator.process_index, accelerator.num_processes
    try:
        for split in splits:
            todo = [i for i in range(len(split.urls)) if i % world == rank
                    and not (root / split.name / shard_name(split.urls[i])).exists()]
            if todo:
                log.info("encoder cache: building %d of %s's %d shards on process %d", len(todo), split.name,
                         len(split.urls), rank)
                n, s = build_split(model, split, root / split.name, todo, batch_size=cfg.per_device_eval_batch_size,
                                   workers=cfg.num_workers, target_sr=cfg.target_sr,
                                   default_domain=cfg.default_domain, dtype=dtype, autocast=accelerator.autocast,
                                   device=accelerator.device)
                clips, skips = clips + n, skips + s
    except OSError as exc:  # a full or read-only disk: every rank stops with the same line
        problem = f"--encoder-cache {root}: cannot write ({exc})"
    if agree(accelerator, problem is not None)[0]:
        raise CacheError(problem or f"--encoder-cache {root}: the build failed on another process")
    seconds = time.perf_counter() - t0
    missing = [f"{s.name}/{shard_name(u)}" for s in splits for u in s.urls
               if not (root / s.name / shard_name(u)).exists()]
    if missing:
        raise CacheError(f"--encoder-cache {root}: {missing[0]} missing after the build; is the directory shared "
                         "by every process?")
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
