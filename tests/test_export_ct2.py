"""wdx.export_ct2 and the ct2 backend: the same greedy transcripts as the HF model."""

import json

import pytest
import torch

from tests.conftest import speechlike
from tests.conftest import varied_final as make_varied_final
from tests.test_evaluate import clips
from wdx.deploy import export_ct2
from wdx.scoring import transcribe
from wdx.scoring.ct2_inference import CT2Transcriber
from wdx.scoring.inference import HFTranscriber

DOMAINS = ("normal", "dyslexic")


@pytest.fixture(scope="module")
def varied_final(tiny_model, tmp_path_factory):
    return make_varied_final(tiny_model, tmp_path_factory.mktemp("varied") / "final")


@pytest.fixture(scope="module")
def exported(varied_final, tmp_path_factory):
    out = tmp_path_factory.mktemp("ct2")
    return {q: export_ct2.export(varied_final, out / q, quantization=q) for q in ("float32", "int8")}


def test_float32_export_decodes_exactly_as_the_hf_model_with_each_domain_prompt(varied_final, exported):
    audio = [speechlike(1.0 + i / 2, 16000, seed=i) for i in range(4)]
    hf = HFTranscriber(varied_final, max_new_tokens=10)
    ct2 = CT2Transcriber(exported["float32"], max_new_tokens=10)
    by_domain = {}
    for d in DOMAINS:
        by_domain[d] = hf(audio, [d] * 4)
        assert ct2(audio, [d] * 4) == by_domain[d]
    assert by_domain["normal"] != by_domain["dyslexic"]  # the prompt reached both decoders
    assert CT2Transcriber(exported["int8"], max_new_tokens=10)(audio, ["normal"] * 4)  # int8 runs


def test_the_export_carries_tokenizer_mel_bins_and_the_prompts(varied_final, exported):
    out = exported["float32"]
    assert {"model.bin", "tokenizer.json", "preprocessor_config.json", "domain_prompts.json"} <= {
        p.name for p in out.iterdir()}
    prompts = json.loads((out / "domain_prompts.json").read_text())
    assert prompts["dyslexic"]["tokens"] == ["<|startoftranscript|>", "<|ko|>", "<|transcribe|>",
                                             "<|notimestamps|>", "<|domain:dyslexic|>"]
    assert prompts["dyslexic"]["ids"] == HFTranscriber(varied_final).prompt("dyslexic")
    assert json.loads((out / "preprocessor_config.json").read_text())["feature_size"] == 80


def test_transcribe_cli_with_the_ct2_backend(exported, tmp_path, capsys):
    (path,) = clips(tmp_path, 1)
    assert transcribe.main([str(exported["float32"]), str(path), "--backend", "ct2", "--compare-domains",
                            "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith(f"{path}\t[normal] ")
    assert transcribe.main([str(tmp_path), str(path), "--backend", "ct2"]) == 1
    assert "no model.bin; not a CTranslate2 export" in capsys.readouterr().err


def test_export_refuses_what_it_cannot_convert_in_one_line(varied_final, tmp_path, capsys):
    assert export_ct2.main([str(tmp_path), str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err.strip() == (f"wdx.export_ct2: error: {tmp_path}: no config.json; not a model "
                                               "directory (use RUN/final, or --export a checkpoint)")
    # issue 34.7: a Hub id was told "no config.json; not a model directory"
    assert export_ct2.main(["openai/whisper-base", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err.strip() == ("wdx.export_ct2: error: openai/whisper-base: no such directory; "
                                               "wdx.export_ct2 exports a local model directory (RUN/final, or a Hub "
                                               "model downloaded first)")
    import shutil

    bare = shutil.copytree(varied_final, tmp_path / "bare")
    (bare / "tokenizer.json").unlink()
    assert export_ct2.main([str(bare), str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err.strip() == (f"wdx.export_ct2: error: {bare}: no tokenizer.json; CTranslate2 and "
                                               "faster-whisper need it next to the weights")


def test_the_transformers_pipeline_decodes_with_the_domain_prompt_as_wdx_does(varied_final):
    from transformers import pipeline

    asr = pipeline("automatic-speech-recognition", model=str(varied_final), device="cpu")
    audio = speechlike(1.5, 16000, seed=1)
    ours = HFTranscriber(varied_final, max_new_tokens=40)  # final/ allows 443 (test_train_loop); 40 is quicker
    texts = {}
    for d in DOMAINS:
        prompt = torch.tensor([ours.prompt(d)])
        texts[d] = asr({"raw": audio, "sampling_rate": 16000}, generate_kwargs={"decoder_input_ids": prompt,
                                                                                   "max_new_tokens": 40})["text"]
        assert texts[d].strip() == ours([audio], [d])[0]
    assert texts["normal"] != texts["dyslexic"]


def test_export_never_deletes_the_model_its_run_or_other_files(varied_final, tmp_path, capsys):
    # issue 22.5: main's `export_ct2 RUN/final RUN/final --force` deleted the trained model, then failed
    import shutil

    run = tmp_path / "run"
    final = shutil.copytree(varied_final, run / "final")
    (run / "checkpoints").mkdir()
    for out in (final, run, tmp_path):
        assert export_ct2.main([str(final), str(out), "--force"]) == 1
        assert capsys.readouterr().err.strip() == (
            f"wdx.export_ct2: error: {out}: is or holds {final} (or lies inside it); choose an output directory "
            "outside the model and its run directory")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    assert export_ct2.main([str(final), str(other), "--force"]) == 1
    assert capsys.readouterr().err.strip() == (f"wdx.export_ct2: error: {other}: holds files but no CTranslate2 "
                                               "model.bin; --force only replaces an earlier export, never other files")
    assert (final / "model.safetensors").is_file() and (run / "checkpoints").is_dir()
    assert (other / "thesis.tex").exists()


def test_a_space_before_the_domain_token_is_stripped_as_faster_whisper_encodes_the_prefix(varied_final, exported):
    # issue 25.1: faster-whisper sends `" " + prefix`; main's export made that <|notimestamps|> 220 <|domain:X|>
    from tokenizers import Tokenizer

    for out in exported.values():
        tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
        for domain, prompt in json.loads((out / export_ct2.PROMPTS_FILE).read_text()).items():
            token = prompt["tokens"][-1]
            assert tokenizer.encode(" " + token, add_special_tokens=False).ids == [prompt["ids"][-1]], domain
    plain = Tokenizer.from_file(str(varied_final / "tokenizer.json"))
    assert len(plain.encode(" <|domain:dyslexic|>", add_special_tokens=False).ids) == 2  # final/ itself: unchanged


def test_the_ct2_backend_imports_neither_torch_nor_transformers(exported, tmp_path):
    # issue 34.6: wdx.transcribe --backend ct2 paid torch's memory (1.7 GB against faster-whisper's 316 MB)
    import subprocess
    import sys

    from wdx.data.audio import encode_audio
    from wdx.data.inputs import read_clip

    path = tmp_path / "clip.flac"  # 44.1 kHz: resampled, without torchaudio
    path.write_bytes(encode_audio(speechlike(1.5, 44100, seed=3), 44100, "flac"))
    code = ("import runpy, sys\n"
            "sys.argv = ['wdx.transcribe', *sys.argv[1:]]\n"
            "try:\n"
            "    runpy.run_module('wdx.transcribe', run_name='__main__', alter_sys=True)\n"
            "except SystemExit as exc:\n"
            "    status = exc.code\n"
            "print('imported', sorted(m for m in ('torch', 'torchaudio', 'transformers') if m in sys.modules))\n"
            "sys.exit(status)\n")
    done = subprocess.run([sys.executable, "-c", code, str(exported["int8"]), str(path), "--backend", "ct2",
                           "--domain", "dyslexic", "--max-new-tokens", "6"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    line, imported = done.stdout.strip().splitlines()
    assert imported == "imported []"
    expected = CT2Transcriber(exported["int8"], max_new_tokens=6)([read_clip(path, lean=True)], ["dyslexic"])[0]
    assert line == f"{path}\t[dyslexic] {expected}"
