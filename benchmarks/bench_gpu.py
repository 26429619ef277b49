"""`make bench-gpu`: the GPU figures, in one command on a CUDA box.

The bedroom-size UNet (the diffusers config of the LSUN-bedroom DDPM, random weights) at fp32, bf16
and fp16, with and without `--compile`, at batch sizes 16 to 256, with `--gpu-decode` off and on:
pipeline images/s (the real `extract` on 256x256 JPEGs), model-alone images/s on resident tensors,
their ratio, peak GPU memory, and the reference-style loop for the speed-up; then DDP training
throughput on 1 GPU (`torchrun --nproc-per-node 1 cli.py train`). Prints a markdown table and writes
the rows to a JSON file. `--quick` runs a reduced grid (and is how the script is checked on a CPU:
`--device cpu --quick --models tiny`).

    python benchmarks/bench_gpu.py [--images 2048] [--batches 16,64,256] [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench import make_jpegs, make_unet, model_bound, reference_loop, results_file, scratch_dir  # noqa: E402
from pipeline.device import resolve_device, resolve_precision  # noqa: E402
from stages.domain.noise_model import load_noise_model  # noqa: E402
from stages.extract import ExtractOptions, run_extract  # noqa: E402
from stages.shard import run_shard  # noqa: E402


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def one_config(tmp: Path, model_dir: Path, device: torch.device, precision: str, compile: bool, batch: int,
               gpu_decode: bool, images: int, size: int) -> dict:
    """Pipeline and model-alone images/s of one configuration, measured side by side."""
    resolve_precision(precision, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = load_noise_model(model_dir, device, precision, compile=compile)
    bound = model_bound(model, images, batch, size)
    tag = f"{model_dir.name}-{precision}-{int(compile)}-{batch}-{int(gpu_decode)}-{time.perf_counter_ns()}"
    summary = run_extract(tmp / "run", ExtractOptions(
        model_dir, size=size, batch_size=batch, device=str(device), precision=precision, compile=compile,
        gpu_decode=gpu_decode, cache_dir=tmp / f"cache-{tag}"))
    pipe = summary["images_per_s"]
    return {"unet": model_dir.name.removeprefix("unet-"), "precision": precision, "compile": compile,
            "batch": batch, "gpu_decode": gpu_decode, "pipeline_img_s": pipe,
            "model_alone_img_s": round(bound, 1), "pipeline/model": round(pipe / bound, 3),
            "peak_gpu_gib": peak_memory_gib(device)}


def ddp_training(tmp: Path, device: torch.device, size: int) -> dict:
    """Samples/s of `train` under torchrun with one process (DDP on one GPU), from a tiny-UNet cache."""
    tiny = make_unet("tiny", tmp / "unet-train", size)
    run_extract(tmp / "run", ExtractOptions(tiny, size=size, device=str(device), cache_dir=None))
    torchrun = Path(sys.executable).with_name("torchrun")
    workers = str(min(8, os.cpu_count() or 1))
    cmd = [str(torchrun), "--nproc-per-node", "1", str(ROOT / "cli.py"), "train", "--run-dir",
           str(tmp / "run"), "--name", "ddp", "--epochs", "1", "--batch-size", "64", "--workers", workers,
           "--device", str(device.type)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        return {"error": proc.stderr[-1000:]}
    line = json.loads((tmp / "run/train/ddp/metrics.jsonl").read_text().splitlines()[-1])
    return {"train_samples_per_s": line["train_samples_per_s"],
            "data_wait_fraction": line["data_wait_fraction"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--models", default="bedroom")
    ap.add_argument("--precisions", default="fp32,bf16,fp16")
    ap.add_argument("--batches", default="16,32,64,128,256")
    ap.add_argument("--quick", action="store_true", help="bf16 only, no compile, batches 64 and 256")
    ap.add_argument("--out", type=Path, default=None,
                    help="results JSON (default: runs/bench/bench_gpu.json)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    if device.type != "cuda" and not args.quick:
        raise SystemExit("bench-gpu needs a CUDA GPU (for a check of the script on a CPU: --device cpu "
                         "--quick --models tiny --images 32 --size 64)")
    precisions = ["bf16"] if args.quick and device.type == "cuda" else args.precisions.split(",")
    if args.quick and device.type != "cuda":
        precisions = ["fp32"]
    batches = [64, 256] if args.quick else [int(b) for b in args.batches.split(",")]
    compiles = [False] if args.quick else [False, True]
    decodes = [False, True] if device.type == "cuda" else [False]
    tmp = scratch_dir("dnf-bench-gpu-")
    make_jpegs(tmp / "data", args.images, args.size)
    run_shard([tmp / "data"], tmp / "run", shard_size=max(64, args.images // 8))
    env = {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "torch": torch.__version__, "images": args.images, "size": args.size}
    print(json.dumps(env), flush=True)
    rows, refs = [], {}
    for name in args.models.split(","):
        model_dir = make_unet(name, tmp / f"unet-{name}", args.size)
        refs[name] = reference_loop(model_dir, sorted((tmp / "data").rglob("*.jpg")), args.size, device,
                                    min(8, os.cpu_count() or 1), tmp / f"ref-{name}")
        for precision in precisions:
            for compile in compiles:
                for batch in batches:
                    for gpu_decode in decodes:
                        try:
                            row = one_config(tmp, model_dir, device, precision, compile, batch, gpu_decode,
                                             args.images, args.size)
                        except torch.cuda.OutOfMemoryError:
                            row = {"unet": name, "precision": precision, "compile": compile, "batch": batch,
                                   "gpu_decode": gpu_decode, "error": "out of GPU memory"}
                        row["speedup_vs_reference"] = (round(row["pipeline_img_s"] / refs[name], 2)
                                                       if "pipeline_img_s" in row else None)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    training = ddp_training(tmp, device, args.size)
    cols = ["unet", "precision", "compile", "batch", "gpu_decode", "pipeline_img_s", "model_alone_img_s",
            "pipeline/model", "peak_gpu_gib", "speedup_vs_reference"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, r.get("error", "-"))) for c in cols) + " |")
    print("\nreference-style loop (fp32, batch 16, save_image per image): "
          + ", ".join(f"{k} {v:.1f} img/s" for k, v in refs.items()))
    print(f"DDP training, torchrun with 1 process on {device} (ResNet50, batch 64): {training}")
    out = results_file(args.out, "bench_gpu.json")
    out.write_text(json.dumps({"env": env, "rows": rows, "reference_loop": refs, "training": training},
                              indent=2))
    print(f"results in {out}")


if __name__ == "__main__":
    main()
