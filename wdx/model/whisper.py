"""Model set-up: load Whisper, add the domain tokens, choose what trains.

Three pitfalls of the usual scripts are avoided here, each with a test (DESIGN.md):
- a tokenizer that lists fewer ids than the model's vocab (timestamps missing) would give
  the domain tokens ids the model already uses, and `resize_token_embeddings(len(tok))`
  would shrink the matrix: the tokenizer is first filled up to the model's vocab;
- tokens added after the freeze would make the whole embedding (and the tied output
  projection) trainable: the domain-token rows become their own parameter (wdx.model.lm_head)
  and the embedding is frozen whole;
- dropout is read by the modules at construction, so it is set in the config before the
  model is built.
And one of transformers 5: `from_pretrained` loads in the checkpoint's dtype by default
(fp16 for openai/whisper-large-v3), which would leave the trained weights without fp32
masters; the model is loaded in fp32 and only frozen weights are narrowed (`cast_frozen`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import transformers
from transformers import AutoTokenizer, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

from wdx.model.domains import DOMAINS, PROMPT_TOKENS, ROWS_INIT, domain_token, model_domains
from wdx.model.lm_head import DomainEmbedding, DomainWhisper, install_domain_rows

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """--base-model cannot be loaded (one line, names the flag)."""


@dataclass
class Whisper:
    """Everything the loop needs about the model, built once."""

    model: WhisperForConditionalGeneration
    tokenizer: object
    feature_extractor: WhisperFeatureExtractor
    domain_token_ids: dict[str, int]
    new_token_rows: list[int]
    frozen_sha256: str = ""  # of the frozen weights as loaded (fp32); set by the loop before any cast


def quiet_libraries() -> None:
    """transformers' advisory warnings (generation length notices, ...) off; errors stay."""
    transformers.utils.logging.set_verbosity_error()


def tensors_sha256(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A hash of tensors' names and bytes, as held (dtype included)."""
    digest = hashlib.sha256()
    for name, tensor in named:
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy())  # a buffer: no copy
    return digest.hexdigest()


def frozen_sha256(model: torch.nn.Module) -> str:
    """The frozen weights' hash: what a checkpoint's trained tensors were trained on top of.
    The embedding's domain-token rows are left out: they train (as their own parameter, see
    wdx.model.lm_head), and their seeded starting values are no part of the base."""
    embedding = model.get_input_embeddings()
    first = embedding.first if isinstance(embedding, DomainEmbedding) else None
    return tensors_sha256((n, p[:first] if p is getattr(embedding, "weight", None) else p)
                          for n, p in model.named_parameters() if not p.requires_grad)


def load_base(base_model: str, dropout: float = 0.0) -> tuple[WhisperForConditionalGeneration, object,
                                                                WhisperFeatureExtractor]:
    """Load model, tokenizer and feature extractor from a hub id or a local directory."""
    if looks_like_path(base_model) and not os.path.isdir(base_model):
        what = "is a file, not a model directory" if os.path.exists(base_model) else "no such directory"
        raise ModelLoadError(f"--base-model {base_model}: {what}")
    try:
        config = WhisperConfig.from_pretrained(base_model)
        config.dropout = dropout  # must be set before the modules are built
        model = DomainWhisper.from_pretrained(base_model, config=config, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(base_model)
        feature_extractor = WhisperFeatureExtractor.from_pretrained(base_model)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"--base-model {base_model}: cannot load a Whisper model ({first})") from None
    return model, tokenizer, feature_extractor


def looks_like_path(name: str) -> bool:
    """A local path rather than a Hub id (`owner/name`): transformers reports a missing
    directory as "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"."""
    return (name.startswith((os.sep, ".", "~")) or name.count("/") > 1 or os.path.exists(name)
            or name.endswith(os.sep))


def fill_tokenizer_to_vocab(tokenizer, vocab_size: int) -> int:
    """Add the ids the model has but the tokenizer does not list; returns how many.

    Whisper checkpoints whose tokenizer.json stops at <|notimestamps|> are missing exactly
    the timestamp tokens <|0.00|> ... <|30.00|>; anything else gets neutral names.
    """
    missing = vocab_size - len(tokenizer)
    if missing <= 0:
        return 0
    last = tokenizer.convert_ids_to_tokens(len(tokenizer) - 1)
    names = ([f"<|{0.02 * i:.2f}|>" for i in range(missing)] if last == "<|notimestamps|>"
             else [f"<|unused:{len(tokenizer) + i}|>" for i in range(missing)])
    tokenizer.add_tokens(names, special_tokens=False)
    return missing


def add_domain_tokens(model: WhisperForConditionalGeneration, tokenizer, tokens: tuple[str, ...],
                      spread: float = 0.0, seed: int = 0) -> tuple[dict[str, int], list[int]]:
    """Give each domain token an id >= the model's vocab size and a trainable row of its own
    (`tokens` empty: none; the model still gets the loss's domain-row machinery, with no rows).

    New rows start near the mean of the existing rows, a neutral token the decoder already
    knows how to read, each moved by `spread` per-dimension standard deviations of seeded
    Gaussian noise: rows that start identical get identical gradients from identical
    prompts' neighbours and separate only as fast as the data tells them apart. A base model that
    already has them (a previous run's final/) keeps its trained rows, which train on.
    """
    vocab = model.get_input_embeddings().weight.shape[0]
    filled = fill_tokenizer_to_vocab(tokenizer, vocab)
    if filled:
        log.info("tokenizer listed %d ids fewer than the model's vocab (%d); filled them in", filled, vocab)
    if not tokens:
        size = model.get_input_embeddings().weight.shape[0]
        install_domain_rows(model, size)
        return {}, []
    tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)}, replace_extra_special_tokens=False)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tokens}
    if len(tokenizer) > vocab:
        with torch.no_grad():
            old = model.get_input_embeddings().weight
            mean, std = old.mean(dim=0), old.std(dim=0)
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            new = model.get_input_embeddings().weight[vocab:]
            noise = torch.randn(new.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
            new.copy_(mean + spread * std * noise.to(mean.dtype))
    size = model.get_input_embeddings().weight.shape[0]
    rows = sorted(ids.values())
    if rows != list(range(size - len(rows), size)):
        raise ModelLoadError(f"domain tokens {ids} are not the last rows of the {size}-row embedding")
    install_domain_rows(model, rows[0])
    model.config.vocab_size = size
    return ids, rows


def freeze_except(model: WhisperForConditionalGeneration, encoder_layers: int, decoder_layers: int,
                  ) -> dict[str, list[torch.nn.Parameter]]:
    """Freeze everything, then unfreeze the chosen parts; returns the trainable params by group.

    Trains: the last `encoder_layers` encoder blocks (whole blocks); attention (self and
    cross) and MLP of the last `decoder_layers` decoder blocks; the domain-token rows (their
    own parameter; the embedding and its tied output projection stay put). Everything of the
    encoder below its first trained block is its frozen prefix (`model.frozen_prefix` blocks).
    """
    model.requires_grad_(False)
    encoder, decoder = model.model.encoder, model.model.decoder
    groups: dict[str, list[torch.nn.Parameter]] = {"encoder_blocks": [], "decoder_attention": [], "decoder_mlp": [],
                                                   "domain_token_rows": []}
    for block in list(encoder.layers)[len(encoder.layers) - encoder_layers:] if encoder_layers else []:
        groups["encoder_blocks"] += list(block.parameters())
    for block in list(decoder.layers)[len(decoder.layers) - decoder_layers:] if decoder_layers else []:
        groups["decoder_attention"] += [*block.self_attn.parameters(), *block.encoder_attn.parameters()]
        groups["decoder_mlp"] += [*block.fc1.parameters(), *block.fc2.parameters()]
    if isinstance(decoder.embed_tokens, DomainEmbedding):
        groups["domain_token_rows"].append(decoder.embed_tokens.domain_rows)
    model.frozen_prefix = max(0, len(encoder.layers) - encoder_layers)  # where wdx.train.encoder_cache cuts the encoder
    for params in groups.values():
        for p in params:
            p.requires_grad_(True)
    return groups


def count_trainable(groups: dict[str, list[torch.nn.Parameter]]) -> dict[str, int]:
    """Parameters that can change, by group."""
    return {name: sum(p.numel() for p in params) for name, params in groups.items()}


def cast_frozen(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Hold frozen weights in the compute dtype; returns the bytes saved.

    Under autocast every frozen matmul weight is rounded to `dtype` at each use anyway
    (and a copy kept for backward), so storing it rounded changes no product. Layer norms
    and positional embeddings stay fp32: autocast runs layer norm in fp32, and fp32
    positions keep the residual stream in fp32 as before. Trainable weights keep fp32.
    """
    saved, seen = 0, set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm) or name.endswith("embed_positions"):
            seen.update(id(p) for p in module.parameters(recurse=False))
            continue
        for p in module.parameters(recurse=False):
            if id(p) in seen or p.requires_grad or not p.is_floating_point() or p.dtype == dtype:
                continue
            seen.add(id(p))
            saved += p.numel() * (p.element_size() - torch.finfo(dtype).bits // 8)
            p.data = p.data.to(dtype)
    return saved


def max_text_tokens(max_target_positions: int) -> int:
    """Text tokens that fit the decoder: the inputs are the 5 prompt ids + the text
    (<|endoftext|> is a label only, never an input). Also the most tokens generation may
    add after the prompt (transformers refuses prompt + max_new_tokens > the decoder's size)."""
    return max_target_positions - (len(PROMPT_TOKENS) + 1)


def set_generation_config(model: WhisperForConditionalGeneration, tokenizer, language: str) -> None:
    """Transcribe in `language`, no timestamps: what exported models do in a pipeline too.

    The in-loop evaluation passes its own length (--generation-max-length); the stored one is
    what the decoder holds after the prompt, so an exported model is never capped at the
    evaluation's length.
    """
    gc = model.generation_config
    gc.language, gc.task, gc.return_timestamps = language, "transcribe", False
    gc.decoder_start_token_id = tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    gc.eos_token_id = gc.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    # greedy, up to the whole context (prompt included): the transformers ASR pipeline would
    # otherwise use its own defaults (5 beams, 256 new tokens). One length only: with both
    # max_length and max_new_tokens stored, transformers warns on every call.
    gc.num_beams, gc.max_length, gc.max_new_tokens = 1, model.config.max_target_positions, None
    gc.forced_decoder_ids = None  # the prompt is passed explicitly (collate.prompt_ids)
    if not getattr(gc, "lang_to_id", None):
        gc.lang_to_id = {t: tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens
                         if len(t) <= 8 and t.startswith("<|") and t[2:-2].isalpha() and t[2:-2].islower()}
    if not getattr(gc, "task_to_id", None):
        gc.task_to_id = {t: tokenizer.convert_tokens_to_ids(f"<|{t}|>") for t in ("transcribe", "translate")}
    if getattr(gc, "no_timestamps_token_id", None) is None:
        gc.no_timestamps_token_id = tokenizer.convert_tokens_to_ids("<|notimestamps|>")
    # Every id after <|notimestamps|> is a timestamp or a domain token: the domain comes
    # from the prompt and timestamps were never trained, so neither may be generated.
    after = range(tokenizer.convert_tokens_to_ids("<|notimestamps|>") + 1, model.get_input_embeddings().num_embeddings)
    gc.suppress_tokens = sorted(set(gc.suppress_tokens or []) | set(after))
    if getattr(gc, "is_multilingual", None) is None:
        gc.is_multilingual = True


CONDITIONINGS = ("token", "none")


def setup(base_model: str, *, language: str, encoder_layers: int, decoder_layers: int, dropout: float = 0.0,
          conditioning: str = "token", rows_init: float = ROWS_INIT, seed: int = 0, domains: tuple[str, ...] = DOMAINS,
          ) -> tuple[Whisper, dict[str, list[torch.nn.Parameter]]]:
    """Load, add domain tokens (unless `conditioning` is "none": the same recipe without
    them, the baseline that measures what the token adds), then freeze (in that order: see
    the module docstring). The choice and the domains are stored in the config (config.json
    of final/). A base model that has domains of its own (a previous run's final/) keeps them,
    trained rows and all; `domains` it lacks are added after them."""
    model, tokenizer, feature_extractor = load_base(base_model, dropout)
    kept = model_domains(model.config, tokenizer.get_vocab())
    names = (*kept, *(d for d in domains if d not in kept)) if conditioning == "token" else ()
    ids, new_rows = add_domain_tokens(model, tokenizer, tuple(domain_token(d) for d in names), rows_init, seed)
    model.config.domain_conditioning, model.config.domains = conditioning, list(names)
    set_generation_config(model, tokenizer, language)
    groups = freeze_except(model, encoder_layers, decoder_layers)
    return Whisper(model, tokenizer, feature_extractor, ids, new_rows), groups
