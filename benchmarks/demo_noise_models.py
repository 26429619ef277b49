"""How much each change to the demo's DDPM is worth: for each noise-model variant, train the DDPM,
extract its DNF into the demo run, train and evaluate the demo's detector on it, and print the AUC of
each test generator (photo groups never seen in training) beside the DDPM's training time.

Run after `make demo` (it reuses the demo's data and shards):
    python benchmarks/demo_noise_models.py [--variant NAME ...] [--epochs 8]
Each variant's model, features and detector stay under WORK (models/<variant>, the run's cache and
train/eval folders named nm-<variant>), so a rerun only computes what is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demo.__main__ import detector_args, eval_args, extract_args  # noqa: E402
from demo.data import train_photos  # noqa: E402
from demo.ddpm import DDPMConfig, train_ddpm  # noqa: E402

VARIANTS: dict[str, dict] = {  # each about the same DDPM training time on a CPU
    "baseline": {"crop": 0, "steps": 240, "ema": 0.0, "small_t": 0.0},  # the demo's model of last round
    "ema": {"crop": 0, "steps": 240, "ema": 0.99, "small_t": 0.0},
    "crop32": {"crop": 32, "steps": 720, "ema": 0.0, "small_t": 0.0},  # 4x fewer pixels, 3x the steps
    "small-t": {"crop": 0, "steps": 240, "ema": 0.0, "small_t": 0.5},  # half of each batch at t < 100
    "crop32-ema-small-t": {"crop": 32, "steps": 720, "ema": 0.995, "small_t": 0.5},
}


def _cli(*args: str, capture: bool = False) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], text=True,
                          capture_output=capture)
    if proc.returncode:
        sys.exit(f"dnf-pipeline {' '.join(args)} failed ({proc.returncode})\n{proc.stderr or ''}")
    return proc.stdout if capture else ""


def measure(work: Path, name: str, overrides: dict, epochs: int) -> dict:
    """Train (or reuse) the variant's DDPM, extract, train and evaluate the detector; its figures."""
    cfg = DDPMConfig(**overrides)
    t0 = time.perf_counter()
    info = train_ddpm(train_photos(work / "data"), work / "models" / name, cfg)
    run = work / "run"
    out = json.loads(_cli(*extract_args(run, work / "models" / name, cfg.size), "--json", capture=True))
    tag = f"nm-{name}"
    if not (run / "train" / tag / "best.pt").exists():
        _cli(*detector_args(run, tag, "realesrgan", epochs), "--feature-id", out["feature_id"])
    _cli(*eval_args(run, tag))
    rep = json.loads((run / "eval" / tag / "report.json").read_text())
    aucs = {src.split("/")[-1]: r["auc"] for src, r in rep["sources"].items() if r["n_fake"]}
    return {"variant": name, "config": dataclasses.asdict(cfg), "ddpm_seconds": info["seconds"],
            "final_loss": info["final_loss"], "auc": aucs, "seconds": round(time.perf_counter() - t0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "demo")
    ap.add_argument("--variant", action="append", choices=list(VARIANTS), help="default: all")
    ap.add_argument("--epochs", type=int, default=8)
    args = ap.parse_args()
    if not (args.work / "run" / "shards").is_dir():
        sys.exit(f"{args.work}: run `make demo` first (this reuses its data and shards)")
    results_path = args.work / "noise-models.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name in args.variant or list(VARIANTS):
        results[name] = measure(args.work, name, VARIANTS[name], args.epochs)
        results_path.write_text(json.dumps(results, indent=1))
    gens = sorted({g for r in results.values() for g in r["auc"]})
    print("\n| variant | DDPM s | final loss | " + " | ".join(f"AUC {g}" for g in gens) + " |")
    print("|" + "---|" * (3 + len(gens)))
    for name, r in results.items():
        cells = [f"{100 * r['auc'][g]:.1f}" if r["auc"].get(g) is not None else "-" for g in gens]
        print(f"| {name} | {r['ddpm_seconds']:.0f} | {r['final_loss']:.4f} | " + " | ".join(cells) + " |")
    print(f"\n{results_path}")


if __name__ == "__main__":
    main()
