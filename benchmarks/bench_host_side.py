"""Part of `make bench-host`: the host-side CPU cost per image of extract at the sizes real
datasets have (JPEG 256 / 512 / 1024 px, PNG 512 / 1024 px), before and after this version's
host path, with decode workers 0 and all cores, side by side in one run.

host core-ms per image = CPU time of the main process and its loader workers over the whole
extract (no-op UNet: the model costs nothing) minus what runs on the device (the resize, with
`--resize-on device`; on this CPU-only box it runs on the CPU, so it is timed and subtracted),
divided by the images. `before`: torchvision's decoders, resize in the workers, float32 handed
over (as extract was); `after`: simplejpeg / pyspng, uint8 handed over, resize on the device.
Also the breakdown per image of one thread alone: read + hash, decode, resize.

    python benchmarks/bench_host_side.py [--images 256] [--out runs/bench/bench_host_side.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench import results_file, scratch_dir  # noqa: E402

import stages.domain.images as images  # noqa: E402
import stages.extract as extract  # noqa: E402
from stages.domain.noise_model import NoiseModel, make_test_model  # noqa: E402
from stages.shard import run_shard  # noqa: E402

INPUTS = (("JPEG", 256), ("JPEG", 512), ("JPEG", 1024), ("PNG", 512), ("PNG", 1024))


def make_images(folder: Path, n: int, size: int, fmt: str) -> None:
    """Photo-like images (smooth structure plus grain), half real half fake."""
    rng = np.random.default_rng(size)
    for i in range(n):
        yy, xx = np.mgrid[0:size, 0:size] / size
        base = np.stack([np.sin(xx * (3 + c + i % 5) + yy * (2 + i % 3)) for c in range(3)], -1)
        arr = np.clip((base * 0.4 + 0.5) * 255 + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        path = folder / "train" / "bench" / ("0_real" if i % 2 else "1_fake") / f"{i:04d}.{fmt.lower()}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))


class DeviceClock:
    """CPU seconds spent in resized_batch (the device's part) in this process."""

    def __init__(self):
        self.seconds = 0.0
        self.original = extract.resized_batch

    def __enter__(self):
        def timed(batch, size):
            t0 = time.thread_time()
            out = self.original(batch, size)
            self.seconds += time.thread_time() - t0
            return out
        extract.resized_batch = timed
        return self

    def __exit__(self, *exc):
        extract.resized_batch = self.original


def cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def host_side(run: Path, model: Path, workers: int, after: bool, cache: Path) -> dict:
    """One extract with the no-op UNet: images/s and host core-ms per image."""
    fast = images._fast_decode
    if not after:
        images._fast_decode = lambda data, draft=0: None  # torchvision's decoders, as before
    predict = NoiseModel.predict
    NoiseModel.predict = lambda self, x, timestep=0: x
    torch.set_num_threads(1)  # the device's part runs on the calling thread: timed by thread_time
    try:
        with DeviceClock() as device:
            c0, t0 = cpu_seconds(), time.perf_counter()
            out = extract.run_extract(run, extract.ExtractOptions(
                model, size=256, workers=workers, batch_size=32, device="cpu", cache_dir=cache,
                resize_on="device" if after else "workers"))
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    finally:
        images._fast_decode, NoiseModel.predict = fast, predict
    n = out["images"]
    return {"images_per_s": round(n / wall, 1), "host_core_ms": round(1000 * (cpu - device.seconds) / n, 2),
            "device_core_ms": round(1000 * device.seconds / n, 2)}


def breakdown(files: list[Path]) -> dict:
    """One thread, per image: read + hash, decode (before / after), resize (the device's part)."""
    torch.set_num_threads(1)
    t = {"read": [], "decode_before": [], "decode_after": [], "resize": []}
    fast = images._fast_decode
    for f in files:
        c0 = time.process_time()
        data = f.read_bytes()
        hashlib.sha256(data).hexdigest()
        c1 = time.process_time()
        images._fast_decode = lambda data, draft=0: None
        images.decode_rgb(data)
        c2 = time.process_time()
        images._fast_decode = fast
        img = images.decode_rgb(data)
        c3 = time.process_time()
        images.resized_batch([img], 256)
        c4 = time.process_time()
        for k, v in zip(t, (c1 - c0, c2 - c1, c3 - c2, c4 - c3), strict=True):
            t[k].append(1000 * v)
    torch.set_num_threads(os.cpu_count() or 1)
    return {k: round(statistics.median(v), 2) for k, v in t.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256, help="256 px inputs; larger sizes get fewer")
    ap.add_argument("--results", default=None)
    args = ap.parse_args()
    tmp = scratch_dir("dnf-bench-host-side-")
    cpus = os.cpu_count() or 1
    model = make_test_model(tmp / "unet", size=64)
    rows = []
    for fmt, size in INPUTS:
        n = max(64, args.images * 256 // size)
        data = tmp / f"{fmt}-{size}"
        make_images(data, n, size, fmt)
        run = tmp / f"run-{fmt}-{size}"
        run_shard([data], run, shard_size=128)
        steps = breakdown(sorted(data.rglob(f"*.{fmt.lower()}"))[:16])
        for workers in sorted({0, cpus}):
            for after in (False, True):
                cache = tmp / f"cache-{fmt}-{size}-{workers}-{after}"
                row = {"input": f"{size} px {fmt}", "workers": workers,
                       "path": "after" if after else "before",
                       **host_side(run, model, workers, after, cache),
                       **({"breakdown_ms": steps} if workers == 0 and not after else {})}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n## Host side per image (no-op UNet; 256x256 reference DNF; decode workers 0 and all cores)")
    print("| input | workers | before: core-ms | after: core-ms | after: device core-ms | before: img/s | "
          "after: img/s |\n|---|---|---|---|---|---|---|")
    for fmt, size in INPUTS:
        for workers in sorted({0, cpus}):
            b, a = (next(r for r in rows if r["input"] == f"{size} px {fmt}" and r["workers"] == workers
                         and r["path"] == p) for p in ("before", "after"))
            print(f"| {size} px {fmt} | {workers} | {b['host_core_ms']} | {a['host_core_ms']} | "
                  f"{a['device_core_ms']} | {b['images_per_s']} | {a['images_per_s']} |")
    print("\n## One thread alone, median ms per image\n| input | read+hash | decode before | decode after | "
          "resize (device) |\n|---|---|---|---|---|")
    for r in rows:
        if "breakdown_ms" in r:
            s = r["breakdown_ms"]
            print(f"| {r['input']} | {s['read']} | {s['decode_before']} | {s['decode_after']} | "
                  f"{s['resize']} |")
    out = results_file(args.results, "bench_host_side.json")
    out.write_text(json.dumps({"cpu_cores": cpus, "rows": rows}, indent=2))
    print(f"results in {out}")


if __name__ == "__main__":
    main()
