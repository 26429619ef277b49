"""Image / DNF pairs as tiles of one PNG: what the detector saw for chosen images (`show`) and for
its most confident mistakes (`eval --gallery`). The DNF is shown as the classifier sees it: the
stored uint8 map / 255 (reference encoding), or raw eps clipped to [0, 1], first three channels."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from stages.domain.sources import ReadContext, RunReader
from stages.domain.sources.base import entry_address
from storage.atomic import readable
from storage.parquet_images import ParquetSource
from storage.run import Entry

PANEL = 128  # pixels of each image in a tile
PAD = 4
LINE = 12
LINES = 3
COLUMNS = 4
TILE_W, TILE_H = 2 * PANEL + 3 * PAD, PANEL + 2 * PAD + LINES * LINE


def dnf_view(dnf: np.ndarray) -> Image.Image:
    """A stored DNF (C, S, S) as an RGB picture of its first three channels."""
    x = np.asarray(dnf)[:3]
    if x.dtype != np.uint8:
        x = (np.clip(x.astype(np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(x.transpose(1, 2, 0)), "RGB")


def _reader(reader: RunReader | Mapping[str, ParquetSource] | None) -> RunReader:
    """A RunReader; a mapping is the run's parquet.json (`read_index`), as callers once passed it."""
    if isinstance(reader, RunReader):
        return reader
    return RunReader(ReadContext(indexes={"parquet": dict(reader or {})}))


def original_view(image: str | Entry, reader: RunReader | Mapping[str, ParquetSource] | None = None,
                  key: str | None = None) -> Image.Image:
    """The original image as RGB, read through its input source (`reader`: the run's RunReader; or
    the run's parquet.json, as before); checked against its manifest `key` (an Entry's own when
    `image` is one), or a grey panel when it can no longer be read."""
    entry = image if isinstance(image, Entry) else Entry(key or "", str(image), 0, "", "", 0)
    try:
        runs = _reader(reader)
        data = runs.read(entry) if entry.key else runs.reader(entry).read(entry_address(entry))
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError):  # ReadError is a ValueError
        return Image.new("RGB", (PANEL, PANEL), (96, 96, 96))


def tile(image: str | Entry, dnf: np.ndarray, caption: list[str],
         reader: RunReader | Mapping[str, ParquetSource] | None = None,
         key: str | None = None) -> Image.Image:
    """The image and its DNF side by side, with up to three caption lines below (`reader`, `key`:
    as `original_view` takes them)."""
    out = Image.new("RGB", (TILE_W, TILE_H), (255, 255, 255))
    out.paste(original_view(image, reader, key).resize((PANEL, PANEL), Image.BICUBIC), (PAD, PAD))
    out.paste(dnf_view(dnf).resize((PANEL, PANEL), Image.NEAREST), (2 * PAD + PANEL, PAD))
    draw, font = ImageDraw.Draw(out), ImageFont.load_default()
    for i, text in enumerate(caption[:LINES]):
        draw.text((PAD, PANEL + 2 * PAD + i * LINE), readable(text)[:42], fill=(0, 0, 0), font=font)
    return out


def sheet(tiles: list[Image.Image], out: Path) -> Path:
    """Tiles in rows of COLUMNS, written as one PNG (a blank tile when there are none)."""
    rows = max(1, -(-len(tiles) // COLUMNS))
    page = Image.new("RGB", (COLUMNS * TILE_W, rows * TILE_H), (255, 255, 255))
    for i, t in enumerate(tiles):
        page.paste(t, ((i % COLUMNS) * TILE_W, (i // COLUMNS) * TILE_H))
    out.parent.mkdir(parents=True, exist_ok=True)
    page.save(out)
    return out


TITLE_H = 2 * LINE


def section_sheet(sections: dict[str, list[Image.Image]], out: Path) -> Path:
    """Tiles grouped in titled sections (each starts a new row under its title), as one PNG."""
    rows = [max(1, -(-len(tiles) // COLUMNS)) for tiles in sections.values()]
    height = max(TILE_H, sum(TITLE_H + r * TILE_H for r in rows))
    page = Image.new("RGB", (COLUMNS * TILE_W, height), (255, 255, 255))
    draw, font = ImageDraw.Draw(page), ImageFont.load_default()
    y = 0
    for (title, tiles), n_rows in zip(sections.items(), rows, strict=True):
        draw.text((PAD, y + PAD), readable(title)[:120], fill=(0, 0, 160), font=font)
        y += TITLE_H
        for i, t in enumerate(tiles):
            page.paste(t, ((i % COLUMNS) * TILE_W, y + (i // COLUMNS) * TILE_H))
        y += n_rows * TILE_H
    out.parent.mkdir(parents=True, exist_ok=True)
    page.save(out)
    return out
