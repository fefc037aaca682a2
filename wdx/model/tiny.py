"""A tiny random-init Whisper with a Whisper-style tokenizer, built offline.

    python -m wdx.model.tiny OUT_DIR [--n-mels 80] [--d-model 64] [--layers 4]

For tests, benchmarks and smoke runs: the same special tokens as OpenAI's tokenizer
(<|endoftext|>, <|startoftranscript|>, every language, tasks, <|notimestamps|>), a small
byte-level BPE trained on Korean text, and a model vocabulary that, like the real
checkpoints, is larger than the tokenizer (timestamp ids the tokenizer does not list).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizer
from transformers.models.whisper.tokenization_whisper import LANGUAGES

N_TIMESTAMPS = 1501  # <|0.00|> ... <|30.00|>: in the model's vocab, absent from the tokenizer

CORPUS = [
    "안녕하세요 오늘은 날씨가 맑고 따뜻합니다", "학교에 가는 길에 친구를 만났어요", "책을 천천히 소리 내어 읽어 보세요",
    "우리 가족은 주말마다 공원에 갑니다", "고양이가 창가에서 햇볕을 쬐고 있어요", "선생님께서 숙제를 내 주셨습니다",
    "저는 사과와 배를 좋아해요", "버스를 타고 시장에 갔습니다", "동생이 그림을 예쁘게 그렸어요",
    "아침에 일찍 일어나서 운동을 했어요", "도서관에서 조용히 공부합니다", "바다에 가서 모래성을 쌓았어요",
    "음, 그, 저기 다시 읽을게요", "가나다라마바사아자차카타파하", "하나 둘 셋 넷 다섯 여섯 일곱 여덟 아홉 열",
]

SPECIAL = ["<|endoftext|>", "<|startoftranscript|>", *(f"<|{code}|>" for code in LANGUAGES),
           "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>",
           "<|notimestamps|>"]


EOT_ID = 50257  # <|endoftext|> in OpenAI's multilingual tokenizer: the text vocabulary before it


def build_tokenizer(vocab_size: int = 600, real_ids: bool = False) -> WhisperTokenizer:
    """Byte-level BPE on CORPUS, then Whisper's special tokens in Whisper's order.

    `real_ids` pads the text vocabulary with unreachable tokens so that every special token
    has its id in large-v3 (<|endoftext|> 50257 ... <|notimestamps|> 50364): CTranslate2 and
    faster-whisper decide "multilingual" and find the timestamps by those ids.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(CORPUS * 4, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    vocab = model["vocab"]
    if real_ids:
        # id 50256 is "" in OpenAI's vocabulary; CTranslate2 loads the model as English-only otherwise
        vocab = {**vocab, **{f"<|unused:{i}|>": i for i in range(len(vocab), EOT_ID - 1)}, "": EOT_ID - 1}
    tok = WhisperTokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    tok.set_prefix_tokens(language="ko", task="transcribe", predict_timestamps=False)
    return tok


def build(out: str | Path, n_mels: int = 80, d_model: int = 64, layers: int = 4, heads: int = 4,
          seed: int = 0, vocab_size: int | None = None, real_ids: bool = False) -> Path:
    """Write a loadable random-init Whisper (model, tokenizer, feature extractor) into `out`.

    Tiny by default; bench.gpu builds large-v3's geometry with it (d_model 1280, 32 + 32
    layers, 20 heads, 128 mel bins, `vocab_size` 51866: the model's ids beyond the small
    tokenizer are filled in by wdx.model.whisper, as for real checkpoints missing timestamps).
    `real_ids`: large-v3's token ids (see build_tokenizer), for faster-whisper tests.
    """
    out = Path(out)
    tok = build_tokenizer(real_ids=real_ids)
    sot = tok.convert_tokens_to_ids("<|startoftranscript|>")
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    config = WhisperConfig(
        vocab_size=vocab_size or len(tok) + N_TIMESTAMPS, num_mel_bins=n_mels, d_model=d_model, encoder_layers=layers,
        decoder_layers=layers, encoder_attention_heads=heads, decoder_attention_heads=heads,
        encoder_ffn_dim=4 * d_model, decoder_ffn_dim=4 * d_model, max_source_positions=1500,
        max_target_positions=448, decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        begin_suppress_tokens=[220, eot] if real_ids else None, suppress_tokens=None,  # real ones: " " and eot
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    model.generation_config.decoder_start_token_id = sot
    model.generation_config.eos_token_id = eot
    model.generation_config.pad_token_id = eot
    model.generation_config.begin_suppress_tokens = config.begin_suppress_tokens
    model.save_pretrained(out)
    tok.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=n_mels).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m wdx.model.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--n-mels", type=int, default=80)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)
    print(build(args.out, n_mels=args.n_mels, d_model=args.d_model, layers=args.layers))


if __name__ == "__main__":
    main()
