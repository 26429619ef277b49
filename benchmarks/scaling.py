"""`make bench-scaling`: extract throughput with 1 worker vs N workers sharing one run's queue.

Each worker is a separate `dnf-pipeline extract` process limited to one CPU thread, standing in for
one GPU per worker; N workers on N cores should give N times the images/s of one. Prints images/s
per configuration (median of --repeats runs, each on a fresh run), measured from the first worker
start to the last worker exit (process start-up included) and inside the workers (from their own
summaries), and checks that every configuration wrote the same cache bytes.

    python benchmarks/scaling.py [--images 384] [--size 128] [--workers 1,2] [--repeats 3] [--claims auto]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench import make_jpegs  # noqa: E402
from stages.domain.noise_model import make_test_model  # noqa: E402
from stages.shard import run_shard  # noqa: E402


def cache_digest(run: Path) -> str:
    cache = next(p for p in (run / "cache").iterdir() if (p / "config.json").exists())
    h = hashlib.sha256()
    for path in sorted(p for p in cache.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(cache)).encode() + path.read_bytes())
    return h.hexdigest()[:16]


def extract_with(workers: int, data: Path, model: Path, run: Path, size: int, claims: str) -> dict:
    run_shard([data], run, shard_size=16)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "cli.py"), "extract", "--run", str(run), "--model", str(model),
           "--size", str(size), "--batch-size", "8", "--workers", "0", "--device", "cpu", "--json",
           "--claims", claims]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
             for _ in range(workers)]
    outs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - t0
    if any(p.returncode for p in procs):
        raise SystemExit(f"extract failed: {outs}")
    summaries = [json.loads(o) for o in outs]
    images = sum(s["images"] for s in summaries)
    inside = max(s["seconds"] for s in summaries)
    return {"wall_images_per_s": images / wall, "inside_images_per_s": images / inside,
            "shards": [s["shards_done_now"] for s in summaries], "digest": cache_digest(run)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--claims", default="auto")
    args = ap.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_jpegs(tmp / "data", args.images, 2 * args.size)
        model = make_test_model(tmp / "model", size=args.size)
        results: dict[int, list[dict]] = {w: [] for w in counts}
        for rep in range(args.repeats):
            for w in counts:  # interleaved, so drift on a noisy machine hits all alike
                results[w].append(extract_with(w, tmp / "data", model, tmp / f"run{w}-{rep}", args.size,
                                               args.claims))
    print(f"{args.images} JPEGs {2 * args.size}x{2 * args.size} -> DNF {args.size}x{args.size}, tiny UNet, "
          f"1 CPU thread per worker, claims {args.claims}, median of {args.repeats}")
    print("| workers | images/s (wall, incl. start-up) | images/s (inside workers) | speed-up (inside) "
          "| shards per worker |")
    print("|---|---|---|---|---|")
    base = statistics.median(r["inside_images_per_s"] for r in results[counts[0]])
    for w in counts:
        wall = statistics.median(r["wall_images_per_s"] for r in results[w])
        inside = statistics.median(r["inside_images_per_s"] for r in results[w])
        print(f"| {w} | {wall:.1f} | {inside:.1f} | {inside / base:.2f}x | {results[w][-1]['shards']} |")
    digests = {r["digest"] for rs in results.values() for r in rs}
    print("caches identical across all runs:", len(digests) == 1)


if __name__ == "__main__":
    main()
