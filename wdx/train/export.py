"""final/: a standard Hugging Face Whisper directory, plus a model card; and the Hub upload."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import WhisperForConditionalGeneration

from wdx.config import ConfigError
from wdx.model.domains import DOMAINS, domain_token
from wdx.model.lm_head import EMBEDDING_KEY, ROWS_KEY, plain_whisper
from wdx.scoring.metrics import format_table
from wdx.train.accel import whole_model_init

log = logging.getLogger(__name__)


def write_final(accelerator, model, tokenizer, feature_extractor, out: str | Path, config_json: str,
                eval_results: dict | None, best: dict | None = None) -> Path:
    """Save a standard, loadable Whisper directory; all processes call this (ZeRO-3 gathers).

    The weights are the base model's, read again in fp32, with the trained tensors put in
    and the domain-token rows merged into the embedding: frozen weights are the base's bit
    for bit even when training held them in bf16, and the directory loads as a plain
    WhisperForConditionalGeneration (no wdx code needed to run it).
    """
    out = Path(out)
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # gathers 16-bit weights under ZeRO-3
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        cfg = json.loads(config_json)
        trained = {n for n, p in unwrapped.named_parameters() if p.requires_grad}
        with whole_model_init(accelerator):  # only this process loads: no ZeRO-3 partitioning
            final = final_model(cfg["base_model"], unwrapped, {n: state_dict[n] for n in trained})
        final.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        feature_extractor.save_pretrained(out)
        (out / "train_config.json").write_text(config_json)
        (out / "README.md").write_text(model_card(cfg, eval_results, best,
                                                        tuple(getattr(final.config, "domains", None) or DOMAINS)))
    accelerator.wait_for_everyone()
    return out


def final_model(base_model: str, trained_model, trained: dict[str, torch.Tensor]) -> WhisperForConditionalGeneration:
    """The base model's weights, read again in fp32, with the `trained` tensors in place."""
    state = WhisperForConditionalGeneration.from_pretrained(base_model, dtype=torch.float32).state_dict()
    embedding = state[EMBEDDING_KEY]
    grow = trained_model.config.vocab_size - embedding.shape[0]  # (a ZeRO-3 parameter has no shape here)
    if grow:  # the domain tokens' rows, filled from the trained rows by plain_whisper
        state[EMBEDDING_KEY] = torch.cat([embedding, embedding.new_zeros(grow, embedding.shape[1])])
    unknown = sorted(set(trained) - set(state) - {ROWS_KEY})
    if unknown:
        raise RuntimeError(f"--base-model {base_model}: has no {unknown[:3]}; cannot write final/")
    state.update({n: t.float() for n, t in trained.items()})
    return plain_whisper(trained_model.config, trained_model.generation_config, state)


def prompt_lines(conditioning: str, domains: tuple[str, ...] = DOMAINS) -> list[str]:
    """How to prompt the model, as trained."""
    if conditioning == "none":
        return ["Trained without a domain token (`--domain-conditioning none`, the baseline): the prompt is", "",
                "`<|startoftranscript|> <|ko|> <|transcribe|> <|notimestamps|>`", "",
                "Transcribe with `python -m wdx.transcribe` from the training repository, or pass that prompt as "
                "`decoder_input_ids` to `GenerationMixin.generate`.", ""]
    return ["The decoder is conditioned on the speaker domain: the prompt is", "",
            "`<|startoftranscript|> <|ko|> <|transcribe|> <|notimestamps|> <|domain:X|>`", "",
            f"with X in {', '.join(domain_token(d) for d in domains)}. Transcribe with `python -m wdx.transcribe` "
            "from the training repository, or pass that prompt as `decoder_input_ids` to "
            "`GenerationMixin.generate`.", ""]


def transcript_lines(convention: str, dual: str) -> list[str]:
    """What the transcripts it was trained on keep: what its output will keep."""
    if convention == "plain":
        return []
    return [f"Trained on transcripts in the `{convention}` convention (KsponSpeech / AI Hub markup converted by "
            f"wdx/data/conventions.py): the {dual} side of dual transcriptions; fillers, repetitions and fragments "
            "kept as said; noise and event tags removed.", ""]


def model_card(cfg: dict, eval_results: dict | None, best: dict | None = None,
               domains: tuple[str, ...] = DOMAINS) -> str:
    """A short card: what the model is, how it was trained, how to prompt it, how it scored.
    `best`: {step, metric, value} when these are an earlier checkpoint's weights (early stopping)."""
    settings = {k: cfg[k] for k in ("base_model", "language", "learning_rate", "per_device_train_batch_size",
                                    "grad_accum", "num_train_epochs", "max_steps", "warmup_steps",
                                    "lr_scheduler_type", "domain_conditioning", "text_convention",
                                    "dual_transcription", "train_encoder_layers",
                                    "train_decoder_layers", "mixed_precision", "seed", "metric_for_best_model",
                                    "early_stopping_patience", "early_stopping_threshold") if k in cfg}
    which = (f"These are the weights of step {best['step']}, the best evaluation by {best['metric']} "
             f"({best['value']:.4f}); training stopped early. " if best else "")
    table = format_table(eval_results) if eval_results else "(no evaluation was run)"
    prompt = prompt_lines(cfg.get("domain_conditioning", "token"), domains)
    return "\n".join([
        "---", "language: ko", "tags: [whisper, automatic-speech-recognition, dyslexia]", "---", "",
        f"# {cfg.get('run_name', 'whisper')}", "",
        f"Whisper fine-tuned from `{cfg.get('base_model')}` on Korean speech of typical and dyslexic readers. "
        + prompt[0], *prompt[1:],
        *transcript_lines(cfg.get("text_convention", "plain"), cfg.get("dual_transcription", "pronunciation")),
        "## Evaluation (CER without punctuation and spaces; WER on words)", "", which + "Held-out split:", "",
        "```", table, "```", "",
        "## Training settings", "", "```json", json.dumps(settings, indent=1), "```", "",
    ])


def check_hub_credentials(verify: bool) -> str:
    """Fail at start-up, not after training, when the Hub upload cannot work.

    The token comes from HF_TOKEN or the login store only; it is never logged or saved.
    """
    from huggingface_hub import get_token, whoami

    if get_token() is None:
        raise ConfigError("--push-to-hub/--login-hf: no Hugging Face token; set HF_TOKEN or run `hf auth login`")
    if not verify:
        return "token present"
    try:
        return whoami()["name"]
    except Exception as exc:  # network, auth: any failure means the push would fail too
        raise ConfigError(f"--login-hf: the Hub did not accept the token ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def push(folder: str | Path, repo_id: str, private: bool) -> str:
    """Upload `folder` to the Hub; credentials come from HF_TOKEN or the login store."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                      commit_message="Upload fine-tuned Whisper (wdx)")
    return str(url)
