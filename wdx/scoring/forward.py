"""The model's two passes, shared by training, evaluation and inference: the teacher-forced
loss over the label tokens, and greedy generation from the training prompt
(<|startoftranscript|> <|ko|> <|transcribe|> <|notimestamps|> <|domain:X|>).
"""

from __future__ import annotations

import torch
import transformers

from wdx.data.collate import label_targets
from wdx.data.features import log_mel


def generate(model, features: torch.Tensor | None, prompts: torch.Tensor, max_new_tokens: int,
             synced_gpus: bool = False, encoder_outputs=None) -> torch.Tensor:
    """Greedy decoding from `prompts`; returns only the new tokens. Given `encoder_outputs`
    (computed once for several decodings, or from cached states), the encoder is not rerun.

    GenerationMixin.generate is called directly: Whisper's own `generate` rebuilds the
    prompt from its generation config and would drop the domain token. A fresh config
    keeps only the token ids and suppression lists; the length goes as `max_length` (prompt
    included), the one length final/ stores: given two, transformers warns on every call.
    """
    stored = model.generation_config
    # a final/ written before 2026-12-01 also stores max_new_tokens, which would win over max_length
    length = ({"max_new_tokens": max_new_tokens} if stored.max_new_tokens is not None
              else {"max_length": prompts.shape[1] + max_new_tokens})
    config = transformers.GenerationConfig(
        **length, do_sample=False, num_beams=1, eos_token_id=stored.eos_token_id,
        pad_token_id=stored.pad_token_id, decoder_start_token_id=stored.decoder_start_token_id,
        suppress_tokens=stored.suppress_tokens, begin_suppress_tokens=stored.begin_suppress_tokens)
    if encoder_outputs is not None:
        inputs = {"encoder_outputs": encoder_outputs}
    else:
        inputs = {"input_features": features, "attention_mask": torch.ones(features.shape[0], features.shape[-1],
                                                                           dtype=torch.long, device=features.device)}
    out = transformers.GenerationMixin.generate(model, decoder_input_ids=prompts, generation_config=config,
                                                synced_gpus=synced_gpus, **inputs)
    return out[:, prompts.shape[1]:]


def model_input(batch: dict, n_mels: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Where the encoder starts: log-mel of the audio, or the cached frozen-prefix states.

    Log-mel in the dtype of the model's weights (fp32 maths first; call it outside autocast):
    under DeepSpeed bf16/fp16 nothing casts the module's inputs. Cached states go as stored;
    the model casts them to its residual stream's dtype (DomainWhisper.encode).
    """
    if "encoder_states" in batch:
        return {"prefix_states": batch["encoder_states"]}
    features = log_mel(batch["audio"], n_mels, dtype)
    if "spec_time_mask" in batch:  # SpecAugment, as Whisper's _mask_input_features applies it (training only)
        features = features.masked_fill(batch["spec_time_mask"][:, None, :], 0)
        features = features.masked_fill(batch["spec_feature_mask"][:, :, None], 0)
    return {"input_features": features}


def token_loss_sum(model, inputs: dict[str, torch.Tensor], batch: dict, encoder_outputs=None) -> torch.Tensor:
    """Sum of the label tokens' cross-entropy over one batch (fp32), for training and eval alike.

    `inputs` is `model_input(...)` (ignored when `encoder_outputs` is given). A sum, not a
    mean: the caller divides by the label tokens of everything it averages over (a whole
    optimizer step, a whole eval split), so short and long transcripts weigh by their
    tokens. Only label positions are projected, in chunks, with no KV cache
    (wdx.model.lm_head.DomainWhisper).
    """
    positions, targets = batch.get("label_positions"), batch.get("label_ids")
    if positions is None:
        positions, targets = label_targets(batch["labels"])
    if encoder_outputs is not None:
        inputs = {}
    return model(**inputs, decoder_input_ids=batch["decoder_input_ids"], label_positions=positions,
                 label_ids=targets, encoder_outputs=encoder_outputs)


def decode(tokenizer, new: torch.Tensor) -> list[str]:
    return [h.strip() for h in tokenizer.batch_decode(new, skip_special_tokens=True)]
