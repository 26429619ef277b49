"""Fixtures: a tiny UNet folder and small image datasets made by the tests themselves."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers (pytest-xdist, one per core): each one, and every process its tests
    # start, computes on one thread, so that two workers with torch's thread per core do not
    # oversubscribe the cores; every process of the run then also sums in the same order (the same
    # bytes across processes). Set before torch is imported.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The files that take longest, first: `make test` hands whole files to its two workers in this order
# (`--dist loadfile --no-loadscope-reorder`), and a long file handed out last would keep one core busy
# alone at the end. `make test-durations` shows where the time goes.
LONG_FILES = ("test_demo.py", "test_object_storage.py", "test_parquet.py", "test_reliability.py",
              "test_trust.py", "test_webdataset.py", "test_crash_points.py", "test_distributed_train.py",
              "test_robustness.py", "test_archive_sources.py", "test_location_operations.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long files first (a stable sort: tests keep their order within a file)."""
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def image_bytes(seed: int, size: tuple[int, int] = (48, 40), mode: str = "RGB", fmt: str = "PNG",
                smooth: bool = False) -> bytes:
    """A deterministic small image: noise (real-like) or a smooth gradient blob (fake-like)."""
    rng = np.random.default_rng(seed)
    w, h = size
    if smooth:
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (3 + c) + yy * (5 + seed % 7)) % 256 for c in range(3)], -1)
        arr = base.astype(np.uint8)
    else:
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_dataset(root: Path, per_class: int = 6, splits=("train", "val", "test"),
                 sources=("progan",), size=(48, 40)) -> Path:
    """CNNDetection layout `{split}/{source}/{0_real,1_fake}/` with PNG and JPEG, grey and RGBA."""
    seed = 0
    for split in splits:
        for source in sources:
            for label in ("0_real", "1_fake"):
                for i in range(per_class):
                    seed += 1
                    mode = ["RGB", "L", "RGBA", "RGB"][i % 4]
                    fmt = "JPEG" if (i % 3 == 0 and mode != "RGBA") else "PNG"
                    data = image_bytes(seed, (size[0] + i, size[1] + 2 * i), mode, fmt,
                                       smooth=label == "1_fake")
                    ext = "jpg" if fmt == "JPEG" else "png"
                    write(root / split / source / label / f"img_{i:03d}.{ext}", data)
    return root


class RandomWeights(dict):
    """A state dict filled layer by layer with seeded random weights, scaled so that activations
    stay O(1): for the tests' independent reference networks."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.g = torch.Generator().manual_seed(seed)

    def conv(self, name: str, cin: int, cout: int, k: int, dims: int = 2) -> None:
        shape = (cout, cin, k, k) if dims == 2 else (cout, cin, k)
        self[f"{name}.weight"] = torch.randn(*shape, generator=self.g) / math.sqrt(cin * k ** dims)
        self[f"{name}.bias"] = torch.randn(cout, generator=self.g) * 0.1

    def linear(self, name: str, cin: int, cout: int) -> None:
        self[f"{name}.weight"] = torch.randn(cout, cin, generator=self.g) / math.sqrt(cin)
        self[f"{name}.bias"] = torch.randn(cout, generator=self.g) * 0.1

    def norm(self, name: str, c: int) -> None:
        self[f"{name}.weight"] = 1 + 0.1 * torch.randn(c, generator=self.g)
        self[f"{name}.bias"] = 0.1 * torch.randn(c, generator=self.g)


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory) -> Iterator[Callable[[str], Path]]:
    """`mktemp` for a module's shared fixtures: its folders go when the module ends, unless a test failed.

    One trained ResNet50 leaves about 370 MB (best.pt, and last.pt with Adam's state); kept until the
    session ended, the suite's folders grew to 8.4 GB and filled CI's disk. Function-scoped `tmp_path`
    folders go after each passing test (`tmp_path_retention_policy` in pyproject.toml).
    """
    made: list[Path] = []
    failed = request.session.testsfailed

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    if request.session.testsfailed == failed:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from stages.domain.noise_model import make_test_model

    return make_test_model(tmp_path_factory.mktemp("model") / "tiny", size=32)


@pytest.fixture()
def dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "data")


def cli(*args: str, check: bool = True, process: bool = False, **kw) -> subprocess.CompletedProcess:
    """Run the real command line as a user would: the typer app in this process (the stage code,
    its exit code, stdout and stderr, a bug's traceback), or a subprocess where the process is the
    point (`process=True`, or an `env`, `cwd` or `timeout` of its own): 3-4 s of imports each."""
    if process or kw:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **kw.pop("env", {})}
        proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], capture_output=True,
                              text=True, env=env, **kw)
    else:
        proc = _cli_in_process([str(a) for a in args])
    if check and proc.returncode != 0:
        raise AssertionError(f"cli {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _cli_in_process(args: list[str]) -> subprocess.CompletedProcess:
    """`dnf-pipeline ARGS` through typer's CliRunner; signal handlers are put back afterwards and
    an exception that is not an exit is printed as Python would, traceback and all."""
    import signal
    import traceback

    from typer.testing import CliRunner

    from cli import app

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = CliRunner().invoke(app, args, catch_exceptions=True)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
    return subprocess.CompletedProcess(["dnf-pipeline", *args], result.exit_code, result.stdout, stderr)


def _write_parquet(path: Path, columns: dict, row_group_size: int, metadata: dict | None = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(columns)
    if metadata:
        table = table.replace_schema_metadata({k: json.dumps(v) for k, v in metadata.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)


def make_openfake(root: Path, rows: int = 120, files: int = 2, row_group_size: int = 16,
                  size: tuple[int, int] = (40, 32)) -> Path:
    """OpenFake's layout: `data/{train,test}-NNNNN-of-NNNNN.parquet` with an `image` struct
    (bytes, path), `label` real/fake, `model`, `prompt`, and the README's `configs` YAML."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text(
        "---\nlicense: cc-by-sa-4.0\nconfigs:\n- config_name: default\n  data_files:\n"
        "  - split: train\n    path: data/train-*\n  - split: test\n    path: data/test-*\n---\n# OpenFake\n")
    models = ["flux.1-dev", "sdxl", "midjourney-6"]
    seed = 5000
    for split in ("train", "test"):
        for f in range(files):
            n = rows // (2 * files)
            images, labels, model, prompts = [], [], [], []
            for i in range(n):
                seed += 1
                fake = i % 2 == 1
                fmt = "JPEG" if i % 3 == 0 else "PNG"
                images.append({"bytes": image_bytes(seed, (size[0] + i, size[1] + f), "RGB", fmt,
                                                    smooth=fake), "path": f"{seed}.{fmt.lower()}"})
                labels.append("fake" if fake else "real")
                model.append(models[i % 3] if fake else "real")
                prompts.append(f"a photo number {i}")
            _write_parquet(root / f"data/{split}-{f:05d}-of-{files:05d}.parquet",
                           {"image": images, "label": labels, "model": model, "prompt": prompts},
                           row_group_size)
    return root


def make_community_forensics(root: Path, rows: int = 120, row_group_size: int = 10,
                             size: tuple[int, int] = (36, 36)) -> Path:
    """Community Forensics' layout: `data/<subset>/*.parquet` with `image_data` (raw bytes),
    `image_name`, `format`, `model_name`, `label` (a ClassLabel real/fake), `prompt`; the README's
    `configs: data_files:` maps the splits to path globs."""
    splits = ("Systematic", "Manual", "PublicEval")
    yaml = "---\nconfigs:\n- config_name: default\n  data_files:\n" + "".join(
        f"  - split: {s}\n    path: data/{s}/*.parquet\n" for s in splits) + "---\n"
    root.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text(yaml + "# Community Forensics (test copy)\n")
    features = {"info": {"features": {"label": {"names": ["real", "fake"], "_type": "ClassLabel"}}}}
    seed = 9000
    for s in splits:
        for f in range(2):
            n = rows // (2 * len(splits))
            data, names, fmts, models, labels, prompts = [], [], [], [], [], []
            for i in range(n):
                seed += 1
                fake = i % 2 == 0
                fmt = "PNG" if i % 4 else "JPEG"
                data.append(image_bytes(seed, (size[0] + i, size[1] + f), "RGB", fmt, smooth=fake))
                names.append(f"{seed}.{fmt.lower()}")
                fmts.append(fmt.lower())
                models.append(f"gen-{i % 4}" if fake else "real-photos")
                labels.append(int(fake))
                prompts.append("")
            _write_parquet(root / f"data/{s}/part-{f:03d}.parquet",
                           {"image_data": data, "image_name": names, "format": fmts, "model_name": models,
                            "label": labels, "prompt": prompts}, row_group_size, {"huggingface": features})
    return root
