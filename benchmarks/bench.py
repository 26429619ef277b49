"""`make bench`: extraction and training speed, host cost and cache size, side by side in one run.

Prints, for each UNet (tiny and mid-size on the CPU; also the bedroom-size config on CUDA, random
weights): extract images/s of the pipeline, of the model alone on pre-made tensors (the bound), and
their ratio; a reference-style loop (per-image read and resize, fp32 forward at batch 16, one PNG
per image with save_image) on the same images and its speed-up; host cost per image in
CPU-core-milliseconds; training samples/s from the cache vs the ResNet50 alone vs a PNG
ImageFolder; cache bytes per image per encoding vs the reference's PNG files.

    python benchmarks/bench.py [--images 48] [--size 256] [--device auto] [--precisions fp32,bf16]
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.device import resolve_device, resolve_precision  # noqa: E402
from stages.domain.images import decode_rgb, preprocess  # noqa: E402
from stages.domain.noise_model import encode, load_noise_model, make_test_model  # noqa: E402
from stages.extract import ExtractOptions, auto_batch_size, run_extract  # noqa: E402
from stages.shard import run_shard  # noqa: E402

UNETS = {
    "mid": dict(block_out_channels=(32, 32, 64, 64, 128, 128), layers_per_block=1,
                down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4),
    "bedroom": dict(block_out_channels=(128, 128, 256, 256, 512, 512), layers_per_block=2,
                    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
                    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6),
}


def make_unet(name: str, out: Path, size: int) -> Path:
    if name == "tiny":
        return make_test_model(out, size=64)
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=size, attention_head_dim=None, norm_num_groups=32, **UNETS[name])
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(out, safe_serialization=True)
    return out


def scratch_dir(prefix: str) -> Path:
    """A temporary folder for one benchmark run, removed when the script exits (a run makes GBs)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, True)
    return path


def results_file(given: str | Path | None, name: str) -> Path:
    """Where a benchmark writes its JSON: the given path, else runs/bench/NAME (git-ignored, kept)."""
    out = Path(given) if given else ROOT / "runs" / "bench" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def make_jpegs(folder: Path, n: int, size: int) -> None:
    """Photo-like JPEGs (smooth structure plus grain), half 'real' and half 'fake', train split."""
    rng = np.random.default_rng(0)
    for i in range(n):
        label = "0_real" if i % 2 else "1_fake"
        yy, xx = np.mgrid[0:size, 0:size] / size
        base = np.stack([np.sin(xx * (3 + c + i % 5) + yy * (2 + i % 3)) for c in range(3)], -1)
        arr = np.clip((base * 0.4 + 0.5) * 255 + rng.normal(0, 12, (size, size, 3)), 0, 255)
        path = folder / "train" / "bench" / label / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr.astype(np.uint8)).save(path, quality=90)


def median_rate(fn, units: int, repeats: int = 3) -> float:
    """units / median seconds of `fn` over `repeats` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return units / statistics.median(times)


def model_bound(model, n: int, batch: int, size: int) -> float:
    x = torch.rand(batch, 3, size, size, device=model.device) * 2 - 1
    batches = -(-n // batch)

    def run():
        for _ in range(batches):
            model.predict(x)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
    return median_rate(run, batches * batch, repeats=2)


def reference_loop(model_dir: Path, files: list[Path], size: int, device, workers: int, out: Path) -> float:
    """The paper's extraction loop: DataLoader of read_image + Resize, fp32 batch 16, save_image."""
    import torchvision.transforms as T
    from torch.utils.data import DataLoader, Dataset
    from torchvision.io import read_image
    from torchvision.utils import save_image

    class RefSet(Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            x = read_image(str(files[i])).float()
            x = T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC)(x)
            return (x / 255.0) * 2.0 - 1.0, str(out / f"{i:05d}.png")

    model = load_noise_model(model_dir, device, "fp32", channels_last=False)
    out.mkdir(parents=True, exist_ok=True)

    def run():
        for x, paths in DataLoader(RefSet(), batch_size=16, num_workers=workers):
            eps = model.predict(x.to(device), 0)
            for item, p in zip(eps, paths, strict=True):
                save_image(item, p)
    return median_rate(run, len(files), repeats=1)


def host_cost_ms(files: list[Path], size: int, cache_dir: Path, encoding: str = "reference") -> dict:
    """CPU-core-ms per image of everything but the model: read + hash, decode + resize, encode, and
    the cache write: `write` as extract does it now (the shard's bytes written directly, zstd level 1
    on a thread pool), `write_zarr_python` as format 1 did (zarr-python's assignment, level 3)."""
    import zarr

    from storage.zarr_cache import ZSTD_LEVEL, RowShardLayout, write_row_shard

    torch.set_num_threads(1)
    t = {"read": 0.0, "decode": 0.0, "encode": 0.0, "write": 0.0, "write_zarr_python": 0.0}
    eps = torch.randn(1, 3, size, size) * 0.3
    out = np.zeros((len(files), 3, size, size), np.uint8 if encoding == "reference" else np.float16)
    for i, f in enumerate(files):
        c0 = time.process_time()
        data = f.read_bytes()
        hashlib.sha256(data).hexdigest()
        c1 = time.process_time()
        preprocess(decode_rgb(data), size)
        c2 = time.process_time()
        out[i] = encode(eps, encoding).numpy()[0]
        t["read"] += c1 - c0
        t["decode"] += c2 - c1
        t["encode"] += time.process_time() - c2
    name = f"{len(files)}-{size}-{files[0].parent.name}-{encoding}"
    paths = [cache_dir / f"w{k}-{name}.zarr" for k in range(2)]
    arrays = [zarr.create_array(paths[k], overwrite=True, shape=out.shape, dtype=out.dtype,
                                chunks=(1, 3, size, size), shards=out.shape,
                                compressors=zarr.codecs.ZstdCodec(level=level), fill_value=0)
              for k, level in enumerate((3, ZSTD_LEVEL))]  # as format 1 wrote it; as extract writes now
    c0 = time.process_time()
    arrays[0][:] = out
    t["write_zarr_python"] = time.process_time() - c0
    c0 = time.process_time()
    write_row_shard(RowShardLayout.read(paths[1]), 0, out)
    t["write"] = time.process_time() - c0
    torch.set_num_threads(os.cpu_count() or 1)
    per = {k: 1000 * v / len(files) for k, v in t.items()}
    per["total"] = sum(v for k, v in per.items() if k != "write_zarr_python")
    per["total_with_zarr_python_write"] = per["total"] - per["write"] + per["write_zarr_python"]
    return per


def host_ceiling(tmp: Path, size_in: int, size_out: int, n: int, encoding: str = "reference",
                 backend: str = "zarr", workers: int = 2, batch: int = 64, run: Path | None = None) -> dict:
    """Images/s of the real extract pipeline (shard files, decode, resize, encode, cache write,
    done markers, claims) with the UNet's forward replaced by a no-op of the right shape: what the
    host can feed a GPU at most. The no-op exists in this benchmark only. `run`: an already
    sharded run (packed, parquet) instead of the JPEG folder's."""
    from stages.domain.noise_model import NoiseModel

    data = tmp / f"ceiling-{size_in}-{n}"
    if not data.exists():
        make_jpegs(data, n, size_in)
    if run is None:
        run = tmp / f"ceiling-run-{size_in}-{n}"
        if not run.exists():
            run_shard([data], run, shard_size=128)
    model = tmp / "unet-ceiling"
    if not model.exists():
        make_test_model(model, size=64)
    predict = NoiseModel.predict
    NoiseModel.predict = lambda self, x, timestep=0: x  # (B, 3, S, S) float32 in, the same out
    try:
        cache = tmp / f"ceiling-cache-{size_in}-{encoding}-{backend}-{workers}-{time.perf_counter_ns()}"
        summary = run_extract(run, ExtractOptions(model, size=size_out, encoding=encoding, backend=backend,
                                                  workers=workers, batch_size=batch, device="cpu",
                                                  cache_dir=cache))
    finally:
        NoiseModel.predict = predict
    return {"jpeg": size_in, "out": size_out, "encoding": encoding, "backend": backend, "workers": workers,
            "images": summary["images"], "host_ceiling_img_s": summary["images_per_s"]}


def parquet_runs(tmp: Path, n: int, size_in: int, row_group: int = 100, files: int = 3,
                 shard_size: int = 1024) -> dict[str, Path]:
    """The host ceiling's JPEGs as three runs of `shard_size` shards (the default): the files,
    packed tars (`shard --pack`) and parquet files in the Hugging Face layout (`image` struct,
    `label`), `row_group` rows per row group (the `datasets` library's for images: 100)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp / f"ceiling-{size_in}-{n}"
    if not data.exists():
        make_jpegs(data, n, size_in)
    jpegs = sorted(data.rglob("*.jpg"))
    out = tmp / f"parquet-{size_in}-{n}"
    per = -(-len(jpegs) // files)
    for f in range(files):
        chunk = jpegs[f * per:(f + 1) * per]
        table = pa.table({"image": [{"bytes": p.read_bytes(), "path": p.name} for p in chunk],
                          "label": ["fake" if "1_fake" in str(p) else "real" for p in chunk]})
        (out / "data").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out / f"data/train-{f:05d}-of-{files:05d}.parquet", row_group_size=row_group)
    runs = {"files": tmp / f"pq-cmp-files-{size_in}", "packed tars": tmp / f"pq-cmp-packed-{size_in}",
            "parquet": tmp / f"pq-cmp-parquet-{size_in}"}
    run_shard([data], runs["files"], shard_size=shard_size)
    run_shard([data], runs["packed tars"], shard_size=shard_size, pack=True)
    run_shard([out], runs["parquet"], shard_size=shard_size)
    return runs


def parquet_vs_packed(tmp: Path, n: int, size_in: int, cpus: int) -> list[dict]:
    """Host ceiling reading the same JPEGs from files, packed tars and parquet (side by side), and
    the bytes extract read from parquet / the bytes of the image column (workers 0: in process)."""
    import storage.parquet_images as pi

    runs = parquet_runs(tmp, n, size_in)
    read = [0]
    original = pi.read_column

    def counted(file, row_group, column):
        cells = original(file, row_group, column)
        read[0] += sum(len(c) for c in cells if c)
        return cells
    rows = []
    for workers in sorted({0, cpus}):
        for name, run in runs.items():
            pi.read_column = counted
            read[0] = 0
            try:
                row = host_ceiling(tmp, size_in, 256, n, workers=workers, run=run)
            finally:
                pi.read_column = original
            row["backend"] = f"zarr, from {name}"
            if name == "parquet" and workers == 0:
                column = sum(p.stat().st_size for p in (tmp / f"ceiling-{size_in}-{n}").rglob("*.jpg"))
                row["parquet_bytes_read_per_column_byte"] = round(read[0] / column, 3)
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    return rows


def old_writer_ceiling(tmp: Path, n: int) -> dict:
    """The same ceiling with the cache written as before this version: zarr-python's assignment at
    zstd level 3 on the writer thread alone (side by side with the new writer, in one run)."""
    import storage.zarr_cache as zc

    layout, level = zc.ZarrCache._dnf_layout, zc.ZSTD_LEVEL
    zc.ZarrCache._dnf_layout, zc.ZSTD_LEVEL = (lambda self: None), 3
    try:
        row = host_ceiling(tmp, 256, 256, n, "reference", "zarr", 0)
    finally:
        zc.ZarrCache._dnf_layout, zc.ZSTD_LEVEL = layout, level
    return {**row, "backend": "zarr (zarr-python writer, level 3: before)"}


def host_only(args, tmp: Path) -> None:
    """`--host-only`: the host ceiling of each configuration and the core-ms of each step."""
    cpus = os.cpu_count() or 1
    configs = [(256, "reference", "zarr"), (1024, "reference", "zarr"), (256, "raw", "zarr"),
               (256, "reference", "webdataset")]
    rows, steps = [], {}
    for size_in, encoding, backend in configs:
        n = args.host_images if size_in <= 256 else max(64, args.host_images // 4)
        for workers in sorted({0, cpus}):
            rows.append(host_ceiling(tmp, size_in, 256, n, encoding, backend, workers))
            print(json.dumps(rows[-1]), flush=True)
        make_jpegs(tmp / f"steps{size_in}", 32, size_in)
        steps[f"{size_in} {encoding}"] = host_cost_ms(sorted((tmp / f"steps{size_in}").rglob("*.jpg")), 256,
                                                      tmp, encoding)
    rows.append(old_writer_ceiling(tmp, args.host_images))
    print(json.dumps(rows[-1]), flush=True)
    rows += parquet_vs_packed(tmp, args.host_images, 256, cpus)
    best = max(r["host_ceiling_img_s"] for r in rows if r["jpeg"] == 256 and r["backend"] == "zarr"
               and r["encoding"] == "reference")
    print("\n## Host ceiling (no-op UNet; images/s, 256x256 DNF)")
    print("| JPEG in | encoding | backend | decode workers | images/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['jpeg']}x{r['jpeg']} | {r['encoding']} | {r['backend']} | {r['workers']} | "
              f"{r['host_ceiling_img_s']:.0f} |")
    print("\n## Host cost per image, CPU-core-ms (one thread each step, alone)")
    cols = ["read", "decode", "encode", "write", "total", "write_zarr_python", "total_with_zarr_python_write"]
    print("| input | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 1))
    for k, h in steps.items():
        print(f"| {k} | " + " | ".join(f"{h[c]:.2f}" for c in cols) + " |")
    ratio = next((r["parquet_bytes_read_per_column_byte"] for r in rows
                  if "parquet_bytes_read_per_column_byte" in r), None)
    print(f"\nextract from parquet read {ratio} bytes per byte of the image column")
    print(f"\nhost ceiling: {best:.0f} images/s (256x256 JPEG -> 256x256 reference DNF, Zarr, "
          f"{cpus} cores)")
    out = results_file(args.results, "bench_host.json")
    out.write_text(json.dumps({"cpu_cores": cpus, "host_ceiling_img_s": best, "ceilings": rows,
                               "core_ms_per_image": steps}, indent=2))
    print(f"results in {out}")


def training_rates(cache, size: int, batch: int, samples: int, device, png_dir: Path) -> dict:
    """Samples/s: ResNet50 steps from the cache; the model alone; data paths alone (cache vs PNG)."""
    import torchvision
    from torch.utils.data import DataLoader

    from stages.domain.detector import build_resnet50, classifier_input
    from storage.feature_dataset import CacheDataset, cache_index

    ds = CacheDataset(cache, cache_index(cache, "train"))
    model = build_resnet50(seed=0).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    steps = max(1, samples // batch)

    def step(x, y):
        x = classifier_input(x.to(device, non_blocking=True))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(model(x).float().squeeze(1), y.to(device).float())
        opt.zero_grad()
        loss.backward()
        opt.step()

    fixed = (torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8), torch.zeros(batch))

    def alone():
        for _ in range(steps):
            step(*fixed)
        if device.type == "cuda":
            torch.cuda.synchronize()

    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=2, pin_memory=device.type == "cuda",
                        persistent_workers=True)

    def from_cache():
        done = 0
        while done < steps:
            for x, y in loader:
                step(x, y)
                done += 1
                if done == steps:
                    break
        if device.type == "cuda":
            torch.cuda.synchronize()

    # The data paths alone, in one process (no worker start-up in the figure): what a sample costs.
    def read_cache():
        for _ in DataLoader(ds, batch_size=batch, shuffle=True, num_workers=0):
            pass

    folder = torchvision.datasets.ImageFolder(str(png_dir), transform=torchvision.transforms.ToTensor())

    def read_png():
        for _ in DataLoader(folder, batch_size=batch, shuffle=True, num_workers=0):
            pass

    return {"model_alone": median_rate(alone, steps * batch, repeats=1),
            "from_cache": median_rate(from_cache, steps * batch, repeats=1),
            "read_cache": median_rate(read_cache, len(ds)),
            "read_png_imagefolder": median_rate(read_png, len(folder))}


def dnf_vs_dire(tmp: Path, size: int, device, batch: int, images: int = 8, ddim_steps: int = 20) -> dict:
    """Images/s of DNF and of DIRE (`--feature dire`, 2 x ddim_steps UNet passes) for the same
    UNet (tiny) on the same images, side by side in one run, and their ratio."""
    data = tmp / "dire-data"
    make_jpegs(data, images, size)
    run_shard([data], tmp / "dire-run", shard_size=images)
    model = make_unet("tiny", tmp / "unet-dire", size)
    rates = {}
    for kind in ("dnf", "dire"):
        s = run_extract(tmp / "dire-run", ExtractOptions(model, size=size, batch_size=batch or 8,
                                                         device=str(device), feature_kind=kind,
                                                         ddim_steps=ddim_steps))
        rates[kind] = s["images_per_s"]
    return {**rates, "dnf/dire": round(rates["dnf"] / rates["dire"], 1), "ddim_steps": ddim_steps}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--host-sizes", default="256,1024", help="JPEG sizes for the host cost")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--models", default="", help="default: tiny,mid (CPU); tiny,mid,bedroom (CUDA)")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--batch-size", type=int, default=0, help="0: 8 on the CPU, auto on CUDA")
    ap.add_argument("--workers", type=int, default=-1)
    ap.add_argument("--train-samples", type=int, default=32)
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--host-only", action="store_true", help="Only the host ceiling (no-op UNet) and "
                                                               "the core-ms of each host step.")
    ap.add_argument("--host-images", type=int, default=3072, help="256x256 JPEGs for the host ceiling "
                    "(in shards of 128: enough for the steady state)")
    ap.add_argument("--results", default="", help="Where to write the results JSON "
                    "(default: runs/bench/bench_host.json).")
    args = ap.parse_args()
    if args.host_only:
        host_only(args, scratch_dir("dnf-bench-host-"))
        return
    device = resolve_device(args.device)
    models = args.models.split(",") if args.models else (
        ["tiny", "mid", "bedroom"] if device.type == "cuda" else ["tiny", "mid"])
    batch = args.batch_size or (8 if device.type == "cpu" else 0)
    tmp = scratch_dir("dnf-bench-")
    make_jpegs(tmp / "data", args.images, args.size)
    files = sorted((tmp / "data").rglob("*.jpg"))
    run_shard([tmp / "data"], tmp / "run", shard_size=max(8, args.images // 3))
    env = {"device": str(device), "cpu_cores": os.cpu_count(), "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
           "images": args.images, "image_size": args.size}
    print(json.dumps(env), flush=True)
    rows = []
    for name in models:
        model_dir = make_unet(name, tmp / f"unet-{name}", args.size)
        params = sum(p.numel() for p in load_noise_model(model_dir, torch.device("cpu")).unet.parameters())
        workers = ExtractOptions(model_dir, workers=args.workers).num_workers(device)
        ref = reference_loop(model_dir, files, args.size, device, workers, tmp / f"ref-{name}")
        for precision in args.precisions.split(","):
            resolve_precision(precision, device)
            model = load_noise_model(model_dir, device, precision)
            b = batch or auto_batch_size(model, args.size)
            bound = model_bound(model, args.images, b, args.size)
            summary = run_extract(tmp / "run", ExtractOptions(
                model_dir, size=args.size, batch_size=b, workers=args.workers, device=str(device),
                precision=precision, cache_dir=tmp / f"cache-{name}-{precision}"))
            pipe = summary["images_per_s"]
            rows.append({"unet": name, "params_M": round(params / 1e6, 2), "precision": precision,
                         "batch": b, "pipeline_img_s": pipe, "bound_img_s": round(bound, 2),
                         "pipeline/bound": round(pipe / bound, 3), "reference_loop_img_s": round(ref, 2),
                         "speedup_vs_reference": round(pipe / ref, 2)})
            print(json.dumps(rows[-1]), flush=True)
    dire = dnf_vs_dire(tmp, args.size, device, batch)
    host = {}
    for s in map(int, args.host_sizes.split(",")):
        make_jpegs(tmp / f"host{s}", 8, s)
        host[s] = host_cost_ms(sorted((tmp / f"host{s}").rglob("*.jpg")), args.size, tmp)
    # caches per encoding, the reference PNG tree, and training
    from stages.export_png import run_export_png

    run_shard([tmp / "data"], tmp / "trainrun", shard_size=max(8, args.images // 3))
    tiny = make_unet("tiny", tmp / "unet-train", args.size)
    from storage.zarr_cache import ZarrCache

    sizes = {}
    for enc in ("reference", "raw"):
        s = run_extract(tmp / "trainrun", ExtractOptions(tiny, size=args.size, encoding=enc,
                                                         device=str(device), batch_size=batch or 16,
                                                         workers=args.workers))
        sizes[f"zarr {enc}"] = folder_bytes(Path(s["cache"]) / "features.zarr") / s["images"]
        if enc == "reference":
            ref_cache = s
    run_export_png(tmp / "trainrun", tmp / "png", ref_cache["feature_id"])
    sizes["reference PNG files"] = folder_bytes(tmp / "png") / args.images
    train = training_rates(ZarrCache(ref_cache["cache"]), args.size, args.train_batch, args.train_samples,
                           device, tmp / "png")

    print("\n## Extraction (images/s, median)")
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    print(f"\n## DNF vs DIRE (tiny UNet, {args.size}x{args.size}, the same images)\n"
          f"DNF {dire['dnf']} images/s, DIRE (ddim{dire['ddim_steps']}) {dire['dire']} images/s: "
          f"DNF is {dire['dnf/dire']}x faster")
    print("\n## Host cost per image, CPU-core-ms (one thread; JPEG in, 256x256 out)")
    print("| JPEG size | read+hash | decode+resize | encode | write | total |\n|---|---|---|---|---|---|")
    for s, h in host.items():
        print(f"| {s}x{s} | {h['read']:.2f} | {h['decode']:.2f} | {h['encode']:.2f} | {h['write']:.2f} | "
              f"{h['total']:.2f} |")
    print("(`make bench-host` measures the host ceiling of the whole pipeline with a no-op UNet)")
    print("\n## Training (samples/s, ResNet50 at the cache size)")
    for k, v in train.items():
        print(f"- {k}: {v:.1f}")
    if train:
        print(f"- data path speed-up, cache vs PNG ImageFolder: "
              f"{train['read_cache'] / train['read_png_imagefolder']:.1f}x")
        print(f"- training from the cache / model alone: {train['from_cache'] / train['model_alone']:.3f}")
    print("\n## Cache bytes per image")
    for k, v in sizes.items():
        print(f"- {k}: {v / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
