"""The model set-up pitfalls of DESIGN.md, each tested against the buggy behaviour."""

import torch
from transformers import AutoTokenizer, WhisperForConditionalGeneration

from wdx.domains import DOMAIN_TOKENS
from wdx.model import setup


def test_domain_tokens_get_ids_at_or_above_the_model_vocab_and_nothing_shrinks(tiny_model):
    base = WhisperForConditionalGeneration.from_pretrained(tiny_model)
    base_tok = AutoTokenizer.from_pretrained(tiny_model)
    vocab = base.config.vocab_size
    assert len(base_tok) < vocab  # the pitfall's precondition: timestamps missing from the tokenizer
    w, _ = setup(tiny_model, language="ko", encoder_layers=2, decoder_layers=2)
    ids = [w.domain_token_ids[t] for t in DOMAIN_TOKENS]
    assert ids == [vocab, vocab + 1] and w.new_token_rows == ids
    emb = w.model.get_input_embeddings().weight
    assert emb.shape[0] == vocab + 2 and w.model.config.vocab_size == vocab + 2
    assert torch.equal(emb[:vocab], base.get_input_embeddings().weight)  # old rows untouched
    mean = base.get_input_embeddings().weight.mean(0)
    rows = w.model.model.decoder.embed_tokens.domain_rows  # the rows that train: their own parameter
    assert rows.shape == (2, w.model.config.d_model) and torch.allclose(rows, mean.expand(2, -1))
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
    from wdx.model import count_trainable

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

    from wdx.model import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"^--base-model .*nothing-here: cannot load a Whisper model"):
        setup(str(tmp_path / "nothing-here"), language="ko", encoder_layers=1, decoder_layers=1)


def test_generation_never_emits_a_domain_or_timestamp_token(tiny_model):
    from wdx.collate import prompt_ids
    from wdx.evaluation import generate

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
