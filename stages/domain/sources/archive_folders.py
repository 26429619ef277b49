"""What the two archive sources (`webdataset_tar.py`, `zip_archive.py`) share: walking an input that
holds archives (one archive, or a folder or prefix of them; img2dataset's `NNNNN.parquet` and
`NNNNN_stats.json` beside a tar left out as its metadata, any other file there taken as an image
file, an archive beside loose image files refused: its folder is an image folder, a parquet dataset
folder left to the parquet source), and an image member's label, source and split.

A member's label comes from, in this order: the metadata field named by `--label-field` (a key of
the sample's `KEY.json` as WebDataset pairs it, or of its entry in a JSON member mapping image file
names to their metadata as DiffusionDB's `part-NNNNNN.json` does; `--label-field cls` / `txt`
names the sample's `KEY.cls` / `KEY.txt` member), the folders above the archive and inside it by
the layout rules of folders; `shard --label` overrides all. A `.cls` is a label only when named so:
it is most often a class index (ImageNet's), not real/fake. Its source: the `--source-field`, else
the layout's, else the archive's folder name (the first above split folders).
Its split: the layout's."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from stages.domain.layouts import infer_from_layout, parse_label
from stages.domain.parquet_layouts import is_parquet_dataset, source_folder
from stages.domain.sources.base import Candidate, Collected, SourceOptions, input_address
from storage.archive_members import IMAGE_SUFFIXES
from storage.locations import StoragePath, as_path, location

SIDECARS = frozenset({"json", "txt", "cls"})  # a sample's metadata members (WebDataset's extensions)
COMPRESSED_TARS = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz", ".tar.zst", ".tzst")
COMPRESSED = ("compressed tar: members cannot be read in place; decompress it (gunzip / unxz / unzstd "
              "to a .tar) and shard the .tar")
NO_LABEL = ("no label: no --label-field value in its metadata, and the folders name no real/fake class "
            "(0_real, 1_fake, real, nature, ai, <generator> under a split); give --label-field, --label "
            "or --layout")
STRAY_ARCHIVE = ("an archive inside an image folder: its members are not read; give the archive (or a "
                 "folder of archives) as its own input")
ARCHIVES = (".tar", ".zip", *COMPRESSED_TARS)
_MISSING = object()


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
    """What an image member's metadata says: its JSON object, the text of its `.cls` / `.txt`
    members (by extension), why its JSON could not be read, and why it cannot be paired with the
    image at all (a duplicate member name)."""

    meta: dict | None = None
    fields: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    ambiguous: str | None = None

    def value(self, name: str) -> object:
        """The metadata's value for the field `name` (`_MISSING` when it has none): a sidecar
        member of that extension (`cls`), else the JSON's key."""
        if name in self.fields:
            return self.fields[name]
        if self.meta is not None and name in self.meta:
            return self.meta[name]
        return _MISSING


def split_key(name: str) -> tuple[str, str, list[str]]:
    """(sample key, extension, folders) of a member name by WebDataset's convention: the key is the
    folder prefix and the file name up to its first dot (`a/b.seg.png`: `a/b`, `seg.png`, [a])."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext, [d for d in folder.split("/") if d not in ("", ".")]


def last_ext(name: str) -> str:
    """A member's last extension, lower case (`a/b.c.JSON`: `json`; none: "")."""
    base = name.rpartition("/")[2]
    return base.rpartition(".")[2].lower() if "." in base else ""


def full_stem(name: str) -> str:
    """A member's name without its last extension (`a/b.c.json`: `a/b.c`)."""
    folder, _, base = name.rpartition("/")
    stem = base.rpartition(".")[0] if "." in base else base
    return f"{folder}/{stem}" if folder else stem


def is_sidecar(name: str) -> bool:
    """A sample's metadata member (its last extension `.json`, `.txt`, `.cls`), not an image to read."""
    return last_ext(name) in SIDECARS


def is_compressed_tar(name: str) -> bool:
    """A compressed tar (`.tar.gz`, `.tgz`, ...): its members cannot be read by offset."""
    return name.lower().endswith(COMPRESSED_TARS)


def _json(data: bytes) -> tuple[object, str | None]:
    try:
        return json.loads(data), None
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"not valid JSON ({e})"


def _own(name: str, index: dict[tuple[str, str], str]) -> dict[str, str]:
    """ext -> the sidecar member of image `name`: by WebDataset's key first, then by its full stem."""
    out = {}
    for ext in SIDECARS:
        for stem in (split_key(name)[0], full_stem(name)):
            if (stem, ext) in index:
                out[ext] = index[(stem, ext)]
                break
    return out


def read_metadata(images: list[tuple[str, dict[str, bytes]]], dups: frozenset[str] = frozenset(),
                  own_dups: frozenset[str] = frozenset()) -> list[Metadata]:
    """Each image member's metadata, from the sidecars of its sample (name -> bytes: a tar sample's
    own, a zip's all): its `KEY.json` / `KEY.cls` / `KEY.txt`, else its entry in a JSON member that
    maps file names to objects. `dups`: names the archive holds more than once, whose mapped entry
    cannot be paired with one of them; `own_dups`: likewise for own sidecars (a zip's, paired by name
    alone; a tar's are paired within their sample)."""
    indexes: dict[int, dict[tuple[str, str], str]] = {}
    owned: list[dict[str, str]] = []
    used: set[tuple[int, str]] = set()
    for name, sidecars in images:
        if id(sidecars) not in indexes:
            indexes[id(sidecars)] = {(full_stem(n), last_ext(n)): n for n in sidecars}
        own = _own(name, indexes[id(sidecars)])
        owned.append(own)
        used |= {(id(sidecars), n) for n in own.values()}
    mapped: dict[str, tuple[dict, str]] = {}  # DiffusionDB's part-NNNNNN.json: {file name: {...}}
    groups = {id(s): s for _, s in images}
    for gid, sidecars in groups.items():
        for member, data in sidecars.items():
            if last_ext(member) == "json" and (gid, member) not in used:
                obj, _ = _json(data)
                folder = member.rpartition("/")[0]
                for k, v in (obj.items() if isinstance(obj, dict) else ()):
                    if isinstance(v, dict):
                        mapped[f"{folder}/{k}" if folder else str(k)] = (v, member)
    out = []
    for (name, sidecars), own in zip(images, owned, strict=True):
        meta, error, ambiguous = None, None, None
        if "json" in own:
            obj, error = _json(sidecars[own["json"]])
            meta = obj if isinstance(obj, dict) else None
            if error is None and meta is None:
                error = "not a JSON object"
            error = f"its metadata {own['json']} is {error}" if error else None
        elif name in mapped:
            meta = mapped[name][0]
            if name in dups:
                ambiguous = mapped[name][1]
        if ambiguous is None and own and ({name, *own.values()} & own_dups):
            ambiguous = ", ".join(sorted(own.values()))
        fields = {ext: sidecars[m].decode("utf-8", "replace").strip() for ext, m in own.items()
                  if ext != "json"}
        out.append(Metadata(meta, fields, error, ambiguous and (
            f"duplicate member name: the archive holds more than one member named {name!r} (or its "
            f"metadata's), so its metadata ({ambiguous}) cannot be paired with one of them")))
    return out


def _parsed_label(raw: object, name: str) -> tuple[int | None, str | None]:
    parsed = None if isinstance(raw, bool) or not isinstance(raw, (str, int)) else parse_label(raw)
    if parsed is None:
        return None, (f"label {raw!r} (its metadata's {name!r}) is neither real nor fake: 0, 1, real, "
                      f"fake, 0_real, 1_fake, nature or ai")
    return parsed, None


@dataclass(frozen=True)
class Refusal:
    """Why an image member is refused before it is read: `reason` whatever the label (its metadata
    cannot be paired with it), `label` only for want of a label (a forced `--label` clears it)."""

    reason: str | None = None
    label: str | None = None


def member_labels(name: str, place: Place, md: Metadata, opts: SourceOptions,
                  ) -> tuple[int | None, str | None, str | None, Refusal]:
    """(label, source, split, refusal) of the image member `name` of an archive at `place`."""
    inner = split_key(name)[2]
    label, source, split = infer_from_layout([*place.dirs, *inner], place.root_name, opts.layout)
    refusal = Refusal()
    named = opts.label_field
    if (named or opts.source_field) and md.ambiguous:
        refusal = Refusal(reason=md.ambiguous)
    elif named and named not in md.fields and md.error:
        refusal = Refusal(label=f"--label-field {named}: {md.error}")
    elif named and (raw := md.value(named)) is not _MISSING:
        label, why = _parsed_label(raw, named)
        refusal = Refusal(label=why)
    if opts.source_field and md.value(opts.source_field) not in (_MISSING, None, ""):
        source = str(md.value(opts.source_field))
    return label, source or place.folder, split, refusal


def holds(inp: StoragePath, *suffixes: str) -> bool:
    """Whether `inp` is an archive with one of these suffixes (of its name: `.tar.gz` too), or a
    folder or prefix with one below it that is no parquet dataset (`parquet_claims`)."""
    def named(f: StoragePath) -> bool:
        return f.name.lower().endswith(suffixes)

    if not inp.is_dir():
        return named(inp)
    files = [f for f, _ in location(inp).walk_files(inp)]
    return any(named(f) for f in files) and not parquet_claims(inp, files)


def parquet_claims(inp: StoragePath, files: list[StoragePath]) -> bool:
    """Whether a folder holding archives is a parquet dataset (a Hugging Face repo with an extra
    images.zip), its every `.parquet` not img2dataset's metadata beside a tar of the same stem."""
    tars = {(str(f.parent), f.stem) for f in files if f.suffix.lower() == ".tar"}
    stray = any(f.suffix.lower() == ".parquet" and not _img2dataset_metadata(f, tars) for f in files)
    return stray and is_parquet_dataset(inp)


def stray_folders(files: list[StoragePath]) -> set[str]:
    """The folders where an archive sits beside a loose image file: image folders, whose archives
    are not read (`STRAY_ARCHIVE`). A symlink loop named .png is no image file."""
    archive_dirs = {str(f.parent) for f in files if f.name.lower().endswith(ARCHIVES)}
    out: set[str] = set()
    for f in files:
        d = str(f.parent)
        if d in archive_dirs and d not in out and f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
            out.add(d)
    return out


def archive_refusal(name: str) -> str | None:
    """The reject reason of an archive listed as a file of an image folder (`STRAY_ARCHIVE`);
    None for any other file."""
    return STRAY_ARCHIVE if name.lower().endswith(ARCHIVES) else None


def _img2dataset_metadata(f: StoragePath, tars: set[tuple[str, str]]) -> bool:
    """img2dataset's `NNNNN.parquet` / `NNNNN_stats.json` beside its `NNNNN.tar`."""
    name = f.name
    stem = f.stem if name.lower().endswith(".parquet") else name[:-len("_stats.json")] \
        if name.endswith("_stats.json") else None
    return stem is not None and (str(f.parent), stem) in tars


def refused(address: str, reason: str, kind: str) -> Candidate:
    """An archive (or member) refused whole before any image is read: a candidate with its reason,
    so that it counts in the run's `files` as it is a reject."""
    return Candidate(address, None, None, None, reason, kind=kind)


def walk(inp: StoragePath, opts: SourceOptions, found: Collected, listers: dict[str, Lister],
         ) -> list[Candidate]:
    """The candidates of an input holding archives: one archive (its folders as a single file's
    are read), or every file below a folder or prefix: archives through `listers` (by suffix),
    img2dataset's metadata left out, any other file as an image file (the files source reads it),
    an archive beside loose image files refused (`stray_folders`)."""
    suffix = inp.suffix.lower()
    if not inp.is_dir() and is_compressed_tar(inp.name):
        return [refused(input_address(inp), COMPRESSED, "webdataset")]
    if suffix in listers and not inp.is_dir():
        full = as_path(input_address(inp))
        place = Place(tuple(full.parent.parts[-4:]), full.parent.name, source_folder(full))
        return listers[suffix](inp, place, opts, found)
    files = [f for f, _ in location(inp).walk_files(inp)]
    tars = {(str(f.parent), f.stem) for f in files if f.suffix.lower() == ".tar"}
    root_name = inp.resolve().name
    strays = stray_folders(files)
    out: list[Candidate] = []
    for f in files:
        rel = tuple(f.relative_to(inp).parts[:-1])
        lister = listers.get(f.suffix.lower())
        if str(f.parent) in strays and archive_refusal(f.name):
            out.append(refused(input_address(f), STRAY_ARCHIVE, "files"))
        elif is_compressed_tar(f.name):
            out.append(refused(input_address(f), COMPRESSED, "webdataset"))
        elif lister is not None:
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
