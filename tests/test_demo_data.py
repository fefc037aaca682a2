import json
import random
import tarfile

from wdx.demo import data as demo_data
from wdx.demo.tts import espeak


def test_espeak_speaks_korean():
    audio = espeak().say("안녕하세요", voice="ko+f2")
    assert espeak().rate == 22050 and 0.3 < len(audio) / 22050 < 3 and abs(audio).max() > 0.1


def test_reading_errors_are_the_reported_kinds():
    rng = random.Random(0)
    assert demo_data.drop_final("학교", rng) == "하교"
    assert demo_data.substitute("바다", random.Random(1)) in {"파다", "바타", "버다", "바더", "파더", "버타"}
    words = ["오늘", "저는", "학교에서", "책을", "읽었어요"]
    said = [demo_data.dyslexic_reading(words, random.Random(i)) for i in range(30)]
    assert all(s != words for s in said)
    assert any(f in s for s in said for f in demo_data.FILLERS)  # hesitations occur
    assert any(len(s) > len(words) for s in said)


def test_demo_dataset_is_deterministic_balanced_and_held_out(tmp_path):
    a = demo_data.build(tmp_path / "a", n_train=10, n_val=4, seed=3)
    b = demo_data.build(tmp_path / "b", n_train=10, n_val=4, seed=3)

    def texts(root, split):
        out = {}
        for shard in sorted((root / split).glob("*.tar")):
            with tarfile.open(shard) as tf:
                for m in tf.getmembers():
                    if m.name.endswith(".txt") or m.name.endswith(".json"):
                        out[m.name] = tf.extractfile(m).read()
        return out

    assert texts(a, "train") == texts(b, "train")
    train_meta = [json.loads(v) for k, v in texts(a, "train").items() if k.endswith(".json")]
    val_meta = [json.loads(v) for k, v in texts(a, "val_small").items() if k.endswith(".json")]
    unseen_meta = [json.loads(v) for k, v in texts(a, "val_unseen").items() if k.endswith(".json")]
    assert sorted(m["domain"] for m in train_meta) == ["dyslexic"] * 5 + ["normal"] * 5
    assert sorted(m["domain"] for m in unseen_meta) == ["dyslexic"] * 2 + ["normal"] * 2
    sentences = [{m["target_text"] for m in meta} for meta in (train_meta, val_meta, unseen_meta)]
    assert len(set.union(*sentences)) == 10 + 4 + 4  # no sentence in two splits
    # val_small is read by training voices; val_unseen only by voices training never heard
    voices = [{m["speaker"] for m in meta} for meta in (train_meta, val_meta, unseen_meta)]
    assert voices[1] <= {f"espeak-{v}" for v in demo_data.SEEN.variants}
    assert voices[2] and not voices[2] & {f"espeak-{v}" for v in demo_data.SEEN.variants}
    formats = {k.split(".")[-1] for k in _members(a / "train")}
    assert {"wav", "flac", "mp3", "ogg", "m4a"} <= formats


def _members(split_dir):
    names = []
    for shard in split_dir.glob("*.tar"):
        with tarfile.open(shard) as tf:
            names += tf.getnames()
    return names


def test_the_report_shows_seen_and_unseen_voices_the_token_table_and_eval_cost(tmp_path):
    from wdx.demo.report import deployed_summary, summary, write_report
    from wdx.scoring.metrics import by_domain, prompt_table

    def run(hyp_suffix):
        rows = [dict(key=f"k{i}", domain=("normal", "dyslexic")[i % 2], ref="가나다라", hyp="가나다라" + hyp_suffix * i,
                     hyp_by_prompt={"normal": "가나다라", "dyslexic": "가나다"}) for i in range(4)]
        return {"results": by_domain(rows), "samples": rows, "compare_domains": prompt_table(rows)}

    evals = {"val_small": (run("마"), run("")), "val_unseen": (run("마바"), run("마"))}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in (
        {"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": 1.0, "eval/loss": 1.5, "eval/samples_per_s": 2.0,
                                         **{f"eval/{d}/cer": 0.1 for d in ("normal", "dyslexic", "all")}})))
    deployed = deployed_summary({"wdx.evaluate": (evals["val_small"][1], 3.0), "other": (evals["val_small"][0], 4.0)})
    costs = {"faster-whisper": {"clips": 4, "seconds": 2.0, "peak_mb": 300.4}}
    longform = [dict(domain="dyslexic", sentences=8, seconds=77.6, cer_one_by_one=0.1, cer_long=0.12)]
    no_speech = [dict(clips="as read", threshold=None, n=2, cer=0.1, empty=0, max_no_speech_prob=0.01),
                 dict(clips="as read", threshold=0.6, n=2, cer=0.5, empty=1, max_no_speech_prob=0.7)]
    figures = summary(evals, {"val_small": "seen voices", "val_unseen": "unseen voices"},
                      evals["val_small"][1]["compare_domains"], deployed, costs, longform, no_speech,
                      {"5 evaluate fine-tuned, val_unseen": 8.0}, "accelerate launch ...")
    path = write_report(tmp_path, evals, run_dir, figures)
    text = path.read_text()
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(figures))
    assert "| other | 0.250 | 0.500 | 0.375 | 1/4 | 4.0 |" in text  # k0: the one clip both decoded alike
    assert "| faster-whisper | 4 | 0.50 | 300 |" in text
    assert "| as read | 0.6 | 2 | 0.500 | 1 | 0.700 |" in text
    assert "| dyslexic | 8 | 78 | 0.100 | 0.120 |" in text  # only the columns the rows have
    assert "| seen voices | normal |" in text and "| unseen voices | all |" in text
    assert "| dyslexic | 0.000 | **0.250** | 2/2 |" in text  # the right token in bold; 2 of 2 changed
    assert "50 s per 100 clips" in text and "200 s per 100 clips" in text  # in-loop 2 clips/s; 8 s for 4 clips
    assert (tmp_path / "cer.png").exists()


def test_the_demo_launches_this_checkouts_train_loop_and_config(tmp_path):
    from pathlib import Path

    from wdx.demo.pipeline import train_command

    cmd = train_command(tmp_path / "data", tmp_path / "base", tmp_path / "runs")
    config, script = Path(cmd[cmd.index("--config_file") + 1]), Path(cmd[cmd.index("--config_file") + 2])
    assert config.is_file() and config.name == "cpu.yaml" and script.is_file() and script.name == "train_loop.py"
