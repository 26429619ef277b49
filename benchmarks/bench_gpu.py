"""`make bench-gpu` and benchmarks/gpu_run.sh: the GPU figures, in one command on a CUDA box.

The bedroom-size UNet (the LSUN-bedroom DDPM's architecture, 114 M parameters, random weights) through
the real `extract` pipeline with `--resize-on device`, at fp32 / bf16 / fp16, compile off/on, batch 64
and 256, nvJPEG off/on, on 2,048 JPEGs of 256 and of 1024 px (made here); the authors' per-image
loop (fp32, batch 16, read + resize in workers, one save_image PNG per image) for the speed-up; NPR
and CLIP (ViT-L/14's architecture, random weights, built offline from a config); one training epoch
under torchrun on one GPU. Each row is a JSON record in the results file, rewritten after every row
(a run stopped half-way keeps its rows); rows go most important first, and with `--budget-s` a row
whose estimate no longer fits is skipped with a note. benchmarks/GPU.md says how to run it with the
device tool and what each field means.

`--quick` is the same code on a tiny grid (tiny UNet and CLIP, 16 JPEGs of 48 and 96 px): how the
script is checked on a CPU (`--device cpu --quick`, tests/test_bench_gpu.py).

    python benchmarks/bench_gpu.py [--quick] [--budget-s 420] [--out gpu_results.json]
    python benchmarks/bench_gpu.py --table gpu_results.json   # the table of a results file
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

T_START = time.monotonic()  # before torch's import: --budget-s counts the imports too

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench import make_unet, reference_loop, results_file, scratch_dir  # noqa: E402
from pipeline.device import resolve_device, resolve_precision  # noqa: E402
from stages.domain.feature_kinds import feature_kind  # noqa: E402
from stages.extract import ExtractOptions, run_extract  # noqa: E402
from stages.shard import run_shard  # noqa: E402

# ViT-L/14's vision tower with its 768-d projection (openai/clip-vit-large-patch14), random weights
TRAIN_EPOCHS = 2  # the train row's epochs: the last one's line is the figure (the first warms up)
CLIP_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=224, patch_size=14, projection_dim=768)


@dataclass(frozen=True)
class Task:
    """One row: an extract configuration (dnf, npr, clip), the reference loop, or a training epoch."""

    kind: str
    precision: str = "fp32"
    compile: bool = False
    batch: int = 256
    jpeg: int = 256  # side of the input JPEGs
    nvjpeg: bool = False
    estimate_s: float = 20.0  # what the row takes on the H200 at most, about (the budget guard's figure)
    channels_last: bool = True  # the UNet's memory layout (off: the `alone` row's layout cost)

    @property
    def name(self) -> str:
        if self.kind == "reference":
            return f"reference loop {self.jpeg}px"
        if self.kind == "train":
            return f"train {TRAIN_EPOCHS} epochs {self.precision}{' amp' if self.precision != 'fp32' else ''}"
        if self.kind == "alone":
            return (f"dnf {self.precision} b{self.batch} model-alone "
                    f"channels_last-{'on' if self.channels_last else 'off'}")
        return (f"{self.kind} {self.precision} compile-{'on' if self.compile else 'off'} b{self.batch} "
                f"{self.jpeg}px nvjpeg-{'on' if self.nvjpeg else 'off'}")


class Budget:
    """Seconds left of a run's budget; a row runs only if its estimate fits (None: no budget)."""

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.monotonic,
                 start: float | None = None):
        self.seconds, self.clock = seconds, clock
        self.start = clock() if start is None else start

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - (self.clock() - self.start)

    def fits(self, task: Task) -> bool:
        return self.left() >= task.estimate_s

    def note(self, task: Task) -> str:
        return f"skipped: budget ({max(0.0, self.left()):.0f} s left, the row needs about " \
               f"{task.estimate_s:.0f} s)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; --quick swaps in the tiny grid's sizes where an option was left at its default."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true",
                    help="tiny UNet and CLIP, 16 JPEGs of 48 and 96 px, batches 4 and 8, bf16 and fp32 "
                         "(the check on a CPU)")
    ap.add_argument("--images", type=int, default=None, help="JPEGs per input size (default 2048)")
    ap.add_argument("--jpegs", default=None, help="input JPEG sides, first = the main one (256,1024)")
    ap.add_argument("--batches", default=None, help="extract batch sizes (64,256)")
    ap.add_argument("--precisions", default=None, help="fp32,bf16,fp16 (--quick: bf16,fp32)")
    ap.add_argument("--no-compile", action="store_true", help="leave the torch.compile rows out")
    ap.add_argument("--resize-on", default="device", choices=("device", "workers", "auto"))
    ap.add_argument("--workers", type=int, default=-1, help="loader workers (-1: extract's auto)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch's default; --quick on a CPU: 1, so a shared machine's "
                         "cores are not oversubscribed)")
    ap.add_argument("--reference-images", type=int, default=512, help="images the reference loop times")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds for all rows; a row whose estimate no longer fits is skipped with a note")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (runs/bench/gpu_results.json)")
    ap.add_argument("--table", type=Path, default=None, help="print the table of this results file, exit")
    ap.add_argument("--train-worker", default=None, help=argparse.SUPPRESS)  # the train row's torchrun rank
    args = ap.parse_args(argv)
    quick = args.quick
    args.images = args.images or (16 if quick else 2048)
    args.jpeg_sizes = [int(s) for s in (args.jpegs or ("48,96" if quick else "256,1024")).split(",")]
    args.batch_sizes = sorted({int(b) for b in (args.batches or ("4,8" if quick else "64,256")).split(",")})
    args.precisions = args.precisions or ("bf16,fp32" if quick else "fp32,bf16,fp16")
    args.size = 32 if quick else 256  # the DNF's side (the bedroom model's)
    args.clip_size = 32 if quick else 224
    args.repeats = 1 if quick else 3  # timed passes of the model alone (median)
    return args


def build_grid(args: argparse.Namespace, cuda: bool) -> list[Task]:
    """The rows, most important first: the bf16 pipeline at the main JPEG size and largest batch (the
    goal row, with its model-alone rate), the reference loop, then nvJPEG, the large JPEGs, the small
    batch, fp16, the UNet alone without channels_last, training, NPR and CLIP, the reference loop on the
    large JPEGs, torch.compile, fp32 (slow without TF32: last of the single rows), and the rest."""
    big, small = max(args.batch_sizes), min(args.batch_sizes)
    main_px, *other_px = args.jpeg_sizes
    precisions = args.precisions.split(",")
    first = "bf16" if "bf16" in precisions else precisions[0]
    decodes = (False, True) if cuda else (False,)  # nvJPEG is CUDA's
    compiles = (False, True) if cuda and not args.no_compile else (False,)

    def dnf(precision: str = first, compile: bool = False, batch: int = big, jpeg: int = main_px,
            nvjpeg: bool = False) -> Task:
        est = (60 if precision == "fp32" else 15) + (150 if compile else 0) + (10 if jpeg > 512 else 0)
        return Task("dnf", precision, compile, batch, jpeg, nvjpeg, est)

    rows = [dnf(), Task("reference", jpeg=main_px, batch=16, estimate_s=30)]
    rows += [dnf(nvjpeg=True)] if cuda else []
    rows += [dnf(jpeg=px, nvjpeg=nv) for px in other_px for nv in decodes]
    rows += [dnf(batch=small, nvjpeg=nv) for nv in decodes]
    rows += [dnf(precision=p) for p in precisions if p not in (first, "fp32")]
    rows += [Task("alone", first, batch=big, jpeg=main_px, estimate_s=10, channels_last=False)]
    rows += [Task("train", "bf16" if cuda else "fp32", batch=64, jpeg=main_px, estimate_s=75),
             Task("npr", "fp32", batch=big, jpeg=main_px, estimate_s=10),
             Task("clip", first, batch=big, jpeg=main_px, estimate_s=45)]
    rows += [Task("reference", jpeg=px, batch=16, estimate_s=20) for px in other_px]
    rows += [dnf(compile=True)] if True in compiles else []
    rows += [dnf(precision="fp32")] if "fp32" in precisions and first != "fp32" else []
    rows += [dnf(p, c, b, main_px, nv) for p in precisions for c in compiles for b in (big, small)
             for nv in decodes]  # the whole product at the main size
    rows += [dnf(first, c, b, px, nv) for px in other_px for c in compiles for b in (big, small)
             for nv in decodes]  # the large JPEGs change the host's work, not the model's: first precision
    seen, grid = set(), []
    for t in rows:
        if t.name not in seen:
            seen.add(t.name)
            grid.append(t)
    return grid


def _write_jpegs(folder: Path, start: int, stop: int, size: int) -> None:
    """JPEGs start..stop-1: smooth structure plus grain (photo-like bytes per pixel), each unique."""
    from PIL import Image

    rng = np.random.default_rng(start)
    yy, xx = (np.mgrid[0:size, 0:size] / size).astype(np.float32)
    grain = rng.normal(0, 12, (size, size, 3)).astype(np.float32)
    for i in range(start, stop):
        base = np.stack([np.sin(xx * (3 + c + i % 5) + yy * (2 + i % 3)) for c in range(3)], -1)
        arr = np.clip((base * 0.4 + 0.5) * 255 + np.roll(grain, 7 * i, axis=1), 0, 255).astype(np.uint8)
        arr[:8, :8] = (i % 256, i // 256 % 256, 0)  # no two alike: shard would keep one of a duplicate
        label = "0_real" if i % 2 else "1_fake"
        path = folder / "train" / "bench" / label / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path, quality=90)


def make_jpegs_parallel(folder: Path, n: int, size: int) -> None:
    """n JPEGs of size x size on all cores (2,048 of 1024 px: minutes on one core)."""
    procs = max(1, min(os.cpu_count() or 1, 16, n // 16 or 1))
    step = -(-n // procs)
    if procs == 1:
        _write_jpegs(folder, 0, n, size)
        return
    with ProcessPoolExecutor(procs) as pool:
        list(pool.map(_write_jpegs, [folder] * procs, range(0, n, step),
                      [min(n, s + step) for s in range(0, n, step)], [size] * procs))


@contextmanager
def preloaded(kind: str, model) -> Iterator[None]:
    """extract takes this already loaded (and, with compile, already compiled) model instead of
    loading its own: the pipeline row times the pipeline, not a model load or a compile."""
    registered = feature_kind(kind)
    registered.load = lambda *a, **k: model
    try:
        yield
    finally:
        del registered.load


@contextmanager
def timed_features(model) -> Iterator[dict]:
    """What the model computed during the block, in the dict yielded, filled when the block ends:
    `busy_s`, the seconds of all forwards (CUDA events around each batch's forward; the rest of the
    wall time the GPU waited for data); `steady_img_s`, the images after the first batch over the time
    from the end of the first forward to the end of the last (worker start-up, the first batch and the
    last write left out); `forwards`, the number of batches."""
    spans, box = [], {}
    forward = model.features
    cuda = model.device.type == "cuda"

    def timed(x, feature):
        if not cuda:
            t0 = time.perf_counter()
            out = forward(x, feature)
            spans.append((t0, time.perf_counter(), x.shape[0]))
            return out
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = forward(x, feature)
        b.record()
        spans.append((a, b, x.shape[0]))
        return out
    model.features = timed
    try:
        yield box
    finally:
        del model.features
        if cuda:
            torch.cuda.synchronize()

        def seconds(a, b) -> float:
            return a.elapsed_time(b) / 1000 if cuda else b - a
        box.update(busy_s=sum(seconds(a, b) for a, b, _ in spans), forwards=len(spans), steady_img_s=None)
        if len(spans) > 1 and seconds(spans[0][1], spans[-1][1]) > 0:
            box["steady_img_s"] = sum(n for *_, n in spans[1:]) / seconds(spans[0][1], spans[-1][1])


def nvjpeg_probe(device: torch.device) -> str | None:
    """Why torchvision's GPU JPEG decoder cannot decode one tiny JPEG on `device`, or None when it can.
    extract falls back to the CPU per image when nvJPEG refuses, so without this check an nvJPEG row
    would time CPU decoding under an nvJPEG label."""
    import io

    import torchvision.io
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 60, 200)).save(buf, "JPEG")
    try:
        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        img = torchvision.io.decode_jpeg(data, device=device)
        if tuple(img.shape) != (3, 16, 16):
            return f"decode_jpeg gave shape {tuple(img.shape)} for a 16x16 RGB JPEG"
    except Exception as e:  # whatever the decoder raises: the rows say it
        return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    return None


def skip_reason(task: Task, budget: Budget, nvjpeg_error: str | None) -> str | None:
    """The note of a row that is not run (nvJPEG unavailable, or the budget), or None to run it."""
    if task.nvjpeg and nvjpeg_error:
        return f"skipped: nvJPEG unavailable (decode_jpeg on the device failed: {nvjpeg_error})"
    return None if budget.fits(task) else budget.note(task)


@contextmanager
def count_jpeg_fallbacks() -> Iterator[dict]:
    """Counts, while the block runs, torchvision's decode_jpeg calls that raised: a batch call
    (extract then decodes that batch's files one by one) and a single-file call (that file is then
    decoded on the CPU, or rejected). extract's behaviour is unchanged; only the calls are counted."""
    import torchvision.io

    counts = {"batch_calls_failed": 0, "cpu_fallbacks": 0}
    inner = torchvision.io.decode_jpeg

    def counting(data, *args, **kwargs):
        try:
            return inner(data, *args, **kwargs)
        except RuntimeError:
            counts["batch_calls_failed" if isinstance(data, list) else "cpu_fallbacks"] += 1
            raise
    torchvision.io.decode_jpeg = counting
    try:
        yield counts
    finally:
        torchvision.io.decode_jpeg = inner


def write_profile(step: Callable[[], object], path: Path, device: torch.device, steps: int = 2) -> None:
    """torch.profiler's table of the kernels (CUDA) or operators (CPU) that `steps` calls of `step`
    spent the most time in, written to `path`."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"  # torch >= 2.4's name
    table = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=90)
    path.write_text(f"torch.profiler, {steps} calls, sorted by {key}\n{table}\n")


class Bench:
    """The run's shared pieces, each made when a row first needs it: JPEG runs, models, rates."""

    def __init__(self, args: argparse.Namespace, device: torch.device, tmp: Path,
                 budget: Budget | None = None, profile: Path | None = None):
        self.args, self.device, self.tmp = args, device, tmp
        self.budget = budget or Budget(None)
        self.profile, self.profile_note = profile, None  # row 1's model-alone kernel table, written once
        self.warmed = False  # the untimed extract before row 1 ran
        self.cuda = device.type == "cuda"
        self.runs: dict[int, Path] = {}
        self.dirs: dict[str, Path] = {}
        self.models: dict[tuple, object] = {}
        self.alone: dict[tuple, float] = {}
        self.refs: dict[int, float] = {}
        self.tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)

    def workers(self) -> int:
        return ExtractOptions(None, workers=self.args.workers).num_workers(self.device) or \
            min(8, os.cpu_count() or 1)

    def run_for(self, jpeg: int) -> Path:
        if jpeg not in self.runs:
            t0 = time.perf_counter()
            data, run = self.tmp / f"jpegs-{jpeg}", self.tmp / f"run-{jpeg}"
            make_jpegs_parallel(data, self.args.images, jpeg)
            run_shard([data], run, shard_size=max(8, min(1024, self.args.images // 2)),
                      workers=min(8, os.cpu_count() or 1))
            print(f"{self.args.images} JPEGs of {jpeg} px made and sharded in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
            self.runs[jpeg] = run
        return self.runs[jpeg]

    def model_dir(self, kind: str) -> Path | None:
        if kind == "npr":
            return None
        if kind not in self.dirs:
            out = self.tmp / f"model-{kind}"
            if kind == "clip":
                from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

                from stages.domain.feature_kinds.clip import make_test_clip

                if self.args.quick:
                    make_test_clip(out, image_size=self.args.clip_size)
                else:
                    torch.manual_seed(0)
                    CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_L14)).save_pretrained(out)
            else:
                make_unet("tiny" if self.args.quick else "bedroom", out, self.args.size)
            self.dirs[kind] = out
        return self.dirs[kind]

    def size(self, kind: str) -> int:
        return self.args.clip_size if kind == "clip" else self.args.size

    def free_models(self) -> None:
        """Drop the cached model, so a row that loads its own measures its own peak memory."""
        self.models.clear()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def model(self, t: Task):
        key = (t.kind, t.precision, t.compile, t.channels_last)
        if key not in self.models:
            self.free_models()  # one loaded at a time
            if t.channels_last:
                self.models[key] = feature_kind(t.kind).load(self.model_dir(t.kind), self.device,
                                                             t.precision, compile=t.compile)
            else:  # the UNet in its default layout (extract always loads it channels_last)
                from stages.domain.noise_model import load_noise_model

                self.models[key] = load_noise_model(self.model_dir("dnf"), self.device, t.precision,
                                                    channels_last=False, compile=t.compile)
        return self.models[key]

    def model_alone(self, model, t: Task) -> float:
        """Images/s of the forward alone on a resident batch, the median of 3 timed passes (--quick: 1)
        after warm-up batches (which also compile): the rate the pipeline should reach. The first call
        also writes the profiler's kernel table of two batches (`profile`)."""
        kind = "dnf" if t.kind == "alone" else t.kind
        key = (kind, t.precision, t.compile, t.batch, t.channels_last)
        if key not in self.alone:
            size = self.size(kind)
            x = torch.rand(t.batch, 3, size, size, device=self.device) * 2 - 1
            steps = max(2, min(self.args.images, 512) // t.batch)
            for _ in range(2 if self.cuda else 1):
                model.predict(x)
            rates = []
            for _ in range(self.args.repeats):
                self.sync()
                t0 = time.perf_counter()
                for _ in range(steps):
                    model.predict(x)
                self.sync()
                rates.append(steps * t.batch / (time.perf_counter() - t0))
            self.alone[key] = statistics.median(rates)
            if self.profile and self.profile_note is None:
                try:
                    write_profile(lambda: model.predict(x), self.profile, self.device)
                    self.profile_note = f"profile of this row's model alone: {self.profile.name}"
                except Exception as e:  # a profiler that cannot start must not cost the row
                    self.profile_note = f"profiler failed: {type(e).__name__}: {e}"[:300]
        return self.alone[key]

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def defaults(self) -> None:
        """TF32 as torch has it by default (an fp32 row turns it off, as extract's fp32 does)."""
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.tf32
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2) if self.cuda else None


def extract_options(b: Bench, t: Task, cache: Path) -> ExtractOptions:
    """extract's options for this row, its cache in `cache`."""
    return ExtractOptions(
        b.model_dir(t.kind), size=b.size(t.kind), batch_size=t.batch, workers=b.args.workers,
        device=str(b.device), precision=t.precision, compile=t.compile, gpu_decode=t.nvjpeg,
        resize_on=b.args.resize_on, feature_kind=t.kind, cache_dir=cache)


def extract_row(b: Bench, t: Task) -> dict:
    """The real extract over the run's JPEGs with this configuration, and the model alone beside it;
    before the first such row, one untimed extract warms the page cache, the kernels and the loader."""
    run = b.run_for(t.jpeg)
    resolve_precision(t.precision, b.device)
    model = b.model(t)
    alone = b.model_alone(model, t)
    first = not b.warmed
    out: dict = {"profile_note": b.profile_note} if first and b.profile_note else {}
    with preloaded(t.kind, model):
        if first:
            t0 = time.perf_counter()
            run_extract(run, extract_options(b, t, b.tmp / "cache-warmup"))
            shutil.rmtree(b.tmp / "cache-warmup", ignore_errors=True)
            b.warmed, out["warmup_s"] = True, round(time.perf_counter() - t0, 1)
        cache = b.tmp / f"cache-{t.name.replace(' ', '_')}"
        with timed_features(model) as busy, count_jpeg_fallbacks() as fallbacks:
            s = run_extract(run, extract_options(b, t, cache))
        shutil.rmtree(cache, ignore_errors=True)
    pipe, steady = s["images_per_s"], busy["steady_img_s"]
    out.update({
        "images": s["images"], "rejected": s["rejected"], "out_px": b.size(t.kind),
        "resize_on": b.args.resize_on, "pipeline_img_s": pipe, "model_alone_img_s": round(alone, 1),
        "pipeline_over_model": round(pipe / alone, 3),
        "pipeline_steady_img_s": None if steady is None else round(steady, 1),
        "steady_over_model": None if steady is None else round(steady / alone, 3),
        "gpu_wait_fraction": round(max(0.0, 1 - busy["busy_s"] / s["seconds"]), 3) if s["seconds"] else None,
        "peak_gpu_gib": b.peak_gib()})
    if t.nvjpeg:
        out["nvjpeg_cpu_fallbacks"] = fallbacks["cpu_fallbacks"]
        out["nvjpeg_batch_fallbacks"] = fallbacks["batch_calls_failed"]
        if fallbacks["cpu_fallbacks"]:
            out.update(status="fallback", note=f"{fallbacks['cpu_fallbacks']} of {s['images']} images "
                       "were decoded on the CPU: nvJPEG refused them (not an nvJPEG figure)")
    return out


def alone_row(b: Bench, t: Task) -> dict:
    """The UNet alone on a resident batch in this layout; beside it, the channels_last rate at the same
    precision and batch when a row already measured it (the layout's cost, with no pipeline around)."""
    resolve_precision(t.precision, b.device)
    rate = b.model_alone(b.model(t), t)
    on = b.alone.get(("dnf", t.precision, False, t.batch, True))
    return {"out_px": b.args.size, "model_alone_img_s": round(rate, 1),
            "channels_last_speedup": round(on / rate, 3) if on else None, "peak_gpu_gib": b.peak_gib()}


def reference_row(b: Bench, t: Task) -> dict:
    """The authors' loop (benchmarks/bench.py's reference_loop) on the first N JPEGs of this size."""
    run = b.run_for(t.jpeg)
    files = sorted((run.parent / f"jpegs-{t.jpeg}").rglob("*.jpg"))[:b.args.reference_images]
    b.free_models()  # its peak memory is its own model's, not the cached pipeline model's too
    # TF32 off, as extract's fp32 (pipeline/device.py resolve_precision) turns it off: like with like
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    rate = reference_loop(b.model_dir("dnf"), files, b.args.size, b.device, b.workers(),
                          b.tmp / f"ref-{t.jpeg}")
    shutil.rmtree(b.tmp / f"ref-{t.jpeg}", ignore_errors=True)
    b.refs[t.jpeg] = rate
    return {"images": len(files), "out_px": b.args.size, "reference_img_s": round(rate, 1),
            "tf32": torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32,
            "peak_gpu_gib": b.peak_gib()}


def train_row(b: Bench, t: Task) -> dict:
    """TRAIN_EPOCHS epochs of `train` (ResNet50, batch 64, bf16 autocast on CUDA) under torchrun with one
    process (world size 1: no DDP wrapper), on a cache of the run's JPEGs (made with the tiny UNet: the
    cache's values do not change the speed); the figures are the last epoch's line of metrics.jsonl."""
    run = b.run_for(t.jpeg)
    tiny = make_unet("tiny", b.tmp / "model-train", b.args.size)
    s = run_extract(run, ExtractOptions(tiny, size=b.args.size, batch_size=64, device=str(b.device),
                                        workers=b.args.workers))
    b.free_models()
    opts = {"name": "gpu-bench", "epochs": TRAIN_EPOCHS, "batch_size": t.batch, "workers": b.workers(),
            "device": b.device.type, "feature_id": s["feature_id"], "val_from": "train:0.1"}
    # the worker calls run_train itself, not cli.py: the device image's own typer version stays out of it
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           str(Path(__file__).resolve()), "--train-worker", json.dumps({"run": str(run), **opts})]
    t0 = time.perf_counter()
    proc = run_bounded(cmd, train_timeout(b.budget.left()), ROOT)
    if proc.returncode:
        raise RuntimeError(f"train exited {proc.returncode}: {proc.stderr[-3000:]}")
    m = json.loads((run / "train/gpu-bench/metrics.jsonl").read_text().splitlines()[-1])
    return {"images": round(s["images"] * 0.9), "epoch": m["epoch"],
            "train_samples_per_s": m["train_samples_per_s"], "data_wait_fraction": m["data_wait_fraction"],
            "ranks": m.get("ranks"), "command_s": round(time.perf_counter() - t0, 1)}


def train_timeout(left: float) -> float:
    """Seconds the train row's torchrun may take: what the budget has left but 5 s, at least 30."""
    return max(30.0, left - 5.0)


def run_bounded(cmd: list[str], timeout: float, cwd: Path) -> subprocess.CompletedProcess:
    """Run cmd in its own process group; past `timeout` seconds kill the whole group (torchrun and its
    worker) and raise TimeoutError."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise TimeoutError(f"{Path(cmd[0]).name} {' '.join(cmd[1:3])} timed out after {timeout:.0f} s "
                           "(the budget's time left); killed") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


ROWS = {"dnf": extract_row, "npr": extract_row, "clip": extract_row, "reference": reference_row,
        "train": train_row, "alone": alone_row}


def with_speedups(rows: list[dict], refs: dict[int, float]) -> list[dict]:
    """Each DNF row's images/s over the reference loop's on the same JPEGs (once that row ran)."""
    for r in rows:
        if r["kind"] == "dnf" and r["status"] == "ok" and refs.get(r["jpeg_px"]):
            r["speedup_vs_reference"] = round(r["pipeline_img_s"] / refs[r["jpeg_px"]], 2)
    return rows


def environment(args: argparse.Namespace, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    versions = {}
    for name in ("diffusers", "transformers", "zarr", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return {"gpu": torch.cuda.get_device_name(device) if cuda else None,
            "gpu_memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
            if cuda else None,
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "python": platform.python_version(), "cpu_cores": os.cpu_count(), "device": str(device),
            **versions, "quick": args.quick, "images": args.images, "jpeg_px": args.jpeg_sizes,
            "out_px": args.size, "resize_on": args.resize_on, "budget_s": args.budget_s,
            "torch_threads": torch.get_num_threads(),
            "unet": "tiny" if args.quick else "bedroom (ch 128, mult 1,1,2,2,4,4, 2 res blocks, attn 16x16)"}


def write_results(out: Path, env: dict, rows: list[dict], t0: float) -> None:
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"env": env, "elapsed_s": round(time.monotonic() - t0, 1), "rows": rows},
                              indent=2))
    tmp.replace(out)


COLUMNS = [("row", "row"), ("images/s", "pipeline_img_s"), ("model alone", "model_alone_img_s"),
           ("pipe/model", "pipeline_over_model"), ("steady img/s", "pipeline_steady_img_s"),
           ("steady/model", "steady_over_model"), ("peak GiB", "peak_gpu_gib"),
           ("x reference", "speedup_vs_reference"), ("GPU waited", "gpu_wait_fraction"),
           ("ref img/s", "reference_img_s"), ("train samples/s", "train_samples_per_s"),
           ("data wait", "data_wait_fraction"), ("s", "seconds")]


def print_table(result: dict) -> None:
    env = result["env"]
    print(f"\n{env.get('gpu') or env.get('device')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
          f"{result.get('elapsed_s')} s")
    print("| " + " | ".join(h for h, _ in COLUMNS) + " | note |\n|" + "---|" * (len(COLUMNS) + 1))
    for r in result["rows"]:
        cells = ["-" if r.get(k) is None else str(r[k]) for _, k in COLUMNS]
        print("| " + " | ".join(cells) + f" | {r.get('note', '')} |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if __name__ == "__main__":  # gpu_run.sh's timeout: exit through atexit, which removes the scratch folder
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.table:
        print_table(json.loads(args.table.read_text()))
        return
    if args.train_worker:
        from stages.train import TrainOptions, run_train

        spec = json.loads(args.train_worker)
        print(json.dumps(run_train(Path(spec.pop("run")), TrainOptions(**spec))))
        return
    t0 = time.monotonic()
    budget = Budget(args.budget_s, start=T_START)
    device = resolve_device(args.device)
    if device.type != "cuda" and not args.quick:
        raise SystemExit("bench-gpu needs a CUDA GPU (a check of the script on a CPU: --device cpu --quick)")
    if args.quick and device.type == "cpu" and not args.threads:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the train row's torchrun process too
    out = results_file(args.out, "gpu_results.json")
    env = environment(args, device)
    nvjpeg_error = nvjpeg_probe(device) if device.type == "cuda" else None
    env["nvjpeg"] = "ok" if device.type == "cuda" and not nvjpeg_error else nvjpeg_error
    print(json.dumps(env), flush=True)
    bench = Bench(args, device, scratch_dir("dnf-bench-gpu-"), budget, out.with_name("gpu_profile_row1.txt"))
    rows: list[dict] = []
    for task in build_grid(args, device.type == "cuda"):
        row = {"row": task.name, **asdict(task), "jpeg_px": task.jpeg}
        del row["jpeg"], row["estimate_s"]
        if note := skip_reason(task, budget, nvjpeg_error):
            row.update(status="skipped", note=note)
        else:
            started = time.monotonic()
            bench.defaults()
            try:
                row["status"] = "ok"
                row.update(ROWS[task.kind](bench, task))
            except torch.cuda.OutOfMemoryError:
                row.update(status="error", note="out of GPU memory")
            except Exception as e:  # one broken row must not cost the rest of a device lease
                traceback.print_exc()
                row.update(status="error", note=f"{type(e).__name__}: {' '.join(str(e).split())[-300:]}")
            row["seconds"] = round(time.monotonic() - started, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_results(out, env, with_speedups(rows, bench.refs), t0)
    write_results(out, env, with_speedups(rows, bench.refs), t0)
    print_table(json.loads(out.read_text()))
    print(f"results in {out}")


if __name__ == "__main__":
    main()
