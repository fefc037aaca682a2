"""train_loop.main end to end on a tiny model and generated shards (CPU)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import train_loop
from tests.test_matrix import check_final

ROOT = Path(__file__).resolve().parents[1]


def args(data, model, out, run="r", *extra):
    return ["--dataset-root", data, "--base-model", model, "--output-dir", str(out), "--run-name", run,
            "--max-steps", "6", "--per-device-train-batch-size", "4", "--grad-accum", "1", "--learning-rate", "3e-3",
            "--warmup-steps", "1", "--logging-steps", "1", "--eval-steps", "2", "--save-steps", "2",
            "--save-total-limit", "2", "--num-workers", "2", "--generation-max-length", "8", "--seed", "7", *extra]


def losses(run_dir):
    rows = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def evals(run_dir):
    rows = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]
    return {r["step"]: r for r in rows if "eval/loss" in r}


@pytest.fixture(scope="module")
def finished_run(tiny_dataset, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert train_loop.main(args(tiny_dataset, tiny_model, out)) == 0
    return out / "r"


def test_short_run_lowers_the_loss_and_pins_its_values(finished_run):
    got = losses(finished_run)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    assert got[6] < got[1] - 0.3
    # pinned: a change in data order, prompt, masking or optimizer shows up here first
    expected = {1: 7.7159, 2: 7.6587, 6: 7.3629}  # the domain rows spread by --domain-rows-init 1.0 (seed 7)
    for step, value in expected.items():
        assert got[step] == pytest.approx(value, rel=1e-3), (step, got[step])
    e = evals(finished_run)
    assert sorted(e) == [2, 4, 6]
    assert e[6]["eval/all/n"] == 6 and e[6]["eval/normal/n"] == 3 and e[6]["eval/dyslexic/n"] == 3
    assert e[6]["eval/loss"] < e[2]["eval/loss"]


def test_checkpoints_rotate_and_keep_the_best(finished_run):
    names = sorted(p.name for p in (finished_run / "checkpoints").iterdir())
    cers = {s: evals(finished_run)[s]["eval/all/cer"] for s in (2, 4, 6)}
    best = min(cers, key=lambda s: (cers[s], s))
    expected = {"step-0000004", "step-0000006", f"step-{best:07d}"}
    assert set(names) == expected
    assert not any(n.startswith(".tmp") for n in names)


def test_final_loads_and_generates_with_the_domain_prompt(finished_run, tiny_model):
    from transformers import AutoTokenizer, WhisperForConditionalGeneration, pipeline

    from wdx.data.collate import prompt_ids
    from wdx.scoring.forward import generate

    final = finished_run / "final"
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "preprocessor_config.json", "README.md"} <= {p.name for p in final.iterdir()}
    model = WhisperForConditionalGeneration.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.convert_tokens_to_ids("<|domain:dyslexic|>") == model.config.vocab_size - 1
    prompts = torch.tensor([prompt_ids(tok, "ko", "normal"), prompt_ids(tok, "ko", "dyslexic")])
    new = generate(model, torch.randn(2, 80, 3000), prompts, max_new_tokens=5)
    assert new.shape[0] == 2 and 1 <= new.shape[1] <= 5
    # the run evaluated with --generation-max-length 8; the exported model must not be capped there
    gc = model.generation_config
    assert (gc.max_new_tokens, gc.max_length, gc.num_beams) == (None, 448, 1)  # one length: no warning per call
    asr = pipeline("automatic-speech-recognition", model=str(final), device="cpu")
    out = asr({"raw": torch.zeros(16000).numpy(), "sampling_rate": 16000}, generate_kwargs={"max_new_tokens": 4})
    assert isinstance(out["text"], str)
    assert "domain:dyslexic" in (final / "README.md").read_text()
    check_final(final, tiny_model, layers=4)  # the fp32 / 1 process row of the precision x config matrix


def test_resuming_from_a_mid_run_checkpoint_reproduces_the_losses(finished_run, tiny_dataset, tiny_model, tmp_path):
    # the uninterrupted run kept step-4; a run "killed" right after saving it resumes from there
    resumed = tmp_path / "r"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(finished_run / "checkpoints" / "step-0000004", resumed / "checkpoints" / "step-0000004")
    assert train_loop.main(args(tiny_dataset, tiny_model, tmp_path, "r", "--resume-from-checkpoint", "latest")) == 0
    want, got = losses(finished_run), losses(resumed)
    assert sorted(got) == [5, 6]
    for step in (5, 6):
        assert got[step] == pytest.approx(want[step], abs=1e-5)


def test_print_config_shows_the_plan_and_trains_nothing(tiny_dataset, tiny_model, tmp_path, capsys):
    assert train_loop.main(args(tiny_dataset, tiny_model, tmp_path, "r", "--print-config")) == 0
    text = capsys.readouterr().out
    assert "effective batch    4 per process x 1 processes x 1 accumulation = 4" in text
    assert "steps              6 per epoch, 6 in total" in text
    assert "domain_token_rows  128" in text
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_bad_flags_fail_at_start_naming_the_flag(tiny_dataset, tiny_model, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train_loop.main(args(tiny_dataset, tiny_model, tmp_path, "r", "--save-steps", "3"))
    assert exc.value.code == 2
    assert "--save-steps 3 must be a multiple of --eval-steps 2" in capsys.readouterr().err
    assert train_loop.main(args(tiny_dataset, str(tmp_path / "no-model"), tmp_path, "r")) == 2
    assert "--base-model" in capsys.readouterr().err


def test_export_from_a_checkpoint_writes_final(finished_run, tiny_dataset, tiny_model, tmp_path):
    ckpt = finished_run / "checkpoints" / "step-0000004"
    assert train_loop.main(args(tiny_dataset, tiny_model, tmp_path, "x", "--export", str(ckpt))) == 0
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "x" / "final" / "model.safetensors")
    saved = load_file(ckpt / "model.safetensors")
    key = "model.decoder.layers.3.fc1.weight"
    assert torch.equal(exported[key], saved[key])


def test_a_run_dir_holding_another_run_is_refused(finished_run, tiny_dataset, tiny_model, capsys):
    assert train_loop.main(args(tiny_dataset, tiny_model, finished_run.parent, "r")) == 2
    assert "already holds a run; pass --resume-from-checkpoint latest" in capsys.readouterr().err


def test_wandb_offline_logs_without_credentials(tiny_dataset, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert train_loop.main(args(tiny_dataset, tiny_model, tmp_path, "w", "--login-wandb", "--max-steps", "2")) == 0
    runs = list((tmp_path / "w" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_push_without_a_token_fails_before_training(tiny_dataset, tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert train_loop.main(args(tiny_dataset, tiny_model, tmp_path, "p", "--push-to-hub")) == 2
    assert "no Hugging Face token; set HF_TOKEN" in capsys.readouterr().err
    assert not (tmp_path / "p" / "metrics.jsonl").exists()


def test_debug_step_reports_phases_and_a_falling_loss(tiny_dataset, tiny_model, tmp_path, capsys):
    assert train_loop.main(args(tiny_dataset, tiny_model, tmp_path, "d", "--debug-step", "4")) == 0
    out = capsys.readouterr().out
    for phase in ("features", "forward", "backward", "optimizer", "domain_token_rows", "peak memory"):
        assert phase in out
    assert "loss falls               yes" in out


def test_the_evaluation_tool_reproduces_the_run_s_last_eval(finished_run, tmp_path):
    from wdx.scoring import evaluate as evaluate_tool

    out = tmp_path / "e.json"
    data = json.loads((finished_run / "final" / "train_config.json").read_text())["dataset_root"]
    assert evaluate_tool.main([str(finished_run / "final"), "--dataset", data, "--max-new-tokens", "8",
                               "--json", str(out)]) == 0
    tool = json.loads(out.read_text())["results"]
    run = evals(finished_run)[6]
    for domain in ("normal", "dyslexic", "all"):
        assert tool[domain]["cer"] == pytest.approx(run[f"eval/{domain}/cer"], abs=1e-9), domain


def test_persistent_workers_see_each_new_epoch(tiny_dataset, tiny_model, tmp_path):
    # the epoch lives in shared memory: persistent workers must shuffle epoch 2 like fresh ones
    extra = ["--max-steps", "8", "--eval-steps", "8", "--save-steps", "8", "--log-sample-keys",
             "--per-device-train-batch-size", "6"]  # 2 workers x 2 batches: 4 steps per epoch
    assert train_loop.main(args(tiny_dataset, tiny_model, tmp_path, "fresh", *extra)) == 0
    assert train_loop.main(args(tiny_dataset, tiny_model, tmp_path, "kept", *extra, "--persistent-workers")) == 0
    fresh, kept = (open(tmp_path / r / "sample_keys.rank0.jsonl").read() for r in ("fresh", "kept"))
    epochs = [json.loads(x)["epoch"] for x in fresh.splitlines()]
    assert epochs == [0] * 4 + [1] * 4 and kept == fresh
    assert losses(tmp_path / "kept") == pytest.approx(losses(tmp_path / "fresh"), abs=1e-6)


def test_early_stopping_saves_stops_and_final_holds_the_best_weights(tiny_dataset, tiny_model, tmp_path, capfd,
                                                                     monkeypatch):
    # scripted eval losses 1.0, 0.5, 0.49, 0.6: step 3 is the best (by 0.01, below the 0.05 threshold, so the
    # patience is not reset by it), patience 2 -> stop at step 4; final/ holds step 3's weights
    from safetensors.torch import load_file

    scripted, run_eval = iter([1.0, 0.5, 0.49, 0.6]), train_loop.run_eval

    def scripted_eval(*a, **kw):
        out = run_eval(*a, **kw)
        out["loss"] = next(scripted)
        return out

    monkeypatch.setattr(train_loop, "run_eval", scripted_eval)
    extra = ["--eval-steps", "1", "--save-steps", "100", "--max-steps", "8", "--num-workers", "0",
             "--generation-max-length", "2", "--metric-for-best-model", "loss", "--early-stopping-patience", "2",
             "--early-stopping-threshold", "0.05"]
    assert train_loop.main(args(tiny_dataset, tiny_model, tmp_path, "r", *extra)) == 0
    log = "".join(capfd.readouterr())
    run = tmp_path / "r"
    assert sorted(evals(run)) == [1, 2, 3, 4]  # stopped after the fourth evaluation
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000003", "step-0000004"]
    state = json.loads((run / "checkpoints" / "step-0000004" / "train_state.json").read_text())
    assert (state["best_step"], state["best_metric"], state["evals_without_improvement"]) == (3, 0.49, 2)
    assert "early stopping at step 4: 2 evaluations without loss improving by more than 0.05" in log
    assert "final/ gets the weights of step 3, the best by eval loss" in log
    final = load_file(run / "final" / "model.safetensors")
    best, last = (load_file(run / "checkpoints" / f"step-000000{s}" / "model.safetensors") for s in (3, 4))
    name = f"model.decoder.layers.{3}.fc1.weight"  # a trained tensor
    assert torch.equal(final[name], best[name]) and not torch.equal(final[name], last[name])
    assert "weights of step 3, the best evaluation by loss" in (run / "final" / "README.md").read_text()


def test_the_best_is_any_improvement_and_the_threshold_only_spends_patience(capsys):
    # issue 22.2: main kept 0.200 as the best of 0.200, 0.195, 0.192, 0.191 (threshold 0.01) and put it in final/
    from wdx.config import parse_args
    from wdx.train.checkpoint import TrainState

    cfg = parse_args(["--dataset-root", "x", "--run-name", "x", "--early-stopping-patience", "3",
                      "--early-stopping-threshold", "0.01"])
    state, verdicts = TrainState(), []
    for step, cer in enumerate([0.200, 0.195, 0.192, float("nan"), 0.191], start=1):
        state.step = step
        evaluation = {"results": {"all": {"cer": cer, "wer": cer}}, "loss": 1.0}
        verdicts.append(train_loop.judge(cfg, state, evaluation, False))
    assert verdicts == [(True, False), (True, False), (True, False), (False, False), (True, True)]
    assert (state.best_step, state.best_metric, state.evals_without_improvement) == (5, 0.191, 3)
    for bad in (["--early-stopping-threshold", "-0.1"], ["--early-stopping-patience", "-1"]):
        with pytest.raises(SystemExit):
            parse_args(["--dataset-root", "x", "--run-name", "x", *bad])
        assert f"--{bad[0][2:]}: must be >= 0" in capsys.readouterr().err


def test_a_model_without_domain_conditioning_trains_resumes_exports_and_transcribes(tiny_dataset, tiny_model,
                                                                                    tmp_path, capsys):
    # issue 23.1: the baseline that measures what the token adds, usable by every tool
    import shutil

    from tests.test_evaluate import clips
    from wdx.deploy import export_ct2
    from wdx.scoring import transcribe

    extra = ["--domain-conditioning", "none", "--max-steps", "4", "--num-workers", "0"]
    assert train_loop.main(args(tiny_dataset, tiny_model, tmp_path, "none", *extra)) == 0
    run, again = tmp_path / "none", tmp_path / "again"
    shutil.copytree(run / "checkpoints" / "step-0000002", again / "checkpoints" / "step-0000002")
    assert train_loop.main(args(tiny_dataset, tiny_model, tmp_path, "again", *extra, "--resume-from-checkpoint",
                                "latest")) == 0
    got, want = losses(again), losses(run)
    assert got == pytest.approx({3: want[3], 4: want[4]}, abs=1e-6)
    capsys.readouterr()
    assert train_loop.main(args(tiny_dataset, tiny_model, tmp_path, "again", "--num-workers", "0",
                                "--resume-from-checkpoint", "latest")) == 2
    assert "trained with --domain-conditioning none, this run has token" in capsys.readouterr().err
    final = run / "final"
    assert json.loads((final / "config.json").read_text())["domain_conditioning"] == "none"
    assert "Trained without a domain token" in (final / "README.md").read_text()
    (clip,) = clips(tmp_path, 1)
    assert transcribe.main([str(final), str(clip), "--max-new-tokens", "2"]) == 0
    assert transcribe.main([str(final), str(clip), "--domain", "dyslexic"]) == 1
    assert capsys.readouterr().err.strip().endswith("has no domain token (trained with --domain-conditioning none, "
                                                    "or not by train_loop.py); drop --domain")
    ct2 = export_ct2.export(final, tmp_path / "ct2", quantization="int8")
    prompts = json.loads((ct2 / export_ct2.PROMPTS_FILE).read_text())
    assert list(prompts) == ["none"] and len(prompts["none"]["ids"]) == 4
    assert transcribe.main([str(ct2), str(clip), "--backend", "ct2", "--max-new-tokens", "2"]) == 0
