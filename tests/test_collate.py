"""The exact decoder input and labels, for both domains."""

import numpy as np
import torch

from wdx.data.collate import IGNORE, Collator, make_text_encoder, max_text_tokens
from wdx.model.whisper import setup


def test_exact_decoder_inputs_and_labels_for_both_domains(tiny_model):
    w, _ = setup(tiny_model, language="ko", encoder_layers=1, decoder_layers=1)
    tok = w.tokenizer
    ids = tok.convert_tokens_to_ids
    sot, ko, tr, nots, eot = ids(["<|startoftranscript|>", "<|ko|>", "<|transcribe|>", "<|notimestamps|>",
                                  "<|endoftext|>"])
    normal, dyslexic = ids(["<|domain:normal|>", "<|domain:dyslexic|>"])
    a, b = tok.encode("안녕하세요", add_special_tokens=False), tok.encode("학교에 가요 가요", add_special_tokens=False)
    assert len(b) > len(a)
    samples = [dict(audio=np.zeros(100, np.float32), text="안녕하세요", domain="normal", key="a", duration=1.0),
               dict(audio=np.zeros(300, np.float32), text="학교에 가요 가요", domain="dyslexic", key="b", duration=1.0)]
    batch = Collator(tok, "ko")(samples)
    pad = len(b) - len(a)
    assert batch["decoder_input_ids"].tolist() == [
        [sot, ko, tr, nots, normal, *a] + [eot] * pad,
        [sot, ko, tr, nots, dyslexic, *b],
    ]
    assert batch["labels"].tolist() == [
        [IGNORE] * 4 + [*a, eot] + [IGNORE] * pad,
        [IGNORE] * 4 + [*b, eot],
    ]
    # exactly one <|startoftranscript|>, at position 0 (the usual scripts feed two)
    assert (batch["decoder_input_ids"] == sot).sum(dim=1).tolist() == [1, 1]
    assert batch["prompt_ids"].tolist() == [[sot, ko, tr, nots, normal], [sot, ko, tr, nots, dyslexic]]
    assert batch["audio"].shape == (2, 300) and torch.all(batch["audio"] == 0)
    # what the model learns to predict after the domain token is the first text token
    assert batch["labels"][0, 4] == a[0] and batch["decoder_input_ids"][0, 4] == normal


def test_transcripts_longer_than_the_decoder_are_refused(tiny_model):
    w, _ = setup(tiny_model, language="ko", encoder_layers=1, decoder_layers=1)
    encode = make_text_encoder(w.tokenizer, max_target_positions=12)
    assert max_text_tokens(12) == 7  # 12 positions - 5 prompt ids
    assert encode("안녕") == w.tokenizer.encode("안녕", add_special_tokens=False)
    assert encode("가 " * 20).startswith("transcript_too_long: ")
