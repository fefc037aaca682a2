"""Model FLOPs of one training sample, counted from Whisper's geometry (matmuls only).

A matmul of [m, k] x [k, n] is 2mkn FLOPs forward. Backward costs one more such matmul for
the input's gradient where the input needs one, and one more for the weight's gradient
where the weight trains. With this project's freeze that means:
- encoder: the conv stem and the frozen blocks below the first trained block run forward
  only; trained blocks forward + both gradients (3x);
- decoder: the domain-token rows at its input train and the trained encoder blocks below
  need gradients through every cross-attention, so every decoder block runs its input
  gradients (frozen 2x, trained 3x); the output projection runs at label positions only,
  forward and input gradient (2x; its weight gradient is the two domain rows' only).
With --encoder-cache a step starts from the frozen blocks' output: no conv stem, no frozen
encoder block (`cache_bound`).
Attention score and weighting matmuls have no weights: forward + 2 gradients when they
are on the gradient's path. LayerNorm, softmax, GELU and the loss are left out (<2 %).
"""

from __future__ import annotations

from transformers import WhisperConfig

ENCODER_FRAMES = 3000  # mel frames in; the conv stem halves them


def _block(t: int, d: int, ffn: int, ctx: int | None = None) -> dict[str, float]:
    """Forward FLOPs of one block's weighted matmuls and attention matmuls, split so the
    backward multipliers can differ. `ctx`: encoder frames for a decoder block's cross-attention."""
    weighted = 8 * t * d * d + 4 * t * d * ffn  # q, k, v, o + fc1, fc2
    attention = 4 * t * t * d
    cross_kv = 0.0
    if ctx is not None:
        weighted += 4 * t * d * d  # cross-attention q and o
        cross_kv = 4 * ctx * d * d  # cross-attention k and v over the encoder output
        attention += 4 * t * ctx * d
    return {"weighted": weighted, "attention": attention, "cross_kv": cross_kv}


def train_flops_per_sample(config: WhisperConfig, label_tokens: int, encoder_trained: int,
                           decoder_trained: int) -> dict[str, float]:
    """FLOPs of forward + backward for one clip, by part; "total" is their sum."""
    d, ffn, n_mels = config.d_model, config.encoder_ffn_dim, config.num_mel_bins
    frames = ENCODER_FRAMES // 2
    out = {"conv_stem": 2 * ENCODER_FRAMES * 3 * n_mels * d + 2 * frames * 3 * d * d}
    enc = _block(frames, d, ffn)
    frozen_enc = config.encoder_layers - encoder_trained
    out["encoder_frozen"] = frozen_enc * (enc["weighted"] + enc["attention"])
    out["encoder_trained"] = encoder_trained * 3 * (enc["weighted"] + enc["attention"])
    length = label_tokens + 5  # decoder inputs: the 5-token prompt + the text (labels are as many)
    dec = _block(length, d, config.decoder_ffn_dim, ctx=frames)
    grads_to_encoder = encoder_trained > 0
    frozen_dec = config.decoder_layers - decoder_trained
    kv_mult_frozen = 2 if grads_to_encoder else 1
    out["decoder_frozen"] = frozen_dec * (2 * dec["weighted"] + 3 * dec["attention"] + kv_mult_frozen * dec["cross_kv"])
    out["decoder_trained"] = decoder_trained * 3 * (dec["weighted"] + dec["attention"] + dec["cross_kv"])
    out["output_projection"] = 2 * 2 * label_tokens * d * config.vocab_size
    out["total"] = sum(out.values())
    return out


def cache_bound(config: WhisperConfig, label_tokens: int, encoder_trained: int, decoder_trained: int) -> float:
    """The most --encoder-cache can speed a step up: its FLOPs from audio / its FLOPs from cached states."""
    f = train_flops_per_sample(config, label_tokens, encoder_trained, decoder_trained)
    return f["total"] / (f["total"] - f["conv_stem"] - f["encoder_frozen"])
