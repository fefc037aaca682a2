"""wdx.study: token vs none on the same data, through the real launcher, loop and evaluation tool."""

import json
from pathlib import Path

import pytest

from tests.conftest import make_sample
from wdx.data.pack import write_split
from wdx.scoring import study

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_study_trains_both_arms_from_one_cache_and_compares_them(tiny_dataset, tiny_model, tmp_path, capsys):
    import shutil

    data = Path(shutil.copytree(tiny_dataset, tmp_path / "data"))
    said = [("오느 학교에서", "오늘 학교에서"), ("안녕하세요", None)]  # one dyslexic misreading, one without target
    samples = []
    for i, (text, target) in enumerate(said):
        s = make_sample(f"t{i}", text=text, domain=("dyslexic", "normal")[i], seconds=1.0, seed=i)
        s["json"] = json.dumps({"domain": ("dyslexic", "normal")[i], **({"target_text": target} if target else {})},
                               ensure_ascii=False).encode()
        samples.append(s)
    write_split(data / "val_study", samples)
    out = tmp_path / "study"
    argv = ["--dataset-root", str(data), "--base-model", tiny_model, "--out", str(out), "--splits", "val_study",
            "--accelerate-config", str(ROOT / "accelerate_configs" / "cpu.yaml"), "--max-new-tokens", "3", "--",
            "--max-steps", "2", "--per-device-train-batch-size", "4", "--num-workers", "0", "--eval-steps", "2",
            "--save-steps", "2", "--generation-max-length", "3", "--warmup-steps", "0", "--train-encoder-layers", "2"]
    assert study.main(argv) == 0
    report = (out / "STUDY.md").read_text()
    assert "| val_study | dyslexic | 1 |" in report and "| val_study | normal | 1 |" in report
    assert "n/a | n/a | n/a" in report  # the normal clip has no target_text
    result = json.loads((out / "study.json").read_text())
    assert result["comparisons"]["val_study"]["dyslexic"]["faithful_a"] is not None  # the misread word is counted
    # one cache served both arms: the second run built nothing
    built = [json.loads(line).get("encoder_cache/clips_built") for arm in ("token", "none")
             for line in open(out / "runs" / f"{arm}-seed42" / "metrics.jsonl") if "encoder_cache/clips_built" in line]
    assert built == [30, 0]
    final = out / "runs" / "none-seed42" / "final"
    assert json.loads((final / "config.json").read_text())["domain_conditioning"] == "none"
    # the loop selected on val_small, which the study does not report; the seed is in the table
    assert json.loads((final / "train_config.json").read_text())["eval_split"] == "val_small"
    assert "| val_study | 42 |" in report


@pytest.mark.parametrize("flags, message", [
    (["--splits", "val_small"], "--select-split val_small is also reported"),
    (["--", "--eval-split", "val_unseen"], "--eval-split after --: the study sets it"),
    (["--", "--seed", "3"], "--seed after --: the study sets it"),
    (["--", "--early-stopping-patience", "2"], "the arms would stop at different steps"),
    (["--", "--early-stopping-patience=1"], "the arms would stop at different steps"),
])
def test_the_study_refuses_to_select_on_what_it_reports_or_to_compare_unequal_steps(flags, message, tmp_path):
    # issue 33.4: flags after -- could select the best model on the reported split, or stop the arms apart
    head = flags[: flags.index("--")] if "--" in flags else flags
    tail = flags[flags.index("--"):] if "--" in flags else []
    with pytest.raises(SystemExit, match=message):
        study.main(["--dataset-root", str(tmp_path), "--base-model", str(tmp_path), "--out", str(tmp_path / "o"),
                    *head, *tail])
    assert not (tmp_path / "o").exists()  # refused before anything ran
