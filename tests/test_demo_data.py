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
    assert sorted(m["domain"] for m in train_meta) == ["dyslexic"] * 5 + ["normal"] * 5
    assert not {m["intended"] for m in train_meta} & {m["intended"] for m in val_meta}
    formats = {k.split(".")[-1] for k in _members(a / "train")}
    assert {"wav", "flac", "mp3", "ogg", "m4a"} <= formats


def _members(split_dir):
    names = []
    for shard in split_dir.glob("*.tar"):
        with tarfile.open(shard) as tf:
            names += tf.getnames()
    return names
