"""faster-whisper on a `wdx.export_ct2` directory, prompted as the model was trained.

    python -m wdx.deploy EXPORT AUDIO [AUDIO ...] [--domain dyslexic] [--compute-type int8]

    from faster_whisper import BatchedInferencePipeline
    from wdx.deploy.faster_whisper import DomainWhisperModel

    model = DomainWhisperModel("export", domain="dyslexic", compute_type="int8")
    segments, _ = model.transcribe("reading.m4a", language="ko", without_timestamps=True,
                                   condition_on_previous_text=False)
    segments, _ = BatchedInferencePipeline(model).transcribe("reading.m4a", language="ko", batch_size=8)

faster-whisper's own `prefix=` reaches the first 30 s window only, and its batched pipeline
ignores it. `DomainWhisperModel` puts the domain token into the prompt of every window, in
both, and takes it out of what the decoder returns (its id lies above the timestamps, and
faster-whisper would read it as one). Every domain token is suppressed in generation (and
every timestamp token when the prompt has <|notimestamps|>): faster-whisper's own
`suppress_tokens` holds neither, and a domain token generated mid-text would be read as a
timestamp, splitting or dropping text. Word timestamps are aligned under the same prompt
(faster-whisper's alignment leaves the domain token out). It also pads the last window's log-mel frames with the
log-mel of silence, as Whisper, transformers and training do (faster-whisper pads with 0.0,
which changes some transcripts). This file needs only faster-whisper and the standard
library (no torch, no transformers): a deployment may copy it without wdx. The command line
decodes a file of at most 30 s in one window, a longer one with the batched pipeline and
faster-whisper's VAD (each speech chunk a window).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import json
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from faster_whisper import BatchedInferencePipeline, WhisperModel, decode_audio

PROMPTS_FILE = "domain_prompts.json"  # written by wdx.export_ct2
# what this file is tested with (requirements-deploy.txt): it reads faster-whisper's internals
TESTED = {"faster-whisper": "1.2.1", "ctranslate2": "4.8.5"}
SILENCE_FLOOR = -1.5  # (log10(1e-10) + 4) / 4: the normalised log-mel of digital silence
WINDOW_FRAMES = 3000  # log-mel frames of Whisper's 30 s window
GREEDY = dict(beam_size=1, temperature=0.0)  # as wdx decodes; faster-whisper's default is 5 beams + fallback
# DomainWhisperModel.transcribe's defaults: the prompt the model was trained on (no timestamps, no previous text in
# front of it) and greedy decoding, as training evaluated; faster-whisper's own give prompts it never saw
TRAINED = dict(without_timestamps=True, condition_on_previous_text=False, **GREEDY)


class DomainWhisperModel(WhisperModel):
    """faster_whisper.WhisperModel whose every decoding prompt ends with the domain token."""

    def __init__(self, model_dir: str | Path, domain: str | None = None, **kwargs) -> None:
        check_versions()
        domain_ids = domain_suffix(Path(model_dir), domain)  # refused before the model loads
        super().__init__(str(model_dir), **kwargs)
        self.domain_ids = domain_ids
        vocab = self.hf_tokenizer.get_vocab()
        every_domain = sorted(i for token, i in vocab.items() if token.startswith("<|domain:"))
        notimestamps = vocab["<|notimestamps|>"]
        # timestamps: every id after <|notimestamps|> up to the first domain token (the end of the vocabulary)
        timestamps = range(notimestamps + 1, every_domain[0] if every_domain else self.hf_tokenizer.get_vocab_size())
        self.model = _WithoutDomainToken(self.model, self.domain_ids, every_domain, notimestamps, timestamps)
        self.feature_extractor = _LargestValue(self.feature_extractor)

    def transcribe(self, audio, *args, **kwargs):
        """faster-whisper's transcribe, with the decoding the model was trained and evaluated with
        as the default (`TRAINED`: the trained prompt, greedy, no fallback, no previous text); an
        argument that differs is honoured, with one warning naming it."""
        kwargs = inspect.signature(WhisperModel.transcribe).bind_partial(self, audio, *args, **kwargs).arguments
        kwargs = {k: v for k, v in kwargs.items() if k not in ("self", "audio")}
        differs = {k: v for k, v in kwargs.items() if k in TRAINED and v != TRAINED[k]}
        if differs:
            warnings.warn("DomainWhisperModel.transcribe: " + ", ".join(f"{k}={v!r}" for k, v in differs.items())
                          + " instead of the decoding the model was trained and evaluated with ("
                          + ", ".join(f"{k}={TRAINED[k]!r}" for k in differs) + ")", stacklevel=2)
        return super().transcribe(audio, **{**TRAINED, **kwargs})

    def get_prompt(self, tokenizer, previous_tokens, without_timestamps=False, prefix=None, hotwords=None):
        prompt = super().get_prompt(tokenizer, previous_tokens, without_timestamps, prefix, hotwords)
        at = prompt.index(tokenizer.sot) + len(tokenizer.sot_sequence) + int(without_timestamps)
        return prompt[:at] + self.domain_ids + prompt[at:]

    def encode(self, features: np.ndarray):
        # one sequential transcription of a file over 30 s: its windows are slices of one log-mel, whose
        # largest value sets the log-mel of silence (Whisper's clamp), not each window's own
        whole = self.feature_extractor.last
        long_file = whole is not None and whole[1] > WINDOW_FRAMES + 1
        return super().encode(pad_with_silence(features, whole[0] if long_file else None))


def check_versions() -> None:
    """Refuse, in one line, a faster-whisper or ctranslate2 this file was not tested with: it
    overrides `get_prompt` and reads the results of `model.generate`, which another version may
    change without an error, only wrong prompts or text."""
    for name, tested in TESTED.items():
        have = importlib.metadata.version(name)
        if have != tested:
            raise ValueError(f"{name} {have} is installed; wdx.deploy is tested with {name}=={tested} only "
                             "(pip install -r requirements-deploy.txt)")


def domain_suffix(model_dir: Path, domain: str | None) -> list[int]:
    """The ids the trained prompt has after <|notimestamps|>: the domain token, or nothing for a
    model trained with --domain-conditioning none."""
    path = model_dir / PROMPTS_FILE
    if not path.is_file():
        raise ValueError(f"{model_dir}: no {PROMPTS_FILE}; export the model with python -m wdx.export_ct2")
    prompts = json.loads(path.read_text())
    if "none" in prompts:
        if domain is not None:
            raise ValueError(f"{model_dir}: trained without domain tokens; pass no domain")
        return []
    if domain not in prompts:
        raise ValueError(f"{model_dir}: domain must be one of {', '.join(prompts)} (got {domain!r})")
    tokens = prompts[domain]["tokens"]
    return prompts[domain]["ids"][tokens.index("<|notimestamps|>") + 1:]


def pad_with_silence(features: np.ndarray, largest: float | None = None) -> np.ndarray:
    """Replace faster-whisper's padding (trailing frames of exactly 0.0 in every mel bin, which
    no real frame has) with the log-mel of silence: max(floor, maximum - 2), the maximum being
    `largest` (that of the whole file the window was cut from, as Whisper and transformers
    clamp a long input) or else each item's own (a clip of at most 30 s)."""
    features = np.array(features, dtype=np.float32, copy=True)
    for item in features.reshape(-1, *features.shape[-2:]):
        speech = np.flatnonzero(np.any(item != 0.0, axis=0))
        end = speech[-1] + 1 if len(speech) else 0
        if end < item.shape[-1]:
            top = largest if largest is not None else float(item[:, :end].max()) if end else None
            item[:, end:] = SILENCE_FLOOR if top is None else max(SILENCE_FLOOR, top - 2.0)
    return features


class _LargestValue:
    """faster-whisper's feature extractor, remembering (largest value, frames) of its last result."""

    def __init__(self, extractor) -> None:
        self._extractor, self.last = extractor, None

    def __getattr__(self, name: str):
        return getattr(self._extractor, name)

    def __call__(self, *args, **kwargs) -> np.ndarray:
        features = self._extractor(*args, **kwargs)
        self.last = (float(features.max()), features.shape[-1]) if features.size else None
        return features


class _WithoutDomainToken:
    """The ctranslate2 model, except that no domain token is generated (nor a timestamp when
    the prompt asks for none), results do not start with the prompt's domain token, and word
    timestamps are aligned under the trained prompt.

    ctranslate2 returns the prompt's tokens after the task token; a domain id is above the
    timestamp ids, so faster-whisper would take it for a timestamp and split segments at it.
    """

    def __init__(self, model, domain_ids: list[int], every_domain: list[int], notimestamps: int,
                 timestamps: range) -> None:
        self._model, self._ids = model, domain_ids
        self._every_domain, self._notimestamps, self._timestamps = list(every_domain), notimestamps, timestamps

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def generate(self, features, prompts, **kwargs):
        suppress = [*(kwargs.get("suppress_tokens") or []), *self._every_domain]
        if all(self._notimestamps in prompt for prompt in prompts):
            suppress += self._timestamps
        kwargs["suppress_tokens"] = sorted(set(suppress))
        results = self._model.generate(features, prompts, **kwargs)
        n = len(self._ids)
        if not n:
            return results
        out = []
        for r in results:
            starts = [ids[:n] == self._ids for ids in r.sequences_ids]
            out.append(SimpleNamespace(
                sequences_ids=[ids[n * s:] for ids, s in zip(r.sequences_ids, starts)],
                sequences=[tokens[n * s:] for tokens, s in zip(r.sequences, starts)],
                scores=r.scores, no_speech_prob=r.no_speech_prob))
        return out

    def align(self, features, start_sequence, text_tokens, num_frames, **kwargs):
        """faster-whisper's word timestamps: ctranslate2 aligns `start_sequence`, <|notimestamps|>,
        the text; the domain ids go in front of the text, so the attention is read under the
        prompt the model was trained on, and the row and probability of the domain token itself
        are taken out (the results then index the text alone, as faster-whisper expects)."""
        n = len(self._ids)
        if not n:
            return self._model.align(features, start_sequence, text_tokens, num_frames, **kwargs)
        results = self._model.align(features, start_sequence, [self._ids + list(t) for t in text_tokens], num_frames,
                                    **kwargs)
        return [SimpleNamespace(alignments=[(i - n, j) for i, j in r.alignments if i >= n],
                                text_token_probs=list(r.text_token_probs)[n:]) for r in results]


def transcribe(model: DomainWhisperModel, path: str, language: str = "ko", batch_size: int = 8) -> str:
    """One file's text: up to 30 s in one window, longer files through the batched pipeline with VAD."""
    audio = decode_audio(path)
    if len(audio) <= 30 * 16000:
        segments, _ = model.transcribe(audio, language=language)  # TRAINED by default
    else:
        segments, _ = BatchedInferencePipeline(model).transcribe(audio, language=language, batch_size=batch_size,
                                                                 **GREEDY)
    return " ".join(s.text.strip() for s in segments)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wdx.deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("export", help="a python -m wdx.export_ct2 output directory")
    parser.add_argument("audio", nargs="+", help="audio files (anything PyAV decodes), any length")
    parser.add_argument("--domain", help="domain token of the prompt (see EXPORT/domain_prompts.json; none for a "
                        "model trained without domain tokens)")
    parser.add_argument("--language", default="ko")
    parser.add_argument("--compute-type", default="int8", help="int8 on CPUs, float16 or int8_float16 on GPUs")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    try:
        model = DomainWhisperModel(args.export, domain=args.domain, device=args.device, compute_type=args.compute_type)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"wdx.deploy: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    failed = 0
    for path in args.audio:
        try:
            text = transcribe(model, path, args.language)
        except (OSError, ValueError) as exc:  # PyAV's errors are OSError / ValueError subclasses
            print(f"wdx.deploy: skipped {path}: {str(exc).splitlines()[0]}", file=sys.stderr)
            failed += 1
            continue
        print(f"{path}\t{text}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
