"""wdx.pack on a KsponSpeech-shaped corpus: files per second per core, and peak memory.

    python -m bench.pack [--utterances 100000 20000] [--workers N] [--work DIR] [--json bench/pack.json]

Builds a synthetic tree as AI Hub ships KsponSpeech (KsponSpeech_01/KsponSpeech_NNNN/
KsponSpeech_NNNNNN.pcm, 1000 clips a folder, headerless 16 kHz 16-bit pcm, and
KsponSpeech_scripts/train.trn with `path :: text` lines in the corpus' markup), 1 in 500
rows broken (a missing or odd-length pcm, a transcript with nothing said), then runs
`python -m wdx.pack train.trn OUT --audio-root ... --domain normal` as a user would, once per
corpus size, in a process of its own. Clips last 1-3 s (KsponSpeech's mean is 5.6 s: the
projection scales by audio bytes as well as by files). Reported per size: seconds, files/s,
files/s per worker, MB of audio/s, the packing process's peak RSS (getrusage), its largest
worker's and all of its processes' together (sampled), and whether torch was imported.
Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from wdx import strictjson

REPO = Path(__file__).resolve().parents[1]
RATE = 16000
KSPON_UTTERANCES, KSPON_MEAN_SECONDS = 622_545, 5.6  # the whole corpus, for the projection
TEXTS = ["음/ 오늘은 b/ 날씨가 (3kg)/(삼 킬로그램) 좋네요", "그래서 학+ 학교에 갔어요 n/", "어/ 저기 *뭐라고 했지",
         "(70%)/(칠십 퍼센트) 확률이라니 l/", "책을 천천히 소리 내어 읽어 보세요"]
# runs in the child: wdx.pack's own main, then its own peak RSS (KiB on Linux) and whether torch came in
CHILD = ("import resource, sys, wdx.pack; code = wdx.data.pack.main(sys.argv[1:]); "
         "print('BENCH', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, 'torch' in sys.modules); sys.exit(code)")


def make_corpus(root: Path, n: int, seed: int = 0) -> tuple[Path, float]:
    """The tree and its train.trn; returns (the .trn, MB of audio)."""
    rng = np.random.default_rng(seed)
    scripts = root / "KsponSpeech_scripts"
    scripts.mkdir(parents=True, exist_ok=True)
    noise = (rng.standard_normal(3 * RATE) * 3000).astype("<i2").tobytes()  # sliced per clip: fast to write
    lines, total = [], 0
    for i in range(n):
        rel = f"KsponSpeech_01/KsponSpeech_{i // 1000 + 1:04d}/KsponSpeech_{i + 1:06d}.pcm"
        path = root / rel
        if i % 1000 == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
        samples = int(rng.integers(RATE, 3 * RATE))
        text = TEXTS[i % len(TEXTS)]
        if i % 500 == 123:  # 1 in 500 broken, three ways: no file, an odd-length pcm, nothing said
            kind = (i // 500) % 3
            if kind < 2:
                if kind == 1:
                    path.write_bytes(b"\x00\x01\x02")
                lines.append(f"{rel} :: {text}\n")
                continue
            text = "b/ n/"
        data = noise[: 2 * samples]
        path.write_bytes(data)
        total += len(data)
        lines.append(f"{rel} :: {text}\n")
    trn = scripts / "train.trn"
    trn.write_text("".join(lines), encoding="utf-8")
    return trn, total / 1e6


def run(trn: Path, root: Path, out: Path, workers: int) -> dict:
    """One `wdx.pack` process; its worker processes' memory (they are not its children to wait
    for: multiprocessing's forkserver starts them) is sampled every 0.1 s."""
    import psutil

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(trn), str(out), "--audio-root", str(root), "--domain",
                             "normal", "--workers", str(workers)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    worker_peak, total_peak = 0, 0
    tree = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            others = [p.memory_info().rss for p in tree.children(recursive=True)]
            total_peak = max(total_peak, tree.memory_info().rss + sum(others))
            worker_peak = max([worker_peak, *others])
        except psutil.Error:
            pass  # a process that just ended
        time.sleep(0.1)
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"wdx.pack failed: {stderr[-2000:]}")
    _, main_kib, torch_imported = next(x for x in stdout.splitlines() if x.startswith("BENCH")).split()
    skipped = next((x.split("skipped ", 1)[1] for x in stderr.splitlines() if "skipped " in x and " rows: " in x),
                   "none")
    return {"seconds": seconds, "main_peak_mb": int(main_kib) / 1024, "worker_peak_mb": worker_peak / 2**20,
            "all_processes_peak_mb": total_peak / 2**20, "torch_imported": torch_imported == "True",
            "skipped": skipped}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pack", description=__doc__.split("\n\n")[0])
    parser.add_argument("--utterances", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--work", type=Path, default=REPO / "bench" / ".work" / "pack")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "workers": args.workers, "sizes": {}}
    for n in args.utterances:
        root = args.work / f"kspon{n}"
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        trn, mb = make_corpus(root, n)
        made = time.perf_counter() - t0
        r = run(trn, root, args.work / f"out{n}", args.workers)
        r.update(utterances=n, audio_mb=mb, corpus_build_seconds=made, files_per_s=n / r["seconds"],
                 files_per_s_per_worker=n / r["seconds"] / args.workers, audio_mb_per_s=mb / r["seconds"])
        results["sizes"][str(n)] = r
        print(f"{n:>8} rows: {r['seconds']:.1f} s, {r['files_per_s']:.0f} files/s "
              f"({r['files_per_s_per_worker']:.0f} per worker), {r['audio_mb_per_s']:.1f} MB/s; peak RSS main "
              f"{r['main_peak_mb']:.0f} MB, largest worker {r['worker_peak_mb']:.0f} MB, all processes "
              f"{r['all_processes_peak_mb']:.0f} MB; torch imported: "
              f"{r['torch_imported']}; skipped {r['skipped']}", flush=True)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(args.work / f"out{n}", ignore_errors=True)
    sizes = sorted(results["sizes"].values(), key=lambda r: r["utterances"])
    big = sizes[-1]
    per_row_kb = ((big["main_peak_mb"] - sizes[0]["main_peak_mb"]) * 1024 / (big["utterances"] - sizes[0]["utterances"])
                  if len(sizes) > 1 else None)
    mb_per_file = big["audio_mb"] / big["utterances"]
    kspon_mb = KSPON_UTTERANCES * KSPON_MEAN_SECONDS * RATE * 2 / 1e6
    results["projection"] = {
        "kspon_utterances": KSPON_UTTERANCES, "kspon_audio_gb": kspon_mb / 1e3,
        "main_kb_per_row": per_row_kb,
        "main_peak_mb_at_kspon": (big["main_peak_mb"] + per_row_kb * (KSPON_UTTERANCES - big["utterances"]) / 1024
                                  if per_row_kb is not None else None),
        # the slower of the two rates measured here: per file (overheads) and per MB (bytes)
        "seconds_per_worker_at_kspon": max(KSPON_UTTERANCES / big["files_per_s_per_worker"],
                                           kspon_mb / (big["audio_mb_per_s"] / args.workers)),
        "mean_clip_mb_here": mb_per_file}
    print(f"projection to KsponSpeech's {KSPON_UTTERANCES:,} utterances ({kspon_mb / 1e3:.0f} GB of pcm): "
          f"{results['projection']['seconds_per_worker_at_kspon'] / 3600:.2f} h on one worker; main process "
          f"{results['projection']['main_peak_mb_at_kspon']:.0f} MB", flush=True)
    if args.json:
        args.json.write_text(strictjson.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
