"""Hugging Face parquet datasets as `shard` inputs: which files, which split each belongs to, which
columns hold the image, label, source and split, and what the label values mean.

Splits come from the dataset README's `configs:` YAML (`data_files` as split/path-glob pairs, a
glob or a list of globs), else from file names `<split>-NNNNN-of-NNNNN.parquet` or a split folder
(`data/train/x.parquet`). Columns are found by type and name: an Image-feature struct with a
`bytes` field or a binary column for the image (OpenFake `image`, Community Forensics
`image_data`); `label` / `is_fake`; `model` / `model_name` / `generator` / `source`; `split`.
Labels: ClassLabel names from the schema's `huggingface` metadata, 0/1, booleans, real/fake
strings, and `--real-values` / `--fake-values` for other names.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from stages.domain.layouts import SPLIT_NAMES, parse_label
from storage.errors import UserError
from storage.locations import ObjectPath, as_path
from storage.parquet_images import open_parquet

IMAGE_NAMES = ("image", "image_data", "img", "image_bytes", "jpg", "png", "bytes")
LABEL_NAMES = ("label", "labels", "is_fake", "fake", "class", "target")
SOURCE_NAMES = ("model", "model_name", "generator", "source", "generator_name")
SPLIT_COLUMN_NAMES = ("split",)
SHARD_NAME = re.compile(r"^(?P<split>[A-Za-z][\w]*?)-\d{5}-of-\d{5}")
METADATA_FILES = {"readme.md", ".gitattributes", "dataset_infos.json", "dataset_info.json"}


class ParquetInputError(UserError, ValueError):
    """A parquet input whose files or columns cannot be understood."""


@dataclass(frozen=True)
class ColumnOptions:
    """`--image-column`, `--label-column`, `--source-column`, `--split-column`, `--real-values`,
    `--fake-values`: None / empty where they are to be inferred."""

    image: str | None = None
    label: str | None = None
    source: str | None = None
    split: str | None = None
    real_values: tuple[str, ...] = ()
    fake_values: tuple[str, ...] = ()

    def recorded(self) -> dict:
        """The options given (for run.json), {} when all are inferred."""
        d = {k: v for k, v in (("image_column", self.image), ("label_column", self.label),
                               ("source_column", self.source), ("split_column", self.split)) if v}
        if self.real_values:
            d["real_values"] = list(self.real_values)
        if self.fake_values:
            d["fake_values"] = list(self.fake_values)
        return d


@dataclass(frozen=True)
class Columns:
    """The columns of one parquet file that `shard` reads, as inferred or named."""

    image: str  # `image.bytes` for a struct, else the binary column's name
    label: str | None
    source: str | None
    split: str | None
    class_names: tuple[str, ...] = ()  # a ClassLabel's names, from the schema metadata

    def describe(self) -> str:
        return (f"image={self.image} label={self.label or '-'}"
                f"{' (ClassLabel ' + '/'.join(self.class_names) + ')' if self.class_names else ''} "
                f"source={self.source or '-'} split={self.split or '-'}")


def is_parquet_dataset(folder: Path) -> bool:
    """A folder that is a parquet dataset: a README with `configs`, or parquet files and only
    metadata beside them."""
    if read_configs(folder):
        return True
    if isinstance(folder, ObjectPath):  # one listing
        files = [p for p, _ in folder.walk_files() if ".git" not in p.parts]
    else:
        files = [p for p in folder.rglob("*") if p.is_file() and ".git" not in p.parts]
    parquet = [p for p in files if p.suffix.lower() == ".parquet"]
    return bool(parquet) and all(p.suffix.lower() == ".parquet" or p.name.lower() in METADATA_FILES
                                 for p in files)


def read_configs(folder: Path) -> list[dict]:
    """The `configs:` list of a dataset README's YAML front matter ([] when there is none)."""
    readme = folder / "README.md"
    if not readme.is_file():
        return []
    text = readme.read_text(errors="replace")
    if not text.startswith("---"):
        return []
    end = text.find("\n---", 3)
    if end < 0:
        return []
    import yaml

    try:
        meta = yaml.safe_load(text[3:end]) or {}
    except yaml.YAMLError as e:
        raise ParquetInputError(f"{readme}: its YAML header does not parse: {e}") from e
    configs = meta.get("configs") if isinstance(meta, dict) else None
    return [c for c in configs if isinstance(c, dict)] if isinstance(configs, list) else []


def _config_globs(config: dict) -> list[tuple[str, str]]:
    """(split, glob) pairs of one config's `data_files` (a glob, a list, or split/path items)."""
    files = config.get("data_files")
    if isinstance(files, str):
        return [("train", files)]
    out = []
    for item in files if isinstance(files, list) else []:
        if isinstance(item, str):
            out.append(("train", item))
        elif isinstance(item, dict) and "path" in item:
            paths = item["path"] if isinstance(item["path"], list) else [item["path"]]
            out += [(str(item.get("split", "train")), str(p)) for p in paths]
    if isinstance(files, dict):  # {split: glob or [globs]}
        for split, paths in files.items():
            out += [(str(split), str(p)) for p in (paths if isinstance(paths, list) else [paths])]
    return out


def split_of_name(file: Path, root: Path) -> str | None:
    """The split a file's name (`test-00001-of-00004.parquet`) or folder (`data/val/`) says."""
    m = SHARD_NAME.match(file.name)
    if m:
        return m["split"]
    for part in reversed(file.relative_to(root).parts[:-1]):
        if part.lower() in SPLIT_NAMES:
            return part
    return None


def dataset_files(inp: Path) -> tuple[list[tuple[Path, str | None]], str]:
    """(file, split) of every parquet file of an input (a file, a folder, a dataset repository),
    sorted by path, and how the splits were found."""
    def absolute(p: Path | ObjectPath) -> Path | ObjectPath:
        return p if isinstance(p, ObjectPath) else Path(os.path.abspath(p))

    if inp.is_file():
        return [(absolute(inp), split_of_name(inp, inp.parent))], "file name"
    configs = read_configs(inp)
    found: dict[Path, str] = {}
    for config in configs:
        for split, pattern in _config_globs(config):
            for p in sorted(inp.glob(pattern)):
                if p.is_file() and p.suffix.lower() == ".parquet":
                    found.setdefault(absolute(p), split)  # a hub snapshot's links are kept
    if found:
        return sorted(found.items()), "README.md configs"
    if isinstance(inp, ObjectPath):
        files = [p for p, _ in inp.walk_files() if p.suffix.lower() == ".parquet"]
    else:
        files = sorted(p for p in inp.rglob("*.parquet") if p.is_file())
    return [(absolute(p), split_of_name(p, inp)) for p in files], "file names"


def _pick(schema, given: str | None, names: tuple[str, ...], what: str, flag: str, file: Path) -> str | None:
    fields = [f.name for f in schema]
    if given:
        if given not in fields:
            raise ParquetInputError(f"{file}: {flag} {given!r}: no such column "
                                    f"(columns: {', '.join(fields)})")
        return given
    lowered = {f.lower(): f for f in fields}
    return next((lowered[n] for n in names if n in lowered), None)


def image_column(schema, given: str | None, file: Path) -> str:
    """`name.bytes` for a struct column with a binary `bytes` field, else a binary column."""
    import pyarrow as pa

    def usable(field) -> str | None:
        if pa.types.is_struct(field.type):
            inner = [field.type.field(i) for i in range(field.type.num_fields)]
            if any(f.name == "bytes" and (pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type))
                   for f in inner):
                return f"{field.name}.bytes"
        if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
            return field.name
        return None

    if given:
        name = _pick(schema, given, (), "image", "--image-column", file)
        col = usable(schema.field(name))
        if col is None:
            raise ParquetInputError(f"{file}: --image-column {given!r} is {schema.field(name).type}, "
                                    f"not binary bytes or a struct with a `bytes` field")
        return col
    candidates = [(f.name, usable(f)) for f in schema if usable(f)]
    if not candidates:
        raise ParquetInputError(f"{file}: no image column (a binary column or an Image struct with "
                                f"`bytes`); columns: {', '.join(f.name for f in schema)}; name it with "
                                f"--image-column")
    named = [c for n, c in candidates if n.lower() in IMAGE_NAMES]
    return (named or [c for _, c in candidates])[0]


def class_names(schema, column: str | None) -> tuple[str, ...]:
    """A ClassLabel column's names from the `huggingface` schema metadata, () if none."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not column or not meta:
        return ()
    try:
        info = json.loads(meta)
    except ValueError:
        return ()
    features = info.get("info", {}).get("features", {}) if isinstance(info, dict) else {}
    feature = features.get(column, {}) if isinstance(features, dict) else {}
    names = feature.get("names") if isinstance(feature, dict) else None
    return tuple(map(str, names)) if isinstance(names, list) else ()


def infer_columns(schema, opts: ColumnOptions, file: Path) -> Columns:
    """The columns to read from a file with this arrow schema."""
    label = _pick(schema, opts.label, LABEL_NAMES, "label", "--label-column", file)
    return Columns(
        image=image_column(schema, opts.image, file), label=label,
        source=_pick(schema, opts.source, SOURCE_NAMES, "source", "--source-column", file),
        split=_pick(schema, opts.split, SPLIT_COLUMN_NAMES, "split", "--split-column", file),
        class_names=class_names(schema, label))


def label_value(value: object, columns: Columns, opts: ColumnOptions) -> int | None:
    """0 (real) / 1 (fake) of a label cell, None when it says neither."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if columns.class_names and isinstance(value, int) and 0 <= value < len(columns.class_names):
        value = columns.class_names[value]
    text = str(value).strip().lower()
    if text in {v.lower() for v in opts.real_values}:
        return 0
    if text in {v.lower() for v in opts.fake_values}:
        return 1
    return parse_label(text)


@dataclass(frozen=True)
class Row:
    """One row's labels as its columns give them (the image is read later)."""

    row: int
    label: int | None
    raw_label: object
    source: str | None
    split: str | None


def read_rows(file: Path, columns: Columns, opts: ColumnOptions) -> Iterator[Row]:
    """Every row of a file, one row group at a time, reading the label/source/split columns only."""

    wanted = [c for c in (columns.label, columns.source, columns.split) if c]
    pf = open_parquet(str(file))
    row = 0
    for rg in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        table = pf.read_row_group(rg, columns=wanted, use_threads=False) if wanted else None
        cols = {c: table.column(c).to_pylist() for c in wanted} if table is not None else {}
        for k in range(n):
            raw = cols[columns.label][k] if columns.label else None
            src = cols[columns.source][k] if columns.source else None
            spl = cols[columns.split][k] if columns.split else None
            yield Row(row + k, label_value(raw, columns, opts) if columns.label else None, raw,
                      None if src is None else str(src), None if spl is None else str(spl))
        row += n


def image_bytes_at(path: str) -> bytes:
    """The bytes of a manifest path: a file's, or a parquet row's (its row group's image column
    read for it; the column found as `shard` finds it). Raises OSError or ValueError."""
    from storage.parquet_images import read_column, split_address

    parts = split_address(path)
    if parts is None:
        return as_path(path).read_bytes()
    file, row = parts
    meta = open_parquet(file).metadata
    column = image_column(meta.schema.to_arrow_schema(), None, Path(file))
    first = 0
    for rg in range(meta.num_row_groups):
        n = meta.row_group(rg).num_rows
        if row < first + n:
            data = read_column(file, rg, column)[row - first]
            if data is None:
                raise ValueError(f"{path}: null image bytes")
            return data
        first += n
    raise ValueError(f"{path}: the file has {first} rows")


def resolve_dataset(inp: Path, download: bool = False) -> Path:
    """An input as given when it exists; a dataset id (`ComplexDataLab/OpenFake`) from the local
    Hugging Face cache, offline, as model ids are; with `download`, its parquet files and README
    fetched into that cache first (network needed)."""
    from stages.domain.noise_model import HUB_ID, hub_cache_dir

    if os.path.lexists(inp) or not HUB_ID.match(str(inp)):
        return inp
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(str(inp), repo_type="dataset", cache_dir=cache,
                                      local_files_only=not download,
                                      allow_patterns=["*.parquet", "README.md"]))
    except Exception as e:  # not cached (LocalEntryNotFoundError), or the download failed
        how = "" if download else (f"; on a machine with a network, `huggingface-cli download --repo-type "
                                   f"dataset {inp}` (or rerun with --download) puts it there")
        raise ParquetInputError(
            f"{inp}: no such file or folder, and not a dataset in the Hugging Face cache {cache} "
            f"(searched datasets--{str(inp).replace('/', '--')}/snapshots/ there){how} "
            f"({type(e).__name__})") from e
