"""The domain-token rows as their own parameter, and a loss that spends memory only where it must.

The two domain tokens are the only rows of the (tied) embedding that train. Training them
through a gradient mask on the whole matrix gives 66 M parameters of large-v3 fp32
gradients, AdamW state and an all-reduce each step for 2 rows that move. Here the big
matrix stays frozen (and may be held in the compute dtype) and the k new rows are a
`k x d_model` Parameter, used at both ends the tied matrix is used: the decoder's input
lookup and the output projection. `final/` gets them merged back (wdx.train.export), so exported
models are plain Whisper.

The training loss never builds the batch x vocabulary logits: the decoder states of the
label positions only are projected, a chunk at a time, and each chunk's gradient is taken
on the spot (the loss is the last operation of the step), so no chunk's logits outlive it.

The encoder can also start above its frozen blocks: `prefix_states` (what wdx.train.encoder_cache
stored: the output of the conv stem, positions and the frozen blocks) skip straight to the
trained blocks, so a cached step never runs what cannot change.
"""

from __future__ import annotations

import copy
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers import WhisperForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput

CHUNK_LOGIT_BYTES = 128 * 2**20  # fp32 logits of one chunk; peak transient is ~2.5x this
EMBEDDING_KEY = "model.decoder.embed_tokens.weight"
ROWS_KEY = "model.decoder.embed_tokens.domain_rows"


class DomainEmbedding(nn.Module):
    """The frozen embedding, with ids >= `first` looked up in `domain_rows` instead."""

    def __init__(self, embedding: nn.Embedding, domain_rows: nn.Parameter, first: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.weight, self.domain_rows, self.first = embedding.weight, domain_rows, first

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = F.embedding(ids, self.weight, self.padding_idx)
        rows = self.domain_rows[(ids - self.first).clamp(min=0)]
        # type promotion keeps the rows' precision (fp32 rows, bf16 frozen matrix -> fp32)
        return torch.where((ids >= self.first).unsqueeze(-1), rows, out)


class DomainProjection(nn.Module):
    """The tied output projection: [frozen rows; domain rows] x hidden.

    `forward(hidden)` gives logits (generation); `forward(hidden, targets)` gives the sum of
    the targets' cross-entropy without keeping any logits (training and evaluation loss).
    The weights are read only inside this module's forward, where ZeRO-3 has gathered them.
    """

    def __init__(self, weight: nn.Parameter, domain_rows: nn.Parameter | None, first: int) -> None:
        super().__init__()
        self.weight, self.first = weight, first
        if domain_rows is None:  # no domain tokens: an empty, unsaved stand-in keeps one code path
            self.register_buffer("domain_rows", weight.new_zeros(0, weight.shape[1]), persistent=False)
        else:
            self.domain_rows = domain_rows
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return torch.cat([F.linear(hidden, self.weight[: self.first]), F.linear(hidden, self.domain_rows)], -1)
        dtype = (torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type)
                 else hidden.dtype)
        chunk = max(1, CHUNK_LOGIT_BYTES // (4 * self.out_features))
        return _ChunkedCrossEntropy.apply(hidden, self.weight[: self.first], self.domain_rows, targets, dtype, chunk,
                                          torch.is_grad_enabled())


class _ChunkedCrossEntropy(torch.autograd.Function):
    """sum_i CE(softmax([W; R] h_i), t_i), chunk by chunk; the gradients for h and R are
    computed in the forward pass, so backward only scales them.

    Numerics follow what autocast would do with `linear` + `.float()` + `cross_entropy`:
    products in `dtype` (bf16/fp16 under autocast), softmax and sums in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, rows, targets, dtype, chunk, grad):
        # needs_input_grad says whether an input requires grad, even under torch.no_grad() (the eval
        # loss); `grad` is whether the caller records a graph (forward itself always runs without one)
        need_h, need_rows = grad and ctx.needs_input_grad[0], grad and ctx.needs_input_grad[2]
        w, r = weight.to(dtype), rows.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_rows = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device) if need_rows else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start: start + chunk].to(dtype), targets[start: start + chunk]
            logits = torch.cat([h @ w.T, h @ r.T], dim=1).float()
            lse = logits.logsumexp(dim=1)
            total += (lse - logits.gather(1, t.unsqueeze(1)).squeeze(1)).sum()
            if need_h or need_rows:
                g = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place
                g[torch.arange(len(t), device=g.device), t] -= 1
                g = g.to(dtype)
                if need_h:
                    grad_h[start: start + chunk] = g[:, : w.shape[0]] @ w + g[:, w.shape[0]:] @ r
                if need_rows:
                    grad_rows += (g[:, w.shape[0]:].T @ h).float()
        ctx.save_for_backward(grad_h, grad_rows)
        ctx.rows_dtype = rows.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_rows = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_total.to(grad_h.dtype), None,
                None if grad_rows is None else (grad_rows * grad_total).to(ctx.rows_dtype),
                None, None, None, None)


def _whisper_signature_and(*names: str) -> inspect.Signature:
    """WhisperForConditionalGeneration.forward's signature with keyword-only `names` added."""
    sig = inspect.signature(WhisperForConditionalGeneration.forward)
    params = list(sig.parameters.values())
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in names]
    plain = [p for p in params if p.kind is not p.VAR_KEYWORD]
    return sig.replace(parameters=[*plain, *extra, *(p for p in params if p.kind is p.VAR_KEYWORD)])


class DomainWhisper(WhisperForConditionalGeneration):
    """Whisper whose forward also takes label positions: then it returns the summed token
    cross-entropy of those positions (fp32 scalar), with no KV cache and no full logits.

    Called through the (DDP/DeepSpeed) wrapper like any forward, so gradient hooks and ZeRO-3
    gathering behave as usual. Without `label_positions` it is plain Whisper (generation).
    `prefix_states` (instead of `input_features`) are the output of the first
    `frozen_prefix` encoder blocks, set by wdx.model.whisper.freeze_except.
    """

    frozen_prefix = 0  # encoder blocks below the first trained one

    def __init__(self, config) -> None:
        super().__init__(config)
        # SpecAugment comes from wdx.data.augment alone (per sample, as --spec-augment says, applied in
        # wdx.scoring.forward.model_input); WhisperModel would mask again whenever the base model's config
        # has apply_spec_augment. The config keeps the flag: exported models are plain Whisper.
        self.model._mask_input_features = _unmasked

    def forward(self, *args, label_positions: torch.Tensor | None = None, label_ids: torch.Tensor | None = None,
                prefix_states: torch.Tensor | None = None, **kwargs):
        if prefix_states is not None:
            kwargs["encoder_outputs"] = self.encode(prefix_states=prefix_states)
        if label_positions is None:
            return super().forward(*args, **kwargs)
        kwargs.pop("use_cache", None)
        out = self.model(*args, use_cache=False, return_dict=True, **kwargs)
        hidden = out.last_hidden_state.flatten(0, 1).index_select(0, label_positions)
        return self.proj_out(hidden, label_ids)

    # transformers checks generate()'s keyword arguments against forward's signature: show Whisper's
    forward.__signature__ = _whisper_signature_and("label_positions", "label_ids", "prefix_states")

    def encode(self, input_features: torch.Tensor | None = None, prefix_states: torch.Tensor | None = None,
               ) -> BaseModelOutput:
        """The encoder's output, from log-mel features or from the frozen prefix's states."""
        if prefix_states is None:
            return self.model.encoder(input_features)
        encoder = self.model.encoder
        # the residual stream's dtype from audio: the positions' (fp32 under autocast, where the
        # frozen weights are bf16; bf16 under DeepSpeed's bf16 mode), not the cache's storage dtype
        hidden = prefix_states.to(encoder.embed_positions.weight.dtype)
        for layer in encoder.layers[self.frozen_prefix:]:
            hidden = layer(hidden, None)
        return BaseModelOutput(last_hidden_state=encoder.layer_norm(hidden))

    def encoder_prefix(self, input_features: torch.Tensor) -> torch.Tensor:
        """What `prefix_states` are: conv stem, positions and the frozen blocks, exactly as
        WhisperEncoder.forward computes them (no dropout or layer drop: the cache refuses both)."""
        encoder = self.model.encoder
        hidden = F.gelu(encoder.conv2(F.gelu(encoder.conv1(input_features)))).permute(0, 2, 1)
        positions = torch.arange(encoder.embed_positions.num_embeddings, device=hidden.device)
        hidden = hidden + encoder.embed_positions(positions)
        for layer in encoder.layers[: self.frozen_prefix]:
            hidden = layer(hidden, None)
        return hidden

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saved as plain Whisper, the domain rows merged into the embedding."""
        plain = plain_whisper(self.config, self.generation_config, self.state_dict())
        return plain.save_pretrained(save_directory, *args, **kwargs)


def _unmasked(input_features: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    return input_features


def install_domain_rows(model: WhisperForConditionalGeneration, first: int) -> nn.Parameter:
    """Move embedding rows `first`.. into their own Parameter, shared by the input lookup
    and the output projection (the way the matrix itself is tied)."""
    decoder = model.model.decoder
    weight = decoder.embed_tokens.weight
    if first == weight.shape[0]:  # no domain rows (--domain-conditioning none): the embedding as it is
        model.proj_out = DomainProjection(weight, None, first)
        return model.proj_out.domain_rows
    rows = nn.Parameter(weight.detach()[first:].clone().float())
    decoder.embed_tokens = DomainEmbedding(decoder.embed_tokens, rows, first)
    model.proj_out = DomainProjection(weight, rows, first)
    return rows



def plain_whisper(config, generation_config, state_dict: dict[str, torch.Tensor]) -> WhisperForConditionalGeneration:
    """A plain WhisperForConditionalGeneration holding a DomainWhisper's `state_dict`, the
    domain rows written into the last rows of the embedding (what exported models carry).
    Its tensors are `state_dict`'s own (no copy) except the embedding."""
    state = {k: v for k, v in state_dict.items() if not k.startswith("proj_out.")}
    rows = state.pop(ROWS_KEY, None)
    if rows is not None:
        embedding = state[EMBEDDING_KEY].clone()
        embedding[embedding.shape[0] - rows.shape[0]:] = rows.to(embedding.dtype)
        state[EMBEDDING_KEY] = embedding
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(copy.deepcopy(config))
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    empty = [n for n, p in model.named_parameters() if p.is_meta]
    if empty:
        raise ValueError(f"no weights for {empty[:3]}")
    model.generation_config = copy.deepcopy(generation_config)
    return model.eval()  # as from_pretrained returns it
