"""The whole flow on the embedded default, in a minute on a laptop CPU: a tiny random UNet, a
few made-up images in the CNNDetection layout, then shard, extract, status (and train, eval).

The features of a random UNet mean nothing; this shows the commands and the files they write.
`make demo` (real photos and real generators) replaces it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "runs" / "quickstart"


def make_images(root: Path, per_class: int = 16) -> None:
    """Noise photos as 'real' and smooth gradients as 'fake', PNG and JPEG, in three splits."""
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for label in ("0_real", "1_fake"):
            folder = root / split / "toy" / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                h, w = rng.integers(40, 90, 2)
                if label == "0_real":
                    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                else:
                    yy, xx = np.mgrid[0:h, 0:w]
                    arr = np.stack([(xx * (c + 2) + yy * i) % 256 for c in range(3)], -1).astype(np.uint8)
                ext = "jpg" if i % 2 else "png"
                Image.fromarray(arr).save(folder / f"{i:03d}.{ext}")


def dnf(*args: str) -> None:
    cmd = [sys.executable, str(ROOT / "cli.py"), *args]
    print("$ dnf-pipeline " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    data, run, model = WORK / "data", WORK / "run", WORK / "model"
    if not data.exists():
        make_images(data)
    if not model.exists():
        dnf("make-test-model", "--out", str(model), "--size", "32")
    dnf("shard", str(data), "--run", str(run), "--shard-size", "16")
    dnf("extract", "--run", str(run), "--model", str(model), "--size", "32", "--batch-size", "8")
    dnf("status", "--run", str(run))
    ckpt = run / "train" / "quickstart" / "best.pt"
    if not ckpt.exists():
        dnf("train", "--run", str(run), "--name", "quickstart", "--epochs", "2", "--batch-size", "16")
    dnf("eval", "--run", str(run), "--checkpoint", str(ckpt), "--name", "quickstart")
    dnf("detect", str(data / "test" / "toy" / "1_fake" / "000.png"), "--model", str(model),
        "--checkpoint", str(ckpt))


if __name__ == "__main__":
    main()
