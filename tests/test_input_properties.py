"""Property-based input tests (hypothesis): arbitrary file and folder names (bytes that are not
UTF-8, unicode, spaces, newlines, names near the 255-byte limit), images of every format Pillow
writes (multi-frame GIF, WebP, TIFF and PNG included), extreme sizes and aspect ratios, truncated,
empty and mislabelled files, in the field's folder layout, flat with `--label`, and Synthbuster's.

The invariant, for every generated tree: `shard` and `extract` finish; every file ends in exactly
one of the manifest, rejects.jsonl or duplicates.jsonl (by its exact bytes of name); every manifest
row is cached or listed as rejected at extract with a reason; run.json's counts add up; the process
stays under a memory bound. `make test` tries 60 trees (derandomised, so CI sees the same ones);
`make test-long` 600.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from stages.extract import ExtractOptions, run_extract
from stages.shard import run_shard
from storage.caches import find_cache
from storage.run import Run

MEMORY_BOUND = 3 * 2**30  # resident bytes of the test process at any check

# -- names --------------------------------------------------------------------------------------
raw_names = st.binary(min_size=1, max_size=40).filter(lambda b: b"/" not in b and b"\0" not in b
                                                       and b not in (b".", b".."))
unicode_names = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="/\0"),
                        min_size=1, max_size=30).map(str.encode).filter(lambda b: b not in (b".", b".."))
odd_names = st.sampled_from([b" lead and trail ", b"new\nline", b"tab\there", b"-dash", b"*?[glob]",
                             b"\xff\xfe", "caf\u00e9 \u5199\u771f".encode(), b"x" * 230, b".hidden"])
names = st.one_of(raw_names, unicode_names, odd_names).map(lambda b: b[:230])
suffixes = st.sampled_from([b".png", b".jpg", b".JPEG", b".gif", b".webp", b".tif", b".bmp", b".ppm", b"",
                            b".txt", b".png.jpg"])

# -- images -------------------------------------------------------------------------------------
FORMATS = ["PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP", "PPM", "ICO", "TGA"]
MULTI_FRAME = {"PNG", "GIF", "WEBP", "TIFF"}
sizes = st.one_of(st.tuples(st.integers(1, 48), st.integers(1, 48)),
                  st.sampled_from([(1, 1), (1, 300), (300, 1), (2, 257), (640, 3)]))


@st.composite
def image_files(draw) -> bytes:
    """Bytes of an image file, possibly multi-frame, possibly damaged, or no image at all."""
    kind = draw(st.sampled_from(["image"] * 6 + ["truncated", "empty", "garbage"]))
    if kind == "empty":
        return b""
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=300))
    fmt = draw(st.sampled_from(FORMATS))
    w, h = draw(sizes)
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P", "1", "I;16"]))
    seed = draw(st.integers(0, 2**16))
    frames = draw(st.integers(1, 3)) if fmt in MULTI_FRAME else 1
    data = encode(fmt, mode, w, h, frames, seed)
    if kind == "truncated" and len(data) > 2:
        data = data[: draw(st.integers(1, len(data) - 1))]
    return data


def encode(fmt: str, mode: str, w: int, h: int, frames: int, seed: int) -> bytes:
    """An image in `fmt`, in `mode` where the format takes it, else in RGB."""
    rng = np.random.default_rng(seed)
    ims = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(frames)]
    buf = io.BytesIO()
    for m in (mode, "RGB"):
        try:
            converted = [im.convert(m) for im in ims]
            buf.seek(0)
            buf.truncate()
            extra = {"save_all": True, "append_images": converted[1:]} if frames > 1 else {}
            converted[0].save(buf, fmt, **extra)
            return buf.getvalue()
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return b""


@st.composite
def trees(draw) -> tuple[str, list[tuple[bytes, bytes]]]:
    """(layout, [(relative path, file bytes)]) with unique paths, none a folder of another."""
    layout = draw(st.sampled_from(["auto", "flat", "synthbuster"]))
    files: dict[bytes, bytes] = {}
    for _ in range(draw(st.integers(1, 6))):
        name = draw(names) + draw(suffixes)
        if layout == "auto":
            split = draw(st.sampled_from([b"train", b"val", b"test"]))
            folder = b"/".join([split, draw(names), draw(st.sampled_from([b"0_real", b"1_fake"]))])
        elif layout == "synthbuster":
            folder = draw(names)
        else:
            folder = draw(st.sampled_from([b"", draw(names)]))
        path = os.path.join(folder, name)
        if any(path.startswith(k + b"/") or k.startswith(path + b"/") for k in files):
            continue  # a file where another path needs a folder (x and x/y.png): not a tree
        files[path] = draw(image_files())
    return layout, sorted(files.items())


def resident_bytes() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def check_tree(tiny_model: Path, layout: str, files: list[tuple[bytes, bytes]]) -> None:
    with tempfile.TemporaryDirectory(prefix="prop-") as tmp:
        root = os.path.join(os.fsencode(tmp), b"data")
        written = set()
        for rel, data in files:
            path = os.path.join(root, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
            written.add(os.path.normpath(path))
        run_dir = Path(tmp) / "run"
        kw = {"label": "fake", "source": "gen"} if layout == "flat" else {"layout": layout}
        summary = run_shard([Path(os.fsdecode(root))], run_dir, shard_size=3, **kw)
        run = Run(run_dir)
        entries, rejects, dups = run.entries(), run.rejects(), run.duplicates()
        seen = [os.fsencode(e.path) for e in entries] + [os.fsencode(r["path"]) for r in rejects] \
            + [os.fsencode(d["path"]) for d in dups]
        assert sorted(os.path.normpath(p) for p in seen) == sorted(written)  # each once, names exact
        assert all(r["reason"] for r in rejects)
        assert summary["files"] == summary["images"] + summary["rejects"] + summary["duplicates"]
        if entries:
            run_extract(run_dir, ExtractOptions(model=tiny_model, size=16, batch_size=4, workers=0,
                                                device="cpu"))
            cache = find_cache(run_dir / "cache")
            assert cache.done_shards() == set(range(run.info().num_shards))
            labels, _, _, keys = cache.index_arrays()
            rejected = {r["key"]: r["reason"] for s in cache.done_shards()
                        for r in cache.done_marker(s).rejected}
            assert all(reason for reason in rejected.values())
            for row, entry in enumerate(entries):  # shards are full but the last: rows = positions
                assert (labels[row] == entry.label) != (entry.key in rejected)
        assert resident_bytes() < MEMORY_BOUND


COMMON = {"deadline": None, "derandomize": True, "database": None,
          "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                    HealthCheck.data_too_large, HealthCheck.filter_too_much]}


@settings(max_examples=60, **COMMON)
@given(trees())
def test_every_input_is_cached_or_rejected_with_a_reason(tiny_model, tree):
    check_tree(tiny_model, *tree)


@pytest.mark.slow
@settings(max_examples=600, **COMMON)
@given(trees())
def test_every_input_is_cached_or_rejected_with_a_reason_long(tiny_model, tree):
    check_tree(tiny_model, *tree)
