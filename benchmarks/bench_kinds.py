"""`make bench-kinds`: each feature kind's extract images/s, bytes per image in the cache and peak
RSS on this machine (tiny random models: the figures are the pipeline's and the kind's
arithmetic, not a real CLIP or Stable Diffusion), and the linear probe's training time on N
cached CLIP embeddings (UnivFD's point: seconds once the embeddings are cached).

    python benchmarks/bench_kinds.py [--images 256] [--size 64] [--probe-rows 100000]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench import make_jpegs, results_file, scratch_dir  # noqa: E402
from bench_shard import peak_cli  # noqa: E402

from stages.domain.feature_kinds.clip import make_test_clip  # noqa: E402
from stages.domain.feature_kinds.latent_dnf import make_test_pipeline  # noqa: E402
from stages.domain.noise_model import make_test_model  # noqa: E402
from stages.shard import run_shard  # noqa: E402


def cli(*args: object) -> tuple[float, float, dict]:
    """(seconds, peak RSS in MiB of this command alone, its --json summary)."""
    seconds, peak, out = peak_cli(*args)
    return seconds, peak, json.loads(out) if out.strip().startswith("{") else {}


def cache_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=64, help="Preprocessed size (CLIP: its own, 32).")
    ap.add_argument("--probe-rows", type=int, default=100_000)
    ap.add_argument("--results", default=None)
    args = ap.parse_args()
    tmp = scratch_dir("dnf-bench-kinds-")
    make_jpegs(tmp / "jpegs", args.images, 256)
    run = tmp / "run"
    run_shard([tmp / "jpegs"], run, shard_size=128)
    models = {"dnf": make_test_model(tmp / "unet", size=args.size), "npr": None,
              "clip": make_test_clip(tmp / "clip", image_size=32),
              "latent-dnf": make_test_pipeline(tmp / "sd")}
    rows = []
    for kind, model in models.items():
        size = 32 if kind == "clip" else args.size
        extra = ["--model", model] if model else []
        sec, peak, out = cli("extract", "--run", run, "--feature", kind, "--size", size, "--batch-size", 32,
                             "--device", "cpu", "--json", *extra)
        folder = Path(out["cache"])
        rows.append({"kind": kind, "size": size, "images": out["images"], "images_per_s": out["images_per_s"],
                     "bytes_per_image": round(cache_bytes(folder) / out["images"]),
                     "peak_rss_mib": round(peak), "command_seconds": round(sec, 1)})
        print(json.dumps(rows[-1]), flush=True)
    probe = probe_time(tmp, args.probe_rows, models["clip"])
    print("\n| kind | size | images/s (extract) | bytes/image in cache | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['size']} | {r['images_per_s']:.0f} | {r['bytes_per_image']} | "
              f"{r['peak_rss_mib']} |")
    print(f"\nlinear probe: {probe['epochs']} epochs on {probe['rows']} cached {probe['dim']}-d embeddings "
          f"in {probe['train_seconds']:.1f} s ({probe['samples_per_s']:.0f} samples/s)")
    out = results_file(args.results, "bench_kinds.json")
    out.write_text(json.dumps({"kinds": rows, "probe": probe}, indent=2))
    print(f"results in {out}")


def probe_time(tmp: Path, n: int, clip: Path, dim: int = 768, epochs: int = 2) -> dict:
    """`train --head linear` on n cached CLIP embeddings (the tiny tower with a 768-d projection,
    as ViT-L/14's): the command's training seconds from its metrics."""
    from PIL import Image

    clip = make_test_clip(tmp / "clip768", image_size=32, dim=dim)
    data = tmp / "probe-images"
    for i in range(n):  # tiny unique PNGs: the probe's cost does not depend on what they show
        folder = data / "train" / "gen" / ("0_real" if i % 2 else "1_fake") / f"{i // 1000:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i % 256, (i // 256) % 256, (i // 65536) % 256)).save(folder / f"{i}.png")
    run = tmp / "probe-run"
    cli("shard", data, "--run", run, "--workers", 2)
    _, _, out = cli("extract", "--run", run, "--feature", "clip", "--model", clip, "--size", 32,
                    "--batch-size", 256, "--device", "cpu", "--json")
    t0 = time.perf_counter()
    cli("train", "--run", run, "--name", "probe", "--feature-id", out["feature_id"], "--epochs", epochs,
        "--batch-size", 256, "--device", "cpu", "--val-from", "train:0.1", "--workers", 0)
    total = time.perf_counter() - t0
    metrics = [json.loads(line) for line in (run / "train/probe/metrics.jsonl").read_text().splitlines()]
    train_s = sum(m["train_seconds"] for m in metrics)
    return {"rows": out["images"], "dim": dim, "epochs": epochs, "train_seconds": round(train_s, 2),
            "command_seconds": round(total, 1),
            "samples_per_s": round(0.9 * out["images"] * epochs / train_s),
            "max_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}


if __name__ == "__main__":
    main()
