"""Domains from the data, not the code: a three-domain run trains, evaluates per domain,
exports and transcribes with the third token; a final/ with other domains fine-tunes on."""

import json

import pytest

import train_loop
from tests.conftest import TEXTS, make_sample
from tests.test_evaluate import clips
from tests.test_train_loop import args
from wdx.data.pack import write_split
from wdx.deploy import export_ct2
from wdx.model.domains import parse_domains
from wdx.scoring import evaluate, transcribe

THREE = ("normal", "dyslexic", "adhd")


@pytest.fixture(scope="module")
def three_domain_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("three") / "data"
    train = [make_sample(f"tr{i:03d}", seed=i, seconds=1.5, text=TEXTS[i % 4], domain=THREE[i % 3]) for i in range(12)]
    val = [make_sample(f"va{i:03d}", seed=50 + i, seconds=1.5, text=TEXTS[i % 4], domain=THREE[i % 3])
           for i in range(6)]
    write_split(root / "train", train, max_count=4)
    write_split(root / "val_small", val, max_count=3)
    return str(root)


@pytest.fixture(scope="module")
def three_domain_run(three_domain_data, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs3")
    assert train_loop.main(args(three_domain_data, tiny_model, out, "t", "--domains", ",".join(THREE),
                                "--max-steps", "2", "--num-workers", "0")) == 0
    return out / "t"


def test_a_three_domain_run_trains_and_evaluates_each_domain(three_domain_run, three_domain_data, tmp_path):
    final = three_domain_run / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["domains"] == list(THREE)
    assert any(t["content"] == "<|domain:adhd|>" for t in json.loads((final / "tokenizer.json").read_text())
               ["added_tokens"])
    last_eval = [json.loads(line) for line in open(three_domain_run / "metrics.jsonl") if "eval/loss" in line][-1]
    assert last_eval["eval/adhd/n"] == 2 and "eval/adhd/cer" in last_eval
    assert "<|domain:adhd|>" in (final / "README.md").read_text()
    out = tmp_path / "eval.json"
    assert evaluate.main([str(final), "--dataset", three_domain_data, "--max-new-tokens", "4", "--compare-domains",
                          "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [d for d in report["results"]] == [*THREE, "all"] and report["results"]["adhd"]["n"] == 2
    assert set(report["compare_domains"]["adhd"]) >= {"prompt_normal", "prompt_dyslexic", "prompt_adhd"}


def test_the_third_token_exports_and_transcribes_with_both_backends(three_domain_run, tmp_path, capsys):
    final = three_domain_run / "final"
    ct2 = export_ct2.export(final, tmp_path / "ct2")
    prompts = json.loads((ct2 / export_ct2.PROMPTS_FILE).read_text())
    assert list(prompts) == list(THREE) and prompts["adhd"]["tokens"][-1] == "<|domain:adhd|>"
    (path,) = clips(tmp_path, 1)
    for model, backend in ((final, "hf"), (ct2, "ct2")):
        assert transcribe.main([str(model), str(path), "--backend", backend, "--domain", "adhd",
                                "--max-new-tokens", "4"]) == 0
        assert capsys.readouterr().out.startswith(f"{path}\t[adhd] ")
        assert transcribe.main([str(model), str(path), "--backend", backend, "--compare-domains",
                                "--max-new-tokens", "4"]) == 0
        assert "\t[normal] " in (line := capsys.readouterr().out) and "\t[adhd] " in line
    assert transcribe.main([str(final), str(path), "--domain", "kids"]) == 1
    assert capsys.readouterr().err.strip().endswith(f"--domain kids: {final} knows normal, dyslexic, adhd")


def test_fine_tuning_a_final_with_other_domains_keeps_them_and_adds_new_ones(three_domain_run, three_domain_data,
                                                                          tmp_path):
    final = three_domain_run / "final"
    assert train_loop.main(args(three_domain_data, str(final), tmp_path, "more", "--domains", "normal,elderly",
                                "--max-steps", "1", "--num-workers", "0", "--eval-steps", "1")) == 0
    config = json.loads((tmp_path / "more" / "final" / "config.json").read_text())
    assert config["domains"] == [*THREE, "elderly"]  # adhd and dyslexic kept (with their rows), elderly added
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tmp_path / "more" / "final").convert_tokens_to_ids(
        [f"<|domain:{d}|>" for d in config["domains"]])
    assert ids == list(range(config["vocab_size"] - 4, config["vocab_size"]))


def test_domain_names_and_the_default_domain_are_checked_at_start(three_domain_data, tiny_model, tmp_path, capsys):
    assert parse_domains("normal, dyslexic ,adhd") == THREE
    for bad, message in (("normal,Normal", "lower-case letters"), ("normal,normal", "named twice")):
        with pytest.raises(ValueError, match=message):
            parse_domains(bad)
    with pytest.raises(SystemExit):
        train_loop.main(args(three_domain_data, tiny_model, tmp_path, "x", "--default-domain", "adhd"))
    assert "--default-domain 'adhd': not one of --domains (normal, dyslexic)" in capsys.readouterr().err
