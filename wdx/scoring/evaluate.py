"""Evaluate a trained model: per-sample hypotheses and CER/WER per domain.

    python -m wdx.evaluate MODEL --dataset ROOT [--split val_small]
    python -m wdx.evaluate MODEL --list samples.jsonl      # audio_path, text, domain per line
    python -m wdx.evaluate MODEL --dir DIR --domain normal # DIR/x.wav + DIR/x.txt pairs
    ... [--compare-domains] [--json OUT.json] [--batch-size 8]
    python -m wdx.evaluate --compare A.json B.json         # two --json outputs: is B's CER really different?

MODEL is final/ (or any HF Whisper directory) or a training checkpoint. --compare-domains
decodes every clip once per domain token and reports how the prompt changes the result.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from wdx import strictjson
from wdx.data import conventions
from wdx.data.audio import AUDIO_EXTENSIONS
from wdx.data.conventions import PLAIN, Convention, convert
from wdx.data.inputs import InputError, check_domain_flags, check_item_domains, check_output, read_clip, read_text
from wdx.data.pipeline import FLUENT_FIELD, TARGET_FIELD, ShardedSamples, clean_target, make_loader, speaker_of
from wdx.data.shards import DatasetError, load_split
from wdx.data.text import normalize_text
from wdx.model.domains import DOMAINS
from wdx.scoring.backends import BACKENDS, Transcriber, default_device, open_transcriber
from wdx.scoring.longform import transcribe_long
from wdx.scoring.metrics import by_domain, cer, compare, format_comparison, format_table, prompt_table, row_id

log = logging.getLogger(__name__)


def describe_references(convention: Convention) -> str:
    """What the references are, for the table's title: published Kspon figures differ by the side
    of the (spelling)/(pronunciation) pairs they score against."""
    if convention.name == "plain":
        return "as written (--text-convention plain)"
    return (f"under --text-convention {convention.name}, the {convention.dual} side of (spelling)/(pronunciation) "
            "pairs")


def list_rows(path: Path) -> list:
    """The entries of a JSON array or JSONL file, or an InputError naming the file and line."""
    raw = read_text(path)
    try:
        if raw.lstrip().startswith("["):
            return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    rows = []
    for n, line in enumerate(raw.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
    return rows


def list_items(path: Path, convention: Convention = PLAIN) -> list[dict]:
    """JSON array or JSONL of {audio_path, text, domain}; paths relative to the list's folder;
    `text` as written under `convention` (a `fluent_text` field, or the conversion, gives the
    fluent reference)."""
    items = []
    for n, row in enumerate(list_rows(path), start=1):
        if not isinstance(row, dict):
            raise InputError(f"{path}: entry {n} is a {type(row).__name__}, not an object with audio_path, text, "
                             "domain")
        missing = [k for k in ("audio_path", "text", "domain") if not row.get(k)]
        if missing:
            raise InputError(f"{path}: entry {n} lacks {', '.join(missing)}")
        converted = convert(row["text"], convention)
        if converted.problem or not converted.text:
            raise InputError(f"{path}: entry {n}: text {row['text'][:80]!r} is "
                             f"{'empty' if not converted.text else 'still marked up'} under --text-convention "
                             f"{convention.name}")
        items.append(dict(key=row.get("key", Path(row["audio_path"]).stem), path=path.parent / row["audio_path"],
                          text=converted.text, domain=row["domain"],
                          target=clean_target(row.get(TARGET_FIELD), convention),
                          fluent=converted.fluent_form(clean_target(row.get(FLUENT_FIELD))), speaker=speaker_of(row)))
    return items


def dir_items(folder: Path, domain: str) -> list[dict]:
    """Audio files with a same-named .txt reference next to them."""
    items = []
    for audio in sorted(p for p in folder.iterdir() if p.suffix.lower().lstrip(".") in AUDIO_EXTENSIONS):
        ref = audio.with_suffix(".txt")
        if not ref.exists():
            raise InputError(f"{audio}: no reference {ref.name} next to it")
        items.append(dict(key=audio.stem, path=audio, text=normalize_text(read_text(ref)), domain=domain))
    if not items:
        raise InputError(f"{folder}: no audio files")
    return items


def file_batches(items: list[dict], batch_size: int, skipped: Counter) -> Iterator[list[dict]]:
    """Batches of items with their audio; an unreadable clip is reported, counted and left out."""
    for i in range(0, len(items), batch_size):
        batch = []
        for item in items[i: i + batch_size]:
            try:
                batch.append(dict(item, audio=read_clip(item["path"])))
            except InputError as exc:
                print(f"wdx.evaluate: skipped {exc}", file=sys.stderr)
                skipped["unreadable_file"] += 1
        if batch:
            yield batch


def dataset_batches(root: str, split: str, batch_size: int, workers: int, default_domain: str | None,
                    skipped: Counter, convention: Convention = PLAIN, domains: tuple[str, ...] | None = DOMAINS):
    """Batches of decoded samples; every skipped sample is counted into `skipped` by reason.
    `domains`: the model's (None: any, for a model without domain tokens)."""
    ds = ShardedSamples(load_split(root, split, domains=domains, convention=convention), rank=0, world_size=1,
                        num_workers=workers, batch_size=batch_size, train=False, seed=0, target_sr=16000,
                        default_domain=default_domain, shuffle_block=1, convention=convention, domains=domains,
                        collate=lambda samples: {"samples": samples})
    ds.set_epoch(0)
    for batch in make_loader(ds, workers):
        skipped.update(batch["skips"])
        if not batch.get("empty"):
            yield batch["samples"]


def run(transcriber: Transcriber, batches, total: int | None, compare: bool, batch_size: int) -> list[dict]:
    rows = []
    with tqdm(total=total, desc="transcribing", unit="clip") as bar:
        for samples in batches:
            clips = [s["audio"] for s in samples]
            if compare:  # every clip under every domain token; its own token's transcript is the result
                extra = {d: transcribe_long(transcriber, clips, [d] * len(clips), batch_size)
                         for d in transcriber.domains}
                hyps = [extra[s["domain"]][i] for i, s in enumerate(samples)]
            else:
                hyps = transcribe_long(transcriber, clips, [s["domain"] for s in samples], batch_size)
            for i, s in enumerate(samples):
                # `id` pairs rows in --compare: a key may repeat across shards (or list entries), a file or
                # a shard member may not
                uid = str(s["path"]) if "path" in s else f"{s['shard']}/{s['key']}"
                row = dict(key=s["key"], id=uid, domain=s["domain"], ref=s["text"], hyp=hyps[i],
                           cer=cer([s["text"]], [hyps[i]]), target=s.get("target"), fluent=s.get("fluent"),
                           speaker=s.get("speaker"))
                if compare:
                    row["hyp_by_prompt"] = {d: extra[d][i] for d in transcriber.domains}
                rows.append(row)
            bar.update(len(samples))
    return rows


def compare_main(paths: list[Path], out: Path | None) -> int:
    """--compare A.json B.json: the paired comparison of two evaluations."""
    try:
        runs = []
        for path in paths:
            try:
                rows = json.loads(path.read_text())["samples"]
                ids = Counter(row_id(r) for r in rows)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise InputError(f"--compare {path}: not a wdx.evaluate --json output ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
            twice = [k for k, n in ids.items() if n > 1]
            if twice:
                raise InputError(f"--compare {path}: {len(twice)} sample ids occur more than once (first: "
                                 f"{twice[0]!r}, {ids[twice[0]]} times); rows are paired by id, so each must be "
                                 "unique (evaluate again with this version, which writes shard/key ids)")
            runs.append(rows)
        check_output(out)
    except (InputError, OSError) as exc:
        print(f"wdx.evaluate: error: {exc}", file=sys.stderr)
        return 1
    table = compare(*runs)
    print(format_comparison(table, str(paths[0]), str(paths[1])))
    if out:
        out.write_text(strictjson.dumps({"a": str(paths[0]), "b": str(paths[1]), "compare": table}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wdx.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="final/ directory, HF Whisper directory, or training checkpoint")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--dataset", help="WebDataset root (documented layout)")
    src.add_argument("--list", type=Path, help="JSON/JSONL with audio_path, text, domain")
    src.add_argument("--dir", type=Path, help="folder of audio files with same-named .txt references")
    parser.add_argument("--split", default="val_small", help="split of --dataset")
    parser.add_argument("--domain", help="domain of every clip in --dir; default domain for "
                        "--dataset samples that name none")
    parser.add_argument("--compare-domains", action="store_true", help="also decode with every domain token")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=1, help="loader workers for --dataset")
    parser.add_argument("--max-new-tokens", type=int, default=225)
    parser.add_argument("--language", default="ko")
    conventions.add_flags(parser, "converted, and a second CER without fillers and marked repetitions")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when the backend sees a GPU)")
    parser.add_argument("--backend", choices=BACKENDS, default="hf",
                        help="hf: MODEL is final/ or a checkpoint; ct2: MODEL is a wdx.export_ct2 directory")
    parser.add_argument("--json", type=Path, help="write per-sample results and the tables here")
    src.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"),
                     help="two --json outputs on the same samples: CER of each, B - A and its paired bootstrap 95 %% "
                          "interval per domain (no model needed)")
    args = parser.parse_args(argv)
    given = conventions.from_args(args)
    convention = conventions.resolve(given, None)  # a dataset's recorded one, once it is read
    if args.compare:
        return compare_main(args.compare, args.json)
    if not args.model or not (args.dataset or args.list or args.dir):
        parser.error("MODEL and one of --dataset, --list, --dir are required (or --compare A.json B.json)")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    skipped: Counter = Counter()
    try:
        if args.dir and not args.domain:
            raise InputError("--dir needs --domain (the clips' speaker domain)")
        check_output(args.json)
        if args.dataset:
            total = None  # counted once the model has said its domains
        else:
            items = list_items(args.list, convention) if args.list else dir_items(args.dir, args.domain)
            total = len(items)
        transcriber = open_transcriber(args.model, args.backend, args.language,
                                       args.device or default_device(args.backend), args.max_new_tokens)
        check_domain_flags(transcriber, args.model, ["--compare-domains"] * args.compare_domains, args.domain)
        if args.dataset:  # a model without domain tokens is scored on every domain's samples
            split = load_split(args.dataset, args.split, domains=transcriber.domains or None, convention=given)
            total, convention = split.total, conventions.resolve(given, split.convention)
            batches = dataset_batches(args.dataset, args.split, args.batch_size, args.num_workers, args.domain,
                                      skipped, convention, transcriber.domains or None)
        else:
            check_item_domains(transcriber, items, args.list or args.dir)
            batches = file_batches(items, args.batch_size, skipped)
        rows = run(transcriber, batches, total, args.compare_domains, args.batch_size)
        if not rows:
            where = f"{args.dataset} split {args.split}" if args.dataset else str(args.list or args.dir)
            raise InputError(f"{where}: no usable sample (skipped: {dict(skipped) or 'none'})")
    except (InputError, DatasetError, ValueError, OSError) as exc:
        print(f"wdx.evaluate: error: {exc}", file=sys.stderr)
        return 1
    results = by_domain(rows, transcriber.domains or DOMAINS)
    references = {"text_convention": convention.name,
                  "dual_transcription": convention.dual if convention.name == "kspon" else None}
    report = {"model": str(args.model), "domain_prompt": transcriber.has_domains, "references": references,
              "results": results, "skipped": dict(skipped), "samples": rows}
    if skipped:
        print(f"skipped samples (not in the table): {dict(skipped)}")
    print(format_table(results, title=f"{args.model} ({'with' if transcriber.has_domains else 'without'} "
                                      f"domain prompt; references {describe_references(convention)})"))
    if args.compare_domains:
        report["compare_domains"] = prompt_table(rows, transcriber.domains)
        for true, r in report["compare_domains"].items():
            cers = ", ".join(f"with <|domain:{p}|> {r[f'prompt_{p}']:.4f}" for p in transcriber.domains)
            print(f"  {true:<9} CER {cers}; text changed for {r['changed']}/{r['n']}")
    if args.json:
        args.json.write_text(strictjson.dumps(report, ensure_ascii=False, indent=1))
    return 1 if skipped["unreadable_file"] else 0  # a file the user named; dataset skips are counted, as in training


if __name__ == "__main__":
    sys.exit(main())
