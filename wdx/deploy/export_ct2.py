"""Export final/ for CTranslate2 / faster-whisper, with what their users need to prompt it.

    python -m wdx.export_ct2 FINAL OUT [--quantization int8|int8_float16|float16|float32] [--force]

The weights go through ctranslate2's own Transformers converter. OUT also gets the
tokenizer (tokenizer.json, with the domain tokens), the feature extractor config (the
number of mel bins: 128 for large-v3, 80 before it) and `domain_prompts.json`: the token
ids each consumer must put in front of decoding, per domain (one 4-token prompt, "none",
for a model trained with --domain-conditioning none). Serve it with faster-whisper through
`wdx.deploy.faster_whisper.DomainWhisperModel`, which puts that prompt on every 30 s window.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from wdx.data.collate import prompt_ids
from wdx.model.domains import domain_token, model_domains
from wdx.scoring.inference import check_model_files

QUANTIZATIONS = ("int8", "int8_float16", "int8_float32", "float16", "float32")
PROMPTS_FILE = "domain_prompts.json"
COPIED = ("tokenizer.json", "preprocessor_config.json")


class ExportError(ValueError):
    """FINAL cannot be exported (one line, names the directory and what is missing)."""


def check_source(final: Path) -> None:
    if not final.is_dir():  # a Hub id (openai/whisper-base) reads as a missing config.json, which misleads
        raise ExportError(f"{final}: no such directory; wdx.export_ct2 exports a local model directory (RUN/final, "
                          "or a Hub model downloaded first)")
    config = final / "config.json"
    if not config.is_file():
        raise ExportError(f"{final}: no config.json; not a model directory (use RUN/final, or --export a checkpoint)")
    try:
        check_model_files(final)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type != "whisper":
        raise ExportError(f"{final}: model_type is {model_type!r}, not 'whisper'")
    for name in COPIED:
        if not (final / name).is_file():
            raise ExportError(f"{final}: no {name}; CTranslate2 and faster-whisper need it next to the weights")


def check_target(final: Path, out: Path, force: bool) -> None:
    """Refuse an OUT whose replacement (ctranslate2 deletes OUT under --force) would delete the
    model being exported, its run, or anything that is not an earlier export."""
    src, dst = final.resolve(), out.resolve()
    if dst == src or dst in src.parents or src in dst.parents:
        raise ExportError(f"{out}: is or holds {final} (or lies inside it); choose an output directory outside the "
                          "model and its run directory")
    if not out.exists():
        return
    if not force:
        raise ExportError(f"{out}: exists; pass --force to replace it")
    if not out.is_dir() or (any(out.iterdir()) and not (out / "model.bin").is_file()):
        raise ExportError(f"{out}: holds files but no CTranslate2 model.bin; --force only replaces an earlier "
                          "export, never other files")


def domain_prompts(final: Path, language: str) -> dict:
    """{domain: {"tokens": [...], "ids": [...]}} for the prompt the model was trained with; a
    model trained with --domain-conditioning none has one prompt, under "none"."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(final)
    config = json.loads((final / "config.json").read_text())
    if config.get("domain_conditioning", "token") == "none":
        ids = prompt_ids(tokenizer, language, None)
        return {"none": {"tokens": tokenizer.convert_ids_to_tokens(ids), "ids": ids}}
    domains = model_domains(config, tokenizer.get_vocab())
    if not domains or not all(domain_token(d) in tokenizer.get_vocab() for d in domains):
        raise ExportError(f"{final}: the tokenizer has no domain tokens; not a model trained by train_loop.py")
    out = {}
    for domain in domains:
        ids = prompt_ids(tokenizer, language, domain)
        out[domain] = {"tokens": tokenizer.convert_ids_to_tokens(ids), "ids": ids}
    return out


def export(final: Path, out: Path, quantization: str = "float32", language: str = "ko", force: bool = False) -> Path:
    """Convert `final` into `out`; returns `out`."""
    check_source(final)
    check_target(final, out, force)
    prompts = domain_prompts(final, language)
    from ctranslate2.converters import TransformersConverter

    TransformersConverter(str(final), copy_files=list(COPIED)).convert(str(out), quantization=quantization,
                                                                       force=force)
    set_language_ids(out)
    strip_space_before_domain_tokens(out / "tokenizer.json")
    (out / PROMPTS_FILE).write_text(json.dumps(prompts, ensure_ascii=False, indent=1))
    return out


def set_language_ids(out: Path) -> None:
    """Write the language token ids into the export's config.json when the converter found none.

    ctranslate2 4.8's converter reads them from `generation_config.lang_to_id` or the tokenizer's
    `additional_special_tokens`, neither of which transformers 5 exposes, and writes `[]`: then
    faster-whisper's language detection (its default when no `language=` is given) raises
    IndexError.
    """
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    config = json.loads((out / "config.json").read_text())
    if config.get("lang_ids"):
        return
    vocab = json.loads((out / "vocabulary.json").read_text())
    ids = {token: i for i, token in enumerate(vocab)}
    config["lang_ids"] = sorted(ids[f"<|{code}|>"] for code in LANGUAGES if f"<|{code}|>" in ids)
    (out / "config.json").write_text(json.dumps(config, indent=2))


def strip_space_before_domain_tokens(path: Path) -> None:
    """Mark the domain tokens `lstrip` in the exported tokenizer.json.

    faster-whisper encodes `transcribe(prefix=P)` as `" " + P`: without lstrip the space becomes
    its own token (220) between <|notimestamps|> and the domain token, a prompt the model never
    saw in training; with it, `prefix="<|domain:dyslexic|>"` sends exactly the trained prompt.
    """
    tokenizer = json.loads(path.read_text())
    for token in tokenizer.get("added_tokens", []):
        if token["content"].startswith("<|domain:"):
            token["lstrip"] = True
    path.write_text(json.dumps(tokenizer, ensure_ascii=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wdx.export_ct2", description=__doc__.split("\n\n")[0])
    parser.add_argument("final", type=Path, help="RUN/final (or any directory written by train_loop.py)")
    parser.add_argument("out", type=Path, help="output directory for the CTranslate2 model")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="float32",
                        help="weight type (int8 for CPUs, float16 / int8_float16 for GPUs)")
    parser.add_argument("--language", default="ko", help="language token of the prompt")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    try:
        out = export(args.final, args.out, args.quantization, args.language, args.force)
    except (ExportError, OSError) as exc:
        print(f"wdx.export_ct2: error: {exc}", file=sys.stderr)
        return 1
    print(f"{out}: CTranslate2 model ({args.quantization}); prompts per domain in {out / PROMPTS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
