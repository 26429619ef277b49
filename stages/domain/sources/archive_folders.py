"""What the two archive sources (`webdataset_tar.py`, `zip_archive.py`) share: walking an input that
holds archives (one archive, or a folder or prefix of them; img2dataset's `NNNNN.parquet` and
`NNNNN_stats.json` beside a tar left out as its metadata, any other file there taken as an image
file), and an image member's label, source and split.

A member's label comes from, in this order: the JSON metadata's `--label-field` (a `KEY.json`
sidecar as WebDataset pairs it, or a JSON member mapping image file names to their metadata as
DiffusionDB's `part-NNNNNN.json` does), a `KEY.cls` sidecar (only in an archive where every `.cls`
says 0 or 1: elsewhere `.cls` is a class index, not real/fake), the folders above the archive and
inside it by the layout rules of folders; `shard --label` overrides all. Its source: the JSON's
`--source-field`, else the layout's, else the archive's folder name (the first above split folders).
Its split: the layout's."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from stages.domain.layouts import infer_from_layout, parse_label
from stages.domain.parquet_layouts import source_folder
from stages.domain.sources.base import Candidate, Collected, SourceOptions, input_address
from storage.locations import StoragePath, as_path, location

SIDECARS = frozenset({"json", "txt", "cls"})  # a sample's metadata members (WebDataset's extensions)
NO_LABEL = ("no label: no --label-field value in its JSON metadata, no 0/1 .cls sidecar, and the folders "
            "name no real/fake class (0_real, 1_fake, real, nature, ai, <generator> under a split); give "
            "--label-field, --label or --layout")


@dataclass(frozen=True)
class Place:
    """Where an archive sits: the folders between the input root and it, the root's name (for the
    layout rules), and the source when nothing else names one: its folder's name, or the first above
    split folders (`laion/train/00000.tar`: `laion`), as for parquet files."""

    dirs: tuple[str, ...]
    root_name: str
    folder: str


Lister = Callable[[StoragePath, Place, SourceOptions, Collected], list[Candidate]]


@dataclass(frozen=True)
class Metadata:
    """What an image member's metadata says: its JSON object, a 0/1 `.cls`, or why its JSON could
    not be read."""

    meta: dict | None = None
    cls: int | None = None
    error: str | None = None


def split_key(name: str) -> tuple[str, str, list[str]]:
    """(sample key, extension, folders) of a member name by WebDataset's convention: the key is the
    folder prefix and the file name up to its first dot (`a/b.seg.png`: `a/b`, `seg.png`, [a])."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext, [d for d in folder.split("/") if d not in ("", ".")]


def is_sidecar(name: str) -> bool:
    """A sample's metadata member (`KEY.json`, `KEY.txt`, `KEY.cls`), not an image to read."""
    return split_key(name)[1].lower() in SIDECARS


def _json(data: bytes) -> tuple[object, str | None]:
    try:
        return json.loads(data), None
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"not valid JSON ({e})"


def _cls(data: bytes) -> int | None:
    text = data.decode("utf-8", "replace").strip()
    return int(text) if text in ("0", "1") else None


def read_metadata(sidecars: dict[str, bytes], images: list[str]) -> dict[str, Metadata]:
    """Each image member's metadata from the archive's sidecar members (name -> bytes): its own
    `KEY.json` / `KEY.cls`, or its entry in a JSON member that maps file names to objects."""
    by_key: dict[str, dict[str, tuple[str, bytes]]] = {}
    for name, data in sidecars.items():
        key, ext, _ = split_key(name)
        by_key.setdefault(key, {})[ext.lower()] = (name, data)
    image_keys = {split_key(n)[0] for n in images}
    mapped: dict[str, dict] = {}
    for name, data in sidecars.items():  # DiffusionDB's part-NNNNNN.json: {file name: {...}}
        key, ext, _ = split_key(name)
        if ext.lower() == "json" and key not in image_keys:
            obj, _ = _json(data)
            if isinstance(obj, dict):
                folder = name.rpartition("/")[0]
                for k, v in obj.items():
                    if isinstance(v, dict):
                        mapped[f"{folder}/{k}" if folder else str(k)] = v
    cls_values = [_cls(d) for n, d in sidecars.items() if split_key(n)[1].lower() == "cls"]
    cls_ok = all(v is not None for v in cls_values)  # an archive of class indices says nothing
    out = {}
    for name in images:
        side = by_key.get(split_key(name)[0], {})
        meta, error = None, None
        if "json" in side:
            obj, error = _json(side["json"][1])
            meta = obj if isinstance(obj, dict) else None
            if error is None and meta is None:
                error = "not a JSON object"
            error = f"its metadata {side['json'][0]} is {error}" if error else None
        elif name in mapped:
            meta = mapped[name]
        cls = _cls(side["cls"][1]) if "cls" in side and cls_ok else None
        out[name] = Metadata(meta, cls, error)
    return out


def member_labels(name: str, place: Place, md: Metadata, opts: SourceOptions,
                  ) -> tuple[int | None, str | None, str | None, str | None]:
    """(label, source, split, refusal) of the image member `name` of an archive at `place`."""
    inner = split_key(name)[2]
    label, source, split = infer_from_layout([*place.dirs, *inner], place.root_name, opts.layout)
    refusal = None
    if md.cls is not None:
        label = md.cls
    field = opts.label_field
    if field and md.error:
        refusal = f"--label-field {field}: {md.error}"
    elif field and md.meta is not None and field in md.meta:
        raw = md.meta[field]
        parsed = None if isinstance(raw, bool) or not isinstance(raw, (str, int)) else parse_label(raw)
        if parsed is None:
            refusal = (f"label {raw!r} (its metadata's {field!r}) is neither real nor fake: 0, 1, real, "
                       f"fake, 0_real, 1_fake, nature or ai")
        label = parsed
    if opts.source_field and md.meta is not None and md.meta.get(opts.source_field) not in (None, ""):
        source = str(md.meta[opts.source_field])
    return label, source or place.folder, split, refusal


def holds(inp: StoragePath, suffix: str) -> bool:
    """Whether `inp` is an archive with this suffix, or a folder or prefix with one below it."""
    if inp.suffix.lower() == suffix and not inp.is_dir():
        return True
    return inp.is_dir() and any(f.suffix.lower() == suffix for f, _ in location(inp).walk_files(inp))


def _img2dataset_metadata(f: StoragePath, tars: set[tuple[str, str]]) -> bool:
    """img2dataset's `NNNNN.parquet` / `NNNNN_stats.json` beside its `NNNNN.tar`."""
    name = f.name
    stem = f.stem if name.lower().endswith(".parquet") else name[:-len("_stats.json")] \
        if name.endswith("_stats.json") else None
    return stem is not None and (str(f.parent), stem) in tars


def walk(inp: StoragePath, opts: SourceOptions, found: Collected, listers: dict[str, Lister],
         ) -> list[Candidate]:
    """The candidates of an input holding archives: one archive (its folders as a single file's
    are read), or every file below a folder or prefix: archives through `listers` (by suffix),
    img2dataset's metadata left out, any other file as an image file (the files source reads it)."""
    suffix = inp.suffix.lower()
    if suffix in listers and not inp.is_dir():
        full = as_path(input_address(inp))
        place = Place(tuple(full.parent.parts[-4:]), full.parent.name, source_folder(full))
        return listers[suffix](inp, place, opts, found)
    files = [f for f, _ in location(inp).walk_files(inp)]
    tars = {(str(f.parent), f.stem) for f in files if f.suffix.lower() == ".tar"}
    root_name = inp.resolve().name
    out: list[Candidate] = []
    for f in files:
        rel = tuple(f.relative_to(inp).parts[:-1])
        lister = listers.get(f.suffix.lower())
        if lister is not None:
            out += lister(f, Place(rel, root_name, source_folder(as_path(input_address(f)))), opts, found)
        elif not _img2dataset_metadata(f, tars):
            label, source, split = infer_from_layout(list(rel), root_name, opts.layout)
            out.append(Candidate(input_address(f), label, source, split))
    return out


def split_member(path: str, suffix: str) -> tuple[str, str] | None:
    """(archive, member) of an address `archive<suffix>#member` (the first `<suffix>#` splits)."""
    at = path.lower().find(suffix + "#")
    if at < 0:
        return None
    return path[:at + len(suffix)], path[at + len(suffix) + 1:]
