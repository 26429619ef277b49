"""Test data in the archive layouts of the field, written by the ecosystem's own writers: WebDataset
tars as img2dataset writes them (the `webdataset` library's `TarWriter`, a `.parquet` and a
`_stats.json` beside each tar) and zips as DiffusionDB ships them (Python's `zipfile`, images
beside one JSON of metadata per part)."""

from __future__ import annotations

import json
import uuid
import zipfile
from pathlib import Path

from conftest import image_bytes


def sample_images(n: int, seed: int = 9000, size: tuple[int, int] = (40, 36)) -> list[tuple[str, bytes, int]]:
    """`n` (extension, bytes, label) triples: JPEG, PNG and WebP, reals noisy and fakes smooth, each
    of other bytes."""
    out = []
    for i in range(n):
        fake = i % 2
        fmt = ("JPEG", "PNG", "WEBP")[i % 3]
        ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
        out.append((ext, image_bytes(seed + i, (size[0] + i % 5, size[1] + i % 3), "RGB", fmt,
                                     smooth=bool(fake)), fake))
    return out


def write_img2dataset_tar(folder: Path, shard: int, images: list[tuple[str, bytes, int]],
                          cls: bool = False, generators: tuple[str, ...] = ("sdxl", "flux")) -> Path:
    """`folder/NNNNN.tar` in img2dataset's layout: per sample `KEY.<ext>`, `KEY.txt` (caption) and
    `KEY.json` (url, key, status, caption, sizes; here also `label` and `generator`), optionally
    `KEY.cls`; `NNNNN.parquet` and `NNNNN_stats.json` beside the tar as img2dataset writes them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    tar = folder / f"{shard:05d}.tar"
    rows = []
    with wds.TarWriter(str(tar)) as sink:
        for i, (ext, data, label) in enumerate(images):
            key = f"{shard:05d}{i:04d}"
            meta = {"url": f"https://example.com/{key}.{ext}", "key": key, "status": "success",
                    "error_message": None, "caption": f"picture {i}", "width": 40, "height": 36,
                    "label": "fake" if label else "real",
                    "generator": generators[i // 2 % len(generators)] if label else "laion"}
            sample = {"__key__": key, ext: data, "txt": meta["caption"], "json": meta}
            if cls:
                sample["cls"] = label
            sink.write(sample)
            rows.append({k: meta[k] for k in ("url", "key", "caption", "status", "error_message")})
    pq.write_table(pa.Table.from_pylist(rows), folder / f"{shard:05d}.parquet")
    (folder / f"{shard:05d}_stats.json").write_text(json.dumps(
        {"count": len(images), "successes": len(images), "failed_to_download": 0, "failed_to_resize": 0,
         "status_dict": {"success": len(images)}}))
    return tar


def write_diffusiondb_zip(folder: Path, part: int, images: list[tuple[str, bytes, int]],
                          label_field: bool = False, seed: int = 0) -> Path:
    """`folder/part-NNNNNN.zip` as DiffusionDB ships it: `<uuid>.png` / `.webp` images and
    `part-NNNNNN.json` mapping each image file name to {"p": prompt, "se": seed, "c": cfg, "st":
    steps, "sa": sampler} (plus `label` when `label_field`)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"part-{part:06d}.zip"
    rng = uuid.UUID(int=seed + part)  # deterministic names
    meta = {}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i, (ext, data, label) in enumerate(images):
            name = f"{uuid.uuid5(rng, str(i))}.{ext}"
            zf.writestr(name, data)
            meta[name] = {"p": f"a prompt {i}", "se": 1000 + i, "c": 7.0, "st": 50, "sa": "k_lms",
                          **({"label": "fake" if label else "real"} if label_field else {})}
        zf.writestr(f"part-{part:06d}.json", json.dumps(meta))
    return path
