"""`make bench-decoders`: CPU decode time per image of the decoders on the package registries, on
photo-like PNGs and JPEGs of 512 and 1024 px, one thread, median of repeats, side by side in one
run; and whether each decodes to the same pixels as the reference's decoder (torchvision's
`decode_image`: libpng / libjpeg-turbo), which extract used before it took simplejpeg and pyspng
first. JPEG also at the reduced DCT scale `--fast-decode` uses.

    python benchmarks/bench_decoders.py [--images 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stages.domain.images import decode_rgb  # noqa: E402


def photo(size: int, seed: int) -> np.ndarray:
    """Smooth structure plus grain, as the host benchmark's images."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(xx * (3 + c + seed % 5) + yy * (2 + seed % 3)) for c in range(3)], -1)
    return np.clip((base * 0.4 + 0.5) * 255 + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)


def encoded(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def torchvision_rgb(d: bytes) -> np.ndarray:
    from torchvision.io import ImageReadMode, decode_image

    return decode_image(torch.frombuffer(bytearray(d), dtype=torch.uint8), mode=ImageReadMode.RGB
                        ).permute(1, 2, 0).numpy()


def decoders(fmt: str, size: int) -> dict:
    """name -> bytes to (H, W, 3) uint8 array; those whose package is missing are left out."""
    out = {
        "torchvision decode_image (extract's before)": torchvision_rgb,
        "decode_rgb (extract's now)": lambda d: decode_rgb(d).permute(1, 2, 0).numpy(),
        "Pillow": lambda d: np.asarray(Image.open(io.BytesIO(d)).convert("RGB")),
    }
    try:
        import cv2

        cv2.setNumThreads(1)
        def opencv(d: bytes) -> np.ndarray:
            return cv2.cvtColor(cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        out["OpenCV imdecode"] = opencv
    except ImportError:
        pass
    if fmt == "PNG":
        try:
            import pyspng

            out["pyspng"] = lambda d: pyspng.load(d)[..., :3]
        except ImportError:
            pass
    else:
        try:
            import simplejpeg

            out["simplejpeg"] = lambda d: simplejpeg.decode_jpeg(d, colorspace="RGB")
        except ImportError:
            pass

        def draft(d: bytes) -> np.ndarray:
            with Image.open(io.BytesIO(d)) as im:
                im.draft("RGB", (256, 256))
                return np.asarray(im.convert("RGB"))
        out["Pillow draft to >= 256 px (--fast-decode; other pixels)"] = draft
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| input | decoder | ms per image (1 thread) | vs extract's | same pixels |\n|---|---|---|---|---|")
    for fmt, size in (("JPEG", 512), ("JPEG", 1024), ("PNG", 512), ("PNG", 1024)):
        files = [encoded(photo(size, s), fmt) for s in range(args.images)]
        reference = [torchvision_rgb(d) for d in files]
        base = None
        for name, fn in decoders(fmt, size).items():
            runs = []
            for _ in range(args.repeats):
                t0 = time.process_time()
                got = [fn(d) for d in files]
                runs.append((time.process_time() - t0) / len(files) * 1000)
            ms = statistics.median(runs)
            base = base or ms
            same = all(g.shape == r.shape and np.array_equal(g, r)
                       for g, r in zip(got, reference, strict=True))
            print(f"| {size} px {fmt} | {name} | {ms:.2f} | {base / ms:.2f}x | {'yes' if same else 'no'} |",
                  flush=True)
    fast_decode_deviation(args.images)


def fast_decode_deviation(n: int, size_out: int = 256) -> None:
    """What --fast-decode changes: the resized image (0-255 scale) and the stored DNF (uint8, a
    random 64 px-trained UNet at --size 256) of photo-like JPEGs, with and without it."""
    import tempfile

    from stages.domain.images import preprocess
    from stages.domain.noise_model import encode, load_noise_model, make_test_model

    model = load_noise_model(make_test_model(Path(tempfile.mkdtemp()) / "unet", size=64), torch.device("cpu"))
    print("\n| input | resized pixels: mean / max abs diff (0-255) | DNF uint8: mean / max abs diff |")
    print("|---|---|---|")
    for size in (512, 1024, 2048):
        files = [encoded(photo(size, s), "JPEG") for s in range(n)]
        px, dnf = [], []
        for d in files:
            a, b = (preprocess(decode_rgb(d, draft=k), size_out) for k in (0, size_out))
            px.append(((a - b).abs() * 127.5).flatten())
            with torch.inference_mode():
                fa, fb = (encode(model.predict(x[None]), "reference").int() for x in (a, b))
            dnf.append((fa - fb).abs().flatten().float())
        px_all, dnf_all = torch.cat(px), torch.cat(dnf)
        print(f"| {size} px JPEG | {px_all.mean():.2f} / {px_all.max():.1f} | {dnf_all.mean():.2f} / "
              f"{dnf_all.max():.0f} |", flush=True)


if __name__ == "__main__":
    main()
