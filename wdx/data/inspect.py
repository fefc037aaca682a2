"""Print what a dataset holds, split by split, decoding every sample.

    python -m wdx.inspect ROOT [--splits train val_small] [--json OUT.json]

Per split: shards, samples (metadata.json vs counted in the tars), hours, domain balance,
formats / sample rates / channels, the samples the trainer would skip, by reason, and the
transcripts that carried corpus markup (--text-convention kspon, or packed with it), by mark,
with examples as written and as trained.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass, field

from tqdm import tqdm

from wdx import strictjson
from wdx.data import conventions
from wdx.data.conventions import PLAIN, Convention
from wdx.data.pipeline import Skips, _first_arg, decode_sample, iter_shard, shard_name
from wdx.data.shards import DatasetError, Split, load_split
from wdx.model.domains import DOMAINS, domains_flag
from wdx.model.whisper import ModelLoadError

DEFAULT_SPLITS = ("train", "val_small")
EXAMPLES = 3  # marked-up transcripts shown per split


@dataclass
class SplitReport:
    name: str
    shards: int
    metadata_samples: int
    counted_samples: int = 0
    usable_samples: int = 0
    hours: float = 0.0
    domains: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)
    sample_rates: Counter = field(default_factory=Counter)
    channels: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    count_mismatches: list = field(default_factory=list)  # (shard, metadata, counted)
    one_domain_shards: int = 0  # shards whose usable samples are all of one domain (of several in the split)
    marks: Counter = field(default_factory=Counter)  # transcripts that carried each kind of markup
    marked: int = 0  # transcripts that carried any
    examples: list = field(default_factory=list)  # (as written, as trained), the first few


def inspect_split(split: Split, default_domain: str | None = None, encode_text=None,
                  convention: Convention = PLAIN, domains: tuple[str, ...] = DOMAINS) -> SplitReport:
    """Read every sample of `split` the way the trainer does (no resampling). `encode_text`
    (collate.make_text_encoder of --base-model's tokenizer) also checks transcript lengths."""
    report = SplitReport(split.name, len(split.urls), split.total)
    skips, one_domain, before = Skips(), 0, Counter()
    with tqdm(total=split.total, desc=split.name, unit="sample", leave=False) as bar:
        for url, expected in zip(split.urls, split.counts):
            counted = 0
            try:
                for raw in iter_shard(url):
                    if "__extra__" not in raw:  # members of an earlier key: not a sample of their own
                        counted += 1
                        bar.update()
                    _add(report, skips, raw, split, default_domain, encode_text, convention, domains)
            except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
                skips.skip("corrupt_shard", shard_name(url), "-", _first_arg(exc))
            report.counted_samples += counted
            one_domain += len(report.domains - before) == 1
            before = Counter(report.domains)
            if counted != expected:
                report.count_mismatches.append((shard_name(url), expected, counted))
    report.skipped = Counter(skips.take())
    report.one_domain_shards = one_domain if len(report.domains) > 1 else 0
    return report


def _add(report: SplitReport, skips: Skips, raw: dict, split: Split, default_domain: str | None,
         encode_text, convention: Convention, domains: tuple[str, ...]) -> None:
    sample = decode_sample(raw, target_sr=None, split_domain=split.domain, default_domain=default_domain,
                           convention=convention, domains=domains)
    if not isinstance(sample, str) and encode_text is not None:
        ids = encode_text(sample["text"])
        sample = ids if isinstance(ids, str) else sample
    if isinstance(sample, str):
        skips.record(sample, shard_name(raw.get("__url__", "?")), raw["__key__"])
        return
    report.usable_samples += 1
    report.hours += sample["duration"] / 3600
    report.domains[sample["domain"]] += 1
    report.formats[sample["format"]] += 1
    report.sample_rates[sample["sample_rate"]] += 1
    report.channels[sample["channels"]] += 1
    if sample["marks"]:
        report.marked += 1
        report.marks.update(sample["marks"].keys())
        if len(report.examples) < EXAMPLES:
            report.examples.append((sample["raw_text"], sample["text"]))


def text_encoder(base_model: str):
    """Training's transcript check (label ids, or the skip verdict) with --base-model's tokenizer."""
    from transformers import AutoTokenizer, WhisperConfig

    from wdx.data.collate import make_text_encoder

    try:
        positions = WhisperConfig.from_pretrained(base_model).max_target_positions
        tokenizer = AutoTokenizer.from_pretrained(base_model)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"--base-model {base_model}: cannot load its tokenizer ({str(exc).splitlines()[0]})"
                             ) from None
    return make_text_encoder(tokenizer, positions)


def format_report(r: SplitReport) -> str:
    def counts(c: Counter) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(c.items(), key=lambda kv: str(kv[0]))) or "-"

    lines = [
        f"== {r.name}",
        f"  shards            {r.shards}",
        f"  samples           {r.counted_samples} counted, {r.metadata_samples} in metadata.json",
        f"  usable            {r.usable_samples} ({r.hours:.3f} h)",
        f"  domains           {counts(r.domains)}",
        f"  formats           {counts(r.formats)}",
        f"  sample rates      {counts(r.sample_rates)}",
        f"  channels          {counts(r.channels)}",
        f"  skipped           {counts(r.skipped)}",
    ]
    if r.one_domain_shards:
        lines.append(f"  one-domain shards {r.one_domain_shards} of {r.shards}: a batch mixes only the few shards a "
                     "loader worker has open; repack with wdx.pack (it shuffles) for batches that mix domains")
    if r.marked:
        lines.append(f"  marked up         {r.marked} transcripts: {counts(r.marks)}")
        lines += [f"    written  {raw}\n    trained  {text}" for raw, text in r.examples]
    lines += [f"  COUNT MISMATCH    {s}: metadata says {m}, tar holds {c}" for s, m, c in r.count_mismatches]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wdx.inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="dataset root (a directory or a URL WebDataset can open)")
    parser.add_argument("--splits", nargs="+", default=list(DEFAULT_SPLITS))
    parser.add_argument("--samples-per-shard", type=int, help="count to assume where metadata.json is missing")
    parser.add_argument("--default-domain", help="domain for samples that name none")
    parser.add_argument("--base-model", help="also skip transcripts longer than this model's decoder holds, as "
                        "training does (its tokenizer decides; without it transcript lengths are not checked)")
    conventions.add_flags(parser, "converted as training converts it")
    parser.add_argument("--domains", type=domains_flag, default=DOMAINS,
                        help="the run's domains, comma-separated (train_loop.py --domains)")
    parser.add_argument("--json", help="also write the reports here as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(message)s")  # skips are in the table
    reports = []
    try:
        encode_text = text_encoder(args.base_model) if args.base_model else None
        if encode_text is None:
            print("transcript lengths: not checked (pass --base-model to count those the decoder cannot hold)")
        for name in args.splits:
            split = load_split(args.root, name, args.samples_per_shard, args.domains, conventions.from_args(args))
            reports.append(inspect_split(split, args.default_domain, encode_text,
                                         conventions.resolve(conventions.from_args(args), split.convention),
                                         args.domains))
            print(format_report(reports[-1]), flush=True)
    except (DatasetError, ModelLoadError) as exc:
        print(f"wdx.inspect: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        with open(args.json, "w") as f:
            f.write(strictjson.dumps([vars(r) for r in reports], indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
