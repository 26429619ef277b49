"""Hugging Face parquet datasets as `shard` inputs: which files, which split each belongs to, which
columns hold the image, label, source and split, and what the label values mean.

Splits follow the `datasets` library's rules (`datasets/data_files.py`; `load_dataset` gives the same
splits, tested against it): the dataset README's `configs:` YAML (`data_files` as split/path-glob
pairs, a glob or a list of globs, under an optional `data_dir`), else `data/<split>-NNNNN-of-NNNNN.*`
files (then no other file is data), else a split keyword as a folder name (`train/`, `data/dev/`,
`my-test/`), else as a file name or its part between separators (`train.parquet`, `test-00000.parquet`,
`x.eval.parquet`); the keywords are train/training, validation/valid/val/dev and
test/testing/eval/evaluation, the separators `-._`, a space or a digit, case as written. Files those
rules leave out are refused with the reason; when no name gives a split, every file is `train`, said
so. `validation` is this project's `val`. Columns are found by type and name: an Image-feature struct with a
`bytes` field or a binary column for the image (OpenFake `image`, Community Forensics
`image_data`); `label` / `is_fake`; `model` / `model_name` / `generator` / `source`; `split`.
Labels: ClassLabel names from the schema's `huggingface` metadata, 0/1, booleans, real/fake
strings, and `--real-values` / `--fake-values` for other names.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from stages.domain.layouts import parse_label
from storage.errors import UserError
from storage.locations import ObjectPath, as_path, location
from storage.parquet_images import ParquetError, ParquetSource, open_parquet

IMAGE_NAMES = ("image", "image_data", "img", "image_bytes", "jpg", "png", "bytes")
LABEL_NAMES = ("label", "labels", "is_fake", "fake", "class", "target")
SOURCE_NAMES = ("model", "model_name", "generator", "source", "generator_name")
SPLIT_COLUMN_NAMES = ("split",)
# datasets' data_files conventions: `data/{split}-NNNNN-of-NNNNN*.*` (any split name), else these
# keywords in a folder name or a file name, between separators (start or end of a folder name too)
SHARD_NAME = re.compile(r"^(?P<split>.+)-\d{5}-of-\d{5}[^/]*\.[^/]*$")
HUB_SPLIT_KEYWORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
                      "test": ("test", "testing", "eval", "evaluation")}
_SEP = "[-._ 0-9]"
_IN_FOLDER = {s: re.compile(rf"(?:^|{_SEP})(?:{'|'.join(w)})(?:{_SEP}|$)")
              for s, w in HUB_SPLIT_KEYWORDS.items()}
_IN_FILE = {s: re.compile(rf"(?:^|{_SEP})(?:{'|'.join(w)}){_SEP}") for s, w in HUB_SPLIT_KEYWORDS.items()}
# an image folder's metadata table (datasets' imagefolder) is not a parquet dataset's data
METADATA_TABLES = {"metadata.parquet", "metadata.csv", "metadata.jsonl"}
# files datasets never takes as data (`datasets.data_files.FILES_TO_IGNORE`)
HUB_IGNORED = {"README.md", "config.json", "dataset_info.json", "dataset_infos.json", "dummy_data.zip",
               "dataset_dict.json"}


class ParquetInputError(UserError, ValueError):
    """A parquet input whose files or columns cannot be understood."""


@dataclass(frozen=True)
class ColumnOptions:
    """`--image-column`, `--label-column`, `--source-column`, `--split-column`, `--real-values`,
    `--fake-values`, `--config`: None / empty where they are to be inferred."""

    image: str | None = None
    label: str | None = None
    source: str | None = None
    split: str | None = None
    real_values: tuple[str, ...] = ()
    fake_values: tuple[str, ...] = ()
    config: str | None = None  # `--config`: the README config to read (default: load_dataset's)

    def recorded(self) -> dict:
        """The options given (for run.json), {} when all are inferred."""
        d = {k: v for k, v in (("image_column", self.image), ("label_column", self.label),
                               ("source_column", self.source), ("split_column", self.split),
                               ("config", self.config)) if v}
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


def _listing(folder: Path) -> list[Path]:
    """Every file below a folder (`Location.walk_files`: one listing, in path order), `.git` left out."""
    return [p for p, _ in location(folder).walk_files(folder) if ".git" not in p.relative_to(folder).parts]


def _hidden(rel: PurePosixPath) -> bool:
    """A path datasets skips: a part starting with `.` or `__` (`.cache/`, `__pycache__/`)."""
    return any(part.startswith((".", "__")) for part in rel.parts)


def is_parquet_dataset(folder: Path) -> bool:
    """A folder that is a parquet dataset. As `load_dataset` chooses its reader: by the most common
    file type among the data files (parquet winning a tie), the data files being those the first
    README config's `data_files` select, else those its split name rules select (a LICENSE,
    `.gitattributes`, a README or a card's preview pictures outside them change nothing; an image
    folder with a `metadata.parquet` stays an image folder). A README config that selects nothing is
    read as parquet, so that its error is the one shown."""
    from PIL import Image

    listing = _listing(folder)
    rel = [PurePosixPath(*p.relative_to(folder).parts) for p in listing]
    configs = read_configs(folder)
    if configs and configs[0].get("data_files"):
        base = _data_dir(folder, configs[0])
        data = sorted({f for _, pattern in _config_globs(configs[0])
                       for f in _matching(rel, _pattern_in(folder, base, pattern))})
        if not data:
            return True
    else:
        shown = [f for f in rel if not _hidden(f) and f.name.lower() not in METADATA_TABLES
                 and f.name not in HUB_IGNORED]
        splits, _ = hub_splits(shown)
        data = [f for f in shown if f in splits] if splits else shown
    data = [f for f in data if f.name.lower() not in METADATA_TABLES]
    image_suffixes = set(Image.registered_extensions())
    counts = Counter(f.suffix.lower() for f in data)
    images = max((n for suffix, n in counts.items() if suffix in image_suffixes), default=0)
    return counts[".parquet"] > 0 and counts[".parquet"] >= images


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


def hub_splits(files: list[PurePosixPath]) -> tuple[dict[PurePosixPath, str], str]:
    """The split of each data file (paths relative to the dataset's folder) by datasets' rules, and
    which rule gave them; ({}, "") when no name gives a split (then all are `train`). A file the
    rule that applies does not match is left out of the dict (load_dataset does not read it); one
    that two splits match is in the first (train, validation, test), where load_dataset reads it twice."""
    sharded = {f: m["split"] for f in files
               if len(f.parts) == 2 and f.parts[0] == "data" and (m := SHARD_NAME.match(f.name))}
    if sharded:
        return sharded, "file names data/<split>-NNNNN-of-NNNNN"
    for how, rules, part in (("split folder names", _IN_FOLDER, lambda f: f.parts[:-1]),
                             ("split keywords in file names", _IN_FILE, lambda f: (f.name,))):
        found = {f: next(s for s, rx in rules.items() if any(rx.search(p) for p in part(f)))
                 for f in files if any(rx.search(p) for rx in rules.values() for p in part(f))}
        if found:
            return found, how
    return {}, ""


def split_of_name(file: Path) -> str | None:
    """The split a single file's name says (`test-00001-of-00004.parquet`, `validation.parquet`)."""
    m = SHARD_NAME.match(file.name)
    if m:
        return m["split"]
    return next((s for s, rx in _IN_FILE.items() if rx.search(file.name)), None)


def source_folder(file: Path) -> str:
    """The source a parquet file's folders give when no column does: its folder's name, or, where
    that folder (and those above it) are split folders (`sd/train/x.parquet`), the first above them."""
    folder = file.parent
    while folder.name and any(rx.search(folder.name) for rx in _IN_FOLDER.values()):
        folder = folder.parent
    return folder.name or file.parent.name


DEFAULT_SPLIT_HOW = "default: no README configs, split folder or split file name"


@dataclass
class DatasetFiles:
    """The parquet files of an input with their splits (None: no name gives one, so `train` by the
    stated default), how the splits were found, and the files left out with the reason."""

    files: list[tuple[Path, str | None]]
    how: str
    left_out: list[tuple[Path, str]] = field(default_factory=list)


def _absolute(p: Path | ObjectPath) -> Path | ObjectPath:
    return location(p).absolute(p)


def _by_names(base: Path, parquet: list[Path]) -> DatasetFiles:
    """The files below `base` with their splits by datasets' file and folder name rules."""
    rel = {p: PurePosixPath(*p.relative_to(base).parts) for p in parquet}
    out = DatasetFiles([], "", [(p, "hidden (a name starting with . or __): load_dataset skips it; give "
                                 "the file as its own input to take it") for p in parquet if _hidden(rel[p])])
    shown = [p for p in parquet if not _hidden(rel[p])]
    splits, how = hub_splits([rel[p] for p in shown])
    if not splits:
        out.files, out.how = [(_absolute(p), None) for p in shown], DEFAULT_SPLIT_HOW
        return out
    out.how = how
    for p in shown:
        if rel[p] in splits:
            out.files.append((_absolute(p), splits[rel[p]]))
        else:
            out.left_out.append((p, f"not a data file by the Hugging Face conventions the other files follow "
                                    f"({how}): load_dataset does not read it either; give it as its own "
                                    f"input (with --split) to take it"))
    return out


def config_name(config: dict) -> str:
    """A README config's name (`default` when a lone config has none)."""
    return str(config.get("config_name", "default"))


def choose_config(folder: Path, configs: list[dict], name: str | None) -> dict | None:
    """The README config `load_dataset(folder, name)` reads: `name`, else the only one, else the one
    marked `default: true` or named `default`; several and none the default is refused, as datasets
    refuses it ("Config name is missing"). None when the README has no configs."""
    readme = folder / "README.md"
    names = [config_name(c) for c in configs]
    if name is not None:
        if not configs:
            raise ParquetInputError(f"{folder}: --config {name!r}: its README.md has no `configs:` to choose "
                                    f"from")
        if name not in names:
            raise ParquetInputError(f"{readme}: --config {name!r}: no such config "
                                    f"(configs: {', '.join(names)})")
        return configs[names.index(name)]
    if len(configs) <= 1:
        return configs[0] if configs else None
    defaults = [c for c, n in zip(configs, names, strict=True) if n == "default" or c.get("default") is True]
    if len(defaults) > 1:
        raise ParquetInputError(f"{readme}: several default configs "
                                f"({', '.join(map(config_name, defaults))}); choose one with --config NAME")
    if not defaults:
        raise ParquetInputError(
            f"{readme}: {len(configs)} configs ({', '.join(names)}) and none is the default (`default: true` "
            f"or named `default`): load_dataset refuses it too (\"Config name is missing\"); choose one with "
            f"--config NAME")
    return defaults[0]


def _data_dir(folder: Path, config: dict) -> str:
    """A config's `data_dir` relative to the dataset folder, as a posix path ('' for none)."""
    d = str(config.get("data_dir") or "").strip("/")
    return "" if not d else posixpath.normpath(d)


def _pattern_in(folder: Path, base: str, pattern: str) -> str | None:
    """A data_files pattern relative to the dataset folder (below `base`, its data_dir; an absolute
    one as it is); None when it reaches outside the folder."""
    rel = location(folder).relative(folder, pattern)  # an absolute path (a URL) in the folder's syntax
    if rel is None:
        rel = posixpath.normpath(posixpath.join(base, pattern) if base else pattern)
    return None if rel == ".." or rel.startswith("../") or rel.startswith("/") else rel


def _matching(files: list[PurePosixPath], pattern: str | None) -> list[PurePosixPath]:
    """The files a data_files pattern (relative to the folder) selects, as datasets resolves it: fsspec's
    glob (`*` within a name, `**` across folders), hidden parts (`.x`) and `__x` folders only where the
    pattern names as many, datasets' non-data files (README.md, ...) never."""
    if pattern is None:
        return []
    from fsspec.utils import glob_translate

    rx = re.compile(glob_translate(pattern))
    want = PurePosixPath(pattern)

    def hidden(parts: tuple[str, ...]) -> int:
        return sum(1 for part in parts if part.startswith(".") and set(part) != {"."})

    def special(parts: tuple[str, ...]) -> int:
        return sum(1 for part in parts if part.startswith("__"))

    return [f for f in files if rx.match(str(f)) and f.name not in HUB_IGNORED
            and hidden(f.parts) == hidden(want.parts)
            and special(f.parent.parts) == special(want.parent.parts)]


def _config_files(inp: Path, config: dict, parquet: list[Path]) -> dict[Path, str]:
    """{file: split} of the parquet files a README config selects; a pattern that selects no file,
    or a split with no parquet file, is an error naming the README and the pattern, as in datasets."""
    readme, name = inp / "README.md", config_name(config)
    base = _data_dir(inp, config)
    rel = {PurePosixPath(*p.relative_to(inp).parts): p for p in _listing(inp)}
    if not config.get("data_files"):  # a data_dir alone (or nothing): its files by the name rules
        below = [p for p in parquet if not base or str(p).startswith(str(inp / base) + "/")]
        if not below:
            raise ParquetInputError(f"{readme}: config {name!r}: data_dir {base!r} holds no .parquet file")
        return {p: split or "train" for p, split in _by_names(inp / base if base else inp, below).files}
    found: dict[Path, str] = {}
    per_split: Counter = Counter()
    for split, pattern in _config_globs(config):
        where = _pattern_in(inp, base, pattern)
        if where is None:
            raise ParquetInputError(
                f"{readme}: config {name!r} data_files {pattern!r} lies outside {inp}: a run reads only "
                f"below its inputs; give those files as an input of their own (with --split {split})")
        matched = [rel[f] for f in _matching(list(rel), where)]
        if not matched and not re.search(r"[*?\[]", pattern):
            raise ParquetInputError(f"{readme}: config {name!r} data_files {pattern!r}: no such file")
        per_split[split] += 0
        for p in sorted(matched):
            if p.suffix.lower() == ".parquet":
                per_split[split] += 1
                found.setdefault(_absolute(p), split)  # one file in two splits: the first (a hub link kept)
    empty = [split for split, n in per_split.items() if n == 0]
    if empty:
        patterns = [pattern for split, pattern in _config_globs(config) if split in empty]
        raise ParquetInputError(
            f"{readme}: config {name!r}: split {empty[0]!r}: data_files "
            f"{', '.join(map(repr, patterns))} match no .parquet file (load_dataset refuses it too: "
            f"DataFilesNotFoundError)")
    return found


def dataset_files(inp: Path, config: str | None = None) -> DatasetFiles:
    """The parquet files of an input (a file, a folder, a dataset repository) with their splits,
    sorted by path, as `load_dataset(inp, config)` finds them."""
    if inp.is_file():
        split = split_of_name(inp)
        return DatasetFiles([(_absolute(inp), split)], "file name" if split else DEFAULT_SPLIT_HOW)
    parquet = [p for p in _listing(inp) if p.suffix.lower() == ".parquet"]
    configs = read_configs(inp)
    chosen = choose_config(inp, configs, config)
    if chosen is None:
        out = _by_names(inp, parquet)
        out.files.sort()
        return out
    found = _config_files(inp, chosen, parquet)
    taken = {str(_absolute(p)) for p in found}
    which = f"README.md config {config_name(chosen)!r}" if len(configs) > 1 else "README.md configs"
    why = (f"not in the data_files of the {which}: load_dataset does not read it either; give it as its "
           f"own input (with --split){' or choose another --config' if len(configs) > 1 else ''} to take it")
    return DatasetFiles(sorted((_absolute(p), split) for p, split in found.items()), which,
                        [(p, why) for p in parquet if str(_absolute(p)) not in taken])


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
    features = hf_features(schema)  # datasets' own record of which columns are Image features
    images = [(n, c) for n, c in candidates if features.get(n, {}).get("_type") == "Image"] or candidates
    named = [c for n, c in images if n.lower() in IMAGE_NAMES]
    if not named and len(images) > 1 and images is not candidates:
        raise ParquetInputError(f"{file}: several Image features ({', '.join(n for n, _ in images)}); name "
                                f"the one to read with --image-column")
    return (named or [c for _, c in images])[0]


def hf_features(schema) -> dict[str, dict]:
    """The `datasets` features recorded in the schema's `huggingface` metadata ({} if none)."""
    meta = (schema.metadata or {}).get(b"huggingface")
    try:
        info = json.loads(meta) if meta else {}
    except ValueError:
        return {}
    features = info.get("info", {}).get("features", {}) if isinstance(info, dict) else {}
    return {k: v for k, v in features.items() if isinstance(v, dict)} if isinstance(features, dict) else {}


def class_names(schema, column: str | None) -> tuple[str, ...]:
    """A ClassLabel column's names from the `huggingface` schema metadata, () if none."""
    names = hf_features(schema).get(column or "", {}).get("names")
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
    """0 (real) / 1 (fake) of a label cell, None when it says neither. A ClassLabel value is named by
    `--real-values` / `--fake-values` as its integer or its class name."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    texts = [str(value).strip().lower()]
    if columns.class_names and isinstance(value, int) and 0 <= value < len(columns.class_names):
        texts.insert(0, columns.class_names[value].strip().lower())  # the name first, then the integer
    real = {v.strip().lower() for v in opts.real_values}
    fake = {v.strip().lower() for v in opts.fake_values}
    for text in texts:
        if text in real:
            return 0
        if text in fake:
            return 1
    return parse_label(texts[0])


def describe_label(value: object, columns: Columns) -> str:
    """A label cell as a message shows it: a ClassLabel's integer with its class name."""
    if columns.class_names and isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(columns.class_names):
            return f"{value} (ClassLabel {columns.class_names[value]!r})"
        return (f"{value} (no class of the ClassLabel {'/'.join(columns.class_names)}; -1 is datasets' "
                f"no label)")
    return repr(value)


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


def path_only_rows(file: Path, columns: Columns) -> dict[int, str]:
    """{row: path} of the rows whose Image cell has a `path` but no `bytes` (datasets writes those for
    images it did not embed); only row groups whose statistics count null bytes are read."""
    import pyarrow.compute as pc  # a submodule `import pyarrow` does not load

    if not columns.image.endswith(".bytes"):
        return {}
    struct = columns.image[: -len(".bytes")]
    pf = open_parquet(str(file))
    meta, arrow = pf.metadata, pf.schema_arrow
    if struct not in arrow.names or arrow.field(struct).type.get_field_index("path") < 0:
        return {}
    leaf = next((i for i in range(meta.num_columns) if meta.schema.column(i).path == columns.image), None)
    out: dict[int, str] = {}
    first = 0
    for rg in range(meta.num_row_groups):
        stats = meta.row_group(rg).column(leaf).statistics if leaf is not None else None
        if stats is not None and stats.has_null_count and stats.null_count > 0:
            col = pf.read_row_group(rg, columns=[struct], use_threads=False).column(0).combine_chunks()
            data, paths = col.field("bytes"), col.field("path")
            valid = pc.and_(col.is_valid(), data.is_null()).to_pylist()
            out.update({first + k: p for k, (v, p) in enumerate(zip(valid, paths.to_pylist(), strict=True))
                        if v and p})
        first += meta.row_group(rg).num_rows
    return out


def image_bytes_at(path: str, sources: Mapping[str, ParquetSource], key: str | None = None) -> bytes:
    """The bytes of a manifest path: a file's, or a parquet row's, read from the column `shard`
    recorded in `RUN/parquet.json` (`sources`, from `read_index`), never inferred again; with `key`,
    checked against it. Raises OSError or ValueError (ParquetError) naming the path."""
    import hashlib

    from storage.parquet_images import RowGroupReader, split_address

    parts = split_address(path)
    if parts is None:
        data = as_path(path).read_bytes()
    else:
        if parts[0] not in sources:
            raise ParquetError(f"{path}: its file is not in the run's parquet.json (the image column "
                               f"shard read is recorded there)")
        sources[parts[0]].check_unchanged()
        data = RowGroupReader({parts[0]: sources[parts[0]]}).read(path)
        if data is None:
            raise ParquetError(f"{path}: null image bytes in column {sources[parts[0]].column}")
    if key is not None and hashlib.sha256(data).hexdigest() != key:
        raise ValueError(f"{path}: its bytes' sha256 is not the manifest key {key} (changed since shard)")
    return data


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
