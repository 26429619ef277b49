"""`make bench-shard`: `shard` and the run-level commands at the field's scale, on this machine.

1. shard a tree of N small files (JPEG and PNG, 32x32, unique bytes) with 2 worker processes, and
   the same images as 20 parquet files (Hugging Face layout, row groups of 1,000): files/s and the
   peak RSS of the largest process of each command (the CLI or a worker);
2. shard M photo-sized JPEGs (1 to 4 megapixels, full decode as always): files/s;
3. a cache of K rows (extracted at 8x8 with the tiny random UNet, so the model costs nothing):
   `status` and `verify` wall time, each as the CLI a user runs.

    python benchmarks/bench_shard.py [--small 200000] [--photos 2000] [--cached 100000] [--out DIR]
"""

from __future__ import annotations

import argparse
import atexit
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def cli(*args: object) -> tuple[float, float, str]:
    """(seconds, peak RSS in MiB of the largest child process so far, stdout) of one CLI command.
    (Linux carries a parent's RSS high-water mark into its children: keep this process small.)"""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], capture_output=True,
                          text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{args[0]} failed:\n{proc.stderr[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return seconds, peak, proc.stdout


def small_tree(root: Path, n: int, per_folder: int = 1000, parquet: Path | None = None,
               parquet_files: int = 20, row_group: int = 1000) -> Path:
    """n unique 32x32 images, half JPEG (real) half PNG (fake), in folders of `per_folder`; the same
    bytes also as `parquet_files` parquet files in the Hugging Face layout (an `image` struct,
    `label`, `model`), `row_group` rows per row group, when `parquet` is given."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    per_file = -(-n // parquet_files)
    rows: dict[str, list] = {"image": [], "label": [], "model": []}
    for i in range(n):
        label = "0_real" if i % 2 == 0 else "1_fake"
        folder = root / "train" / f"gen{i // (2 * per_folder):04d}" / label
        folder.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG" if label == "0_real" else "PNG", quality=90)
        (folder / f"{i:07d}.{'jpg' if label == '0_real' else 'png'}").write_bytes(buf.getvalue())
        if parquet is not None:
            rows["image"].append({"bytes": buf.getvalue(), "path": None})
            rows["label"].append(label[2:])
            rows["model"].append(f"gen{i // (2 * per_folder):04d}")
            if len(rows["image"]) == per_file or i == n - 1:
                f = i // per_file
                (parquet / "data").mkdir(parents=True, exist_ok=True)
                pq.write_table(pa.table(rows), parquet / f"data/train-{f:05d}-of-{parquet_files:05d}.parquet",
                               row_group_size=row_group)
                rows = {k: [] for k in rows}
    return root


def peak_cli(*args: object) -> tuple[float, float, str]:
    """(seconds, peak RSS in MiB of this command's processes alone, its stdout): run through a
    small Python parent whose children are that command only."""
    code = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); "
            "print(r.stdout); sys.stderr.write(r.stderr[-3000:]); sys.exit(r.returncode)")
    proc = subprocess.run([sys.executable, "-c", code, sys.executable, str(ROOT / "cli.py"), *map(str, args)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{args[0]} failed:\n{proc.stderr[-2000:]}")
    head, _, rest = proc.stdout.partition("\n")
    seconds, peak = map(float, head.split())
    return seconds, peak, rest


def photo_tree(root: Path, n: int) -> Path:
    """n smooth-noise JPEGs of 1 to 4 megapixels (as camera photos compress), quality 90."""
    rng = np.random.default_rng(1)
    sizes = [(1280, 960), (1920, 1080), (2048, 1536), (2304, 1728)]
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        folder = root / "test" / "photos" / ("0_real" if i % 2 == 0 else "1_fake")
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:05d}.jpg", quality=90)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=200_000)
    ap.add_argument("--photos", type=int, default=2000)
    ap.add_argument("--cached", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="Keep the trees here (default: a temp dir).")
    args = ap.parse_args()
    tmp = args.out
    if tmp is None:  # bench.scratch_dir's way, without importing bench (torch) before the RSS figures
        tmp = Path(tempfile.mkdtemp(prefix="bench-shard-"))
        atexit.register(shutil.rmtree, tmp, True)
    results: dict = {"cpu": os.cpu_count()}

    t0 = time.perf_counter()
    small = small_tree(tmp / "small", args.small, parquet=tmp / "parquet")
    print(f"made {args.small} small files (and as 20 parquet files) in {time.perf_counter() - t0:.0f} s",
          flush=True)
    for name, inp in (("small", small), ("parquet", tmp / "parquet")):  # the same images, side by side
        sec, peak, _ = peak_cli("shard", inp, "--run", tmp / f"run-{name}", "--workers", args.workers)
        results[name] = {"files": args.small, "seconds": round(sec, 1),
                         "files_per_s": round(args.small / sec), "peak_rss_mib": round(peak)}
        print(f"shard {args.small} small images from {'files' if name == 'small' else 'parquet'}, "
              f"{args.workers} workers: {args.small / sec:.0f} files/s, peak RSS {peak:.0f} MiB", flush=True)

    photos = photo_tree(tmp / "photos", args.photos)
    sec, _, _ = cli("shard", photos, "--run", tmp / "run-photos", "--workers", args.workers)
    results["photos"] = {"files": args.photos, "seconds": round(sec, 1),
                         "files_per_s": round(args.photos / sec, 1)}
    print(f"shard {args.photos} photo-sized JPEGs (1-4 MP): {args.photos / sec:.1f} files/s", flush=True)

    from stages.domain.noise_model import make_test_model  # torch only now: RSS above is shard's own

    model = make_test_model(tmp / "tiny", size=8)
    run = tmp / "run-cached"
    sub = small / "train"
    folders = sorted(sub.iterdir())[: max(1, args.cached // 2000)]
    sec, _, _ = cli("shard", *folders, "--run", run, "--workers", args.workers, "--split", "train")
    sec, _, out = cli("extract", "--run", run, "--model", model, "--size", 8, "--batch-size", 256,
                      "--device", "cpu", "--json")
    cached = json.loads(out)["images"]
    print(f"extracted {cached} rows at 8x8 in {sec:.0f} s", flush=True)
    status_s, _, _ = cli("status", "--run", run)
    verify_s, _, _ = cli("verify", "--run", run)
    results["cached"] = {"rows": cached, "status_seconds": round(status_s, 2),
                         "verify_seconds": round(verify_s, 2)}
    print(f"status over {cached} cached rows: {status_s:.2f} s; verify: {verify_s:.1f} s", flush=True)
    out = (args.out or ROOT / "runs" / "bench") / "bench_shard.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"results in {out}")


if __name__ == "__main__":
    main()
