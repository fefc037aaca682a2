"""The model set-up pitfalls of DESIGN.md, each tested against the buggy behaviour."""

import numpy as np
import torch
from transformers import AutoTokenizer, WhisperForConditionalGeneration

from wdx.model.domains import DOMAIN_TOKENS
from wdx.model.whisper import setup


def test_domain_tokens_get_ids_at_or_above_the_model_vocab_and_nothing_shrinks(tiny_model):
    base = WhisperForConditionalGeneration.from_pretrained(tiny_model)
    base_tok = AutoTokenizer.from_pretrained(tiny_model)
    vocab = base.config.vocab_size
    assert len(base_tok) < vocab  # the pitfall's precondition: timestamps missing from the tokenizer
    w, _ = setup(tiny_model, language="ko", encoder_layers=2, decoder_layers=2, rows_init=0.0)
    ids = [w.domain_token_ids[t] for t in DOMAIN_TOKENS]
    assert ids == [vocab, vocab + 1] and w.new_token_rows == ids
    emb = w.model.get_input_embeddings().weight
    assert emb.shape[0] == vocab + 2 and w.model.config.vocab_size == vocab + 2
    assert torch.equal(emb[:vocab], base.get_input_embeddings().weight)  # old rows untouched
    mean = base.get_input_embeddings().weight.mean(0)
    rows = w.model.model.decoder.embed_tokens.domain_rows  # the rows that train: their own parameter
    assert rows.shape == (2, w.model.config.d_model) and torch.allclose(rows, mean.expand(2, -1))  # rows_init 0
    assert w.model.proj_out.weight is emb and w.model.proj_out.domain_rows is rows  # still tied, both of them
    assert not emb.requires_grad and rows.requires_grad
    # the filled-in ids are the timestamps the tokenizer was missing, by their real names
    assert w.tokenizer.convert_ids_to_tokens(len(base_tok)) == "<|0.00|>"
    assert w.tokenizer.convert_ids_to_tokens(vocab - 1) == "<|30.00|>"


def one_step(w, groups, lr=1e-2):
    from train_loop import build_optimizer
    from wdx.config import TrainConfig

    cfg = TrainConfig(dataset_root="x", run_name="x", learning_rate=lr, weight_decay=0.1)
    opt = build_optimizer(cfg, groups, torch.device("cpu"))
    feats = torch.randn(2, w.model.config.num_mel_bins, 3000)
    ids = torch.tensor([[w.tokenizer.convert_tokens_to_ids("<|startoftranscript|>"), w.new_token_rows[0], 5, 6],
                        [w.tokenizer.convert_tokens_to_ids("<|startoftranscript|>"), w.new_token_rows[1], 7, 8]])
    loss = w.model(input_features=feats, decoder_input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()


def test_after_one_step_only_the_intended_parameters_moved(tiny_model):
    w, groups = setup(tiny_model, language="ko", encoder_layers=2, decoder_layers=2)
    before = {n: p.detach().clone() for n, p in w.model.named_parameters()}
    one_step(w, groups)
    changed = {n for n, p in w.model.named_parameters() if not torch.equal(p, before[n])}
    n_enc = w.model.config.encoder_layers
    n_dec = w.model.config.decoder_layers
    expected_enc = {n for n in before
                    if any(n.startswith(f"model.encoder.layers.{i}.") for i in (n_enc - 2, n_enc - 1))}
    expected_dec = {n for n in before if any(n.startswith(f"model.decoder.layers.{i}.{part}")
                                             for i in (n_dec - 2, n_dec - 1)
                                             for part in ("self_attn.", "encoder_attn.", "fc1.", "fc2."))}
    assert changed == expected_enc | expected_dec | {"model.decoder.embed_tokens.domain_rows"}
    assert not any("decoder" in n and "layer_norm" in n for n in changed)  # decoder: attention + MLP only


def test_freezing_counts_match_the_groups(tiny_model):
    from wdx.model.whisper import count_trainable

    w, groups = setup(tiny_model, language="ko", encoder_layers=1, decoder_layers=0)
    counts = count_trainable(groups)
    block = sum(p.numel() for p in w.model.model.encoder.layers[-1].parameters())
    assert counts == {"encoder_blocks": block, "decoder_attention": 0, "decoder_mlp": 0,
                      "domain_token_rows": 2 * w.model.config.d_model}


def test_dropout_is_set_before_the_modules_are_built(tiny_model):
    w, _ = setup(tiny_model, language="ko", encoder_layers=1, decoder_layers=1, dropout=0.3)
    assert w.model.model.decoder.dropout == 0.3 and w.model.model.encoder.dropout == 0.3
    assert w.model.config.dropout == 0.3


def test_an_unloadable_base_model_is_one_clear_error(tmp_path):
    import pytest

    from wdx.model.whisper import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"^--base-model .*nothing-here: no such directory$"):
        setup(str(tmp_path / "nothing-here"), language="ko", encoder_layers=1, decoder_layers=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"^--base-model .*empty: cannot load a Whisper model"):
        setup(str(tmp_path / "empty"), language="ko", encoder_layers=1, decoder_layers=1)


def test_generation_never_emits_a_domain_or_timestamp_token(tiny_model):
    from wdx.data.collate import prompt_ids
    from wdx.scoring.forward import generate

    w, _ = setup(tiny_model, language="ko", encoder_layers=0, decoder_layers=0)
    model, tok = w.model.eval(), w.tokenizer
    suppressed = set(model.generation_config.suppress_tokens)
    notimestamps = tok.convert_tokens_to_ids("<|notimestamps|>")
    assert set(range(notimestamps + 1, model.config.vocab_size)) <= suppressed  # timestamps + both domain tokens
    assert max(suppressed) == w.domain_token_ids["<|domain:dyslexic|>"]
    # make <|domain:dyslexic|> the most likely next token after a "normal" prompt (its row is tied to the output)
    features, prompt = torch.randn(1, 80, 3000), torch.tensor([prompt_ids(tok, "ko", "normal")])
    with torch.no_grad():
        hidden = model(input_features=features, decoder_input_ids=prompt, output_hidden_states=True)
        last = hidden.decoder_hidden_states[-1][0, -1]
        model.model.decoder.embed_tokens.domain_rows[1] = 100 * last / last.norm()
    stored = model.generation_config.suppress_tokens
    model.generation_config.suppress_tokens = None
    unsuppressed = generate(model, features, prompt, max_new_tokens=3)
    assert unsuppressed[0, 0] == w.domain_token_ids["<|domain:dyslexic|>"]  # the bait works
    model.generation_config.suppress_tokens = stored
    new = generate(model, features, prompt, max_new_tokens=3)
    assert not set(new.flatten().tolist()) & suppressed


def test_domain_rows_train_exactly_like_the_old_masked_embedding(tiny_model):
    import pytest

    """Issue 12.1 and 12.3: the same losses, step after step, as the old way (the whole tied
    embedding trainable with a gradient mask, fp32 logits of every position)."""
    from bench.memory import legacy_loss, legacy_setup
    from train_loop import build_optimizer
    from wdx.config import TrainConfig
    from wdx.data.collate import IGNORE, Collator
    from wdx.model.lm_head import plain_whisper
    from wdx.scoring.forward import token_loss_sum

    w, groups = setup(tiny_model, language="ko", encoder_layers=2, decoder_layers=2, rows_init=0.0)
    old = plain_whisper(w.model.config, w.model.generation_config,
                        {k: v.clone() for k, v in w.model.state_dict().items()})  # no shared storage
    old_groups = legacy_setup(old, 2, 2, w.new_token_rows)
    cfg = TrainConfig(dataset_root="x", run_name="x", learning_rate=3e-3, weight_decay=0.1)
    new_opt = build_optimizer(cfg, groups, torch.device("cpu"))
    old_opt = torch.optim.AdamW([{"params": old_groups["blocks"], "weight_decay": 0.1},
                                 {"params": old_groups["embedding"], "weight_decay": 0.0}], lr=3e-3, fused=True)
    texts = ["안녕하세요 오늘은 날씨가 맑고 따뜻합니다", "저는 사과와 배를 좋아해요 " * 4]
    batch = Collator(w.tokenizer, "ko")([dict(text=t, domain=("normal", "dyslexic")[i % 2], key=str(i), duration=1.0,
                                              audio=np.zeros(10, np.float32)) for i, t in enumerate(texts)])
    assert len(batch["label_ids"]) == (batch["labels"] != IGNORE).sum() < batch["labels"].numel()
    features = torch.randn(2, w.model.config.num_mel_bins, 3000, generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        pair = []
        for model, loss_fn, opt in ((w.model, token_loss_sum, new_opt), (old, legacy_loss, old_opt)):
            loss = loss_fn(model, {"input_features": features} if loss_fn is token_loss_sum else features, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            pair.append(loss.item() / len(batch["label_ids"]))
        losses.append(pair)
    assert losses[0][0] > losses[-1][0] + 0.1  # it trains
    assert [a for a, _ in losses] == pytest.approx([b for _, b in losses], rel=1e-6, abs=0)
    rows = w.model.model.decoder.embed_tokens.domain_rows
    # weights agree to rounding (Adam divides by each gradient's RMS, so the last bits of tiny
    # gradients show at ~lr x 1e-3); the exported form of the new model is the old model
    assert torch.allclose(rows, old.get_input_embeddings().weight[w.new_token_rows], rtol=0, atol=5e-5)
    merged = plain_whisper(w.model.config, w.model.generation_config, w.model.state_dict()).state_dict()
    assert max((merged[k] - v).abs().max().item() for k, v in old.state_dict().items()) <= 5e-5


def test_training_loss_never_builds_the_full_logits_nor_a_kv_cache(tiny_model, monkeypatch):
    """Issue 12.3: only label positions are projected, a chunk at a time; no past key values."""
    import wdx.model.lm_head
    from wdx.data.collate import Collator
    from wdx.scoring.forward import token_loss_sum
    from wdx.train.memory import LiveBytes

    w, _ = setup(tiny_model, language="ko", encoder_layers=1, decoder_layers=1)
    vocab = w.model.config.vocab_size
    monkeypatch.setattr(wdx.model.lm_head, "CHUNK_LOGIT_BYTES", 16 * 4 * vocab)  # 16 positions per chunk
    batch = Collator(w.tokenizer, "ko")([dict(text="저는 사과와 배를 좋아해요 " * 12, domain="normal", key=str(i),
                                              duration=1.0, audio=np.zeros(10, np.float32)) for i in range(2)])
    caches = []
    w.model.model.decoder.register_forward_hook(lambda m, a, out: caches.append(out.past_key_values))
    token_loss_sum(w.model, {"input_features": torch.randn(2, w.model.config.num_mel_bins, 3000)}, batch).backward()
    assert caches == [None]
    # the projection + loss of all label positions, forward and backward, in a fraction of one
    # full logits array (the old way kept three: logits, log-softmax, gradient)
    n = len(batch["label_ids"])
    hidden = torch.randn(n, w.model.config.d_model, requires_grad=True)
    live = LiveBytes()
    for t in (*w.model.parameters(), hidden):
        live.add(t)
    live.reset_peak()
    before = live.now
    with live:
        w.model.proj_out(hidden, batch["label_ids"]).backward()
    live.peak -= before
    assert n >= 2 * 60 and live.peak < n * vocab * 4 / 2
    assert hidden.grad is not None and w.model.proj_out.domain_rows.grad is not None


def test_the_two_domain_rows_differ_at_step_0_by_the_chosen_spread(tiny_model):
    # issue 23.2: both rows used to start at the mean row, so the decoder could not tell the domains apart
    base = WhisperForConditionalGeneration.from_pretrained(tiny_model).get_input_embeddings().weight
    w, _ = setup(tiny_model, language="ko", encoder_layers=2, decoder_layers=2, rows_init=1.0, seed=3)
    rows = w.model.model.decoder.embed_tokens.domain_rows.detach()
    noise = (rows - base.mean(0)) / base.std(0)
    assert not torch.equal(rows[0], rows[1]) and abs(noise.std().item() - 1.0) < 0.15
    again, _ = setup(tiny_model, language="ko", encoder_layers=2, decoder_layers=2, rows_init=1.0, seed=3)
    assert torch.equal(again.model.model.decoder.embed_tokens.domain_rows, rows.requires_grad_())  # seeded


def test_without_domain_conditioning_the_prompt_has_four_tokens_and_nothing_is_added(tiny_model):
    from wdx.data.collate import Collator

    base_tok = AutoTokenizer.from_pretrained(tiny_model)
    w, groups = setup(tiny_model, language="ko", encoder_layers=2, decoder_layers=2, conditioning="none")
    assert not w.domain_token_ids and not groups["domain_token_rows"]
    assert not any(t in w.tokenizer.get_vocab() for t in DOMAIN_TOKENS)
    assert w.model.get_input_embeddings().weight.shape[0] == w.model.config.vocab_size >= len(base_tok)
    batch = Collator(w.tokenizer, "ko", "none")([{"audio": np.zeros(160, np.float32), "text": "안녕",
                                                 "domain": "dyslexic", "key": "k", "duration": 0.01}])
    sot, ko, transcribe, nots = w.tokenizer.convert_tokens_to_ids(
        ["<|startoftranscript|>", "<|ko|>", "<|transcribe|>", "<|notimestamps|>"])
    assert batch["prompt_ids"].tolist() == [[sot, ko, transcribe, nots]]
    assert batch["decoder_input_ids"][0, :4].tolist() == [sot, ko, transcribe, nots]
    assert (batch["labels"][0, :3] == -100).all() and batch["labels"][0, 3] != -100  # the text's first token
