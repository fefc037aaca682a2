"""Transcribe audio files with a trained model and a domain prompt.

    python -m wdx.transcribe MODEL AUDIO [AUDIO ...] --domain dyslexic [--compare-domains] [--json OUT]

Prints one line per file (its hypothesis); --compare-domains decodes each file with every
domain token. No references needed (for scored evaluation use wdx.evaluate). A file that
cannot be read is reported and left out; the rest are transcribed and the exit status is 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wdx import strictjson
from wdx.data.inputs import InputError, check_domain_flags, check_output, read_clip
from wdx.model.domains import DOMAINS
from wdx.scoring.backends import BACKENDS, default_device, open_transcriber
from wdx.scoring.longform import transcribe_long


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wdx.transcribe", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="final/ directory, HF Whisper directory, or training checkpoint")
    parser.add_argument("audio", nargs="+", type=Path,
                        help="wav/flac/mp3/ogg/m4a/opus/webm/aac files, any rate, any length "
                        "(longer than 30 s: cut at pauses, see wdx/scoring/longform.py)")
    parser.add_argument("--domain", help="domain token of the prompt: one the model was trained with (default: its "
                        "first, normal for the default domains; not for a model without domain tokens)")
    parser.add_argument("--compare-domains", action="store_true", help="decode with every domain token")
    parser.add_argument("--batch-size", type=int,
                        help="clips decoded at once (default: 8 with hf; 1 with ct2, as faster-whisper decodes: "
                        "each clip of a batch holds its encoder attention, ~90 MB for base, and batching gains little "
                        "on CPU)")
    parser.add_argument("--max-new-tokens", type=int, default=225)
    parser.add_argument("--language", default="ko")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when the backend sees a GPU)")
    parser.add_argument("--backend", choices=BACKENDS, default="hf",
                        help="hf: MODEL is final/ or a checkpoint; ct2: MODEL is a wdx.export_ct2 directory, "
                        "decoded without torch or transformers (resampling with FFmpeg's resampler)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    lean = args.backend == "ct2"
    args.batch_size = args.batch_size or (1 if lean else 8)
    failed = []
    try:
        check_output(args.json)
        transcriber = open_transcriber(args.model, args.backend, args.language,
                                       args.device or default_device(args.backend), args.max_new_tokens)
        check_domain_flags(transcriber, args.model, ["--domain"] * bool(args.domain)
                           + ["--compare-domains"] * args.compare_domains, args.domain)
        first = (transcriber.domains or DOMAINS)[0]
        domains = transcriber.domains if args.compare_domains else (args.domain or first,)
        results = []
        for i in range(0, len(args.audio), args.batch_size):
            paths, clips = [], []
            for path in args.audio[i: i + args.batch_size]:
                try:
                    clips.append(read_clip(path, lean=lean))
                    paths.append(path)
                except InputError as exc:
                    print(f"wdx.transcribe: skipped {exc}", file=sys.stderr, flush=True)
                    failed.append({"audio": str(path), "error": str(exc)})
            if not clips:
                continue
            by_domain = {d: transcribe_long(transcriber, clips, [d] * len(clips), args.batch_size) for d in domains}
            for j, path in enumerate(paths):
                results.append({"audio": str(path), **{f"hyp_{d}": by_domain[d][j] for d in domains}})
                print(f"{path}\t" + "\t".join(f"[{d}] {by_domain[d][j]}" for d in domains), flush=True)
    except (InputError, ValueError, OSError) as exc:
        print(f"wdx.transcribe: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        args.json.write_text(strictjson.dumps(results + failed, ensure_ascii=False, indent=1))
    if failed:
        print(f"wdx.transcribe: {len(failed)} of {len(args.audio)} files could not be read (see above)",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
