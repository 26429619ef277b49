"""Input sources behind one interface (stages/domain/sources): the registry recognises each input
kind, every source reads an entry (alone and in a batch) as the bytes written, old manifests (no
kind) read unchanged, and a new source is one class plus one registry line."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import image_bytes, make_dataset, write

import stages.domain.sources as sources
from stages.domain.sources import (
    Address,
    Candidate,
    Collected,
    EntryReader,
    InputSource,
    ReadContext,
    ReadError,
    RunReader,
    SourceOptions,
    kind_of,
    recognise,
)
from stages.domain.sources.packed import open_pack
from stages.shard import run_shard
from storage.run import Entry, Run


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_parquet(path: Path, images: list[bytes], labels: list[str], row_group_size: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "label": labels}), path,
                   row_group_size=row_group_size)


def test_the_registry_gives_each_input_to_its_source(tmp_path):
    folder = make_dataset(tmp_path / "folder", per_class=1, splits=("train",))
    csv_list = write(tmp_path / "list.csv", b"path,label\nfolder/train/progan/0_real/img_000.jpg,real\n")
    jsonl = write(tmp_path / "list.jsonl", b'{"path": "x.png", "label": "fake"}\n')
    single = write(tmp_path / "one.png", image_bytes(1))
    write_parquet(tmp_path / "one.parquet", [image_bytes(2)], ["real"])
    write_parquet(tmp_path / "hf" / "train" / "0000.parquet", [image_bytes(3)], ["fake"])
    csv_folder = make_dataset(tmp_path / "named.csv", per_class=1, splits=("train",))  # a folder, not a list
    got = {name: recognise(p).kind for name, p in [
        ("folder", folder), ("csv", csv_list), ("jsonl", jsonl), ("single", single),
        ("parquet file", tmp_path / "one.parquet"), ("parquet dataset", tmp_path / "hf"),
        ("folder named .csv", csv_folder)]}
    assert got == {"folder": "files", "csv": "list", "jsonl": "list", "single": "files",
                   "parquet file": "parquet", "parquet dataset": "parquet", "folder named .csv": "files"}
    assert [s.kind for s in sources.SOURCES][-1] == "files"  # the catch-all is asked last
    assert sources.source("parquet").kind == "parquet"
    with pytest.raises(KeyError, match="no input source of kind 'nope'"):
        sources.source("nope")


def test_an_old_manifest_without_kinds_reads_and_writes_unchanged(tmp_path):
    """Rows written before kinds were recorded: the kind is inferred from the address, and a row
    read and written again is the same JSON (so the manifest's fingerprint, which caches record,
    does not move); a new shard of files and parquet rows writes no kind either."""
    file_row = {"key": "a" * 64, "path": "/data/x.png", "label": 0, "source": "s", "split": "train",
                "size": 10, "format": "PNG", "width": 4, "height": 4, "mode": "RGB", "exif": False,
                "quality": None, "subsampling": None}
    parquet_row = {**file_row, "path": "/data/t.parquet#12"}
    for row, kind in ((file_row, "files"), (parquet_row, "parquet")):
        e = Entry(**row)
        assert kind_of(e) == kind and e.to_json() == row
    assert Entry(**{**file_row, "kind": "zip", "offset": 5}).to_json() == {**file_row, "kind": "zip",
                                                                            "offset": 5}
    data = make_dataset(tmp_path / "data", per_class=1, splits=("train",))
    write_parquet(data / "rows.parquet", [image_bytes(40)], ["fake"])
    run_shard([data / "train", data / "rows.parquet"], tmp_path / "run", workers=1)
    rows = [json.loads(line) for f in sorted((tmp_path / "run" / "shards").glob("*.jsonl"))
            for line in f.read_text().splitlines()]
    assert len(rows) == 3 and all("kind" not in r and "offset" not in r for r in rows)


def test_each_source_reads_an_entry_alone_and_in_a_batch_as_the_bytes_written(tmp_path):
    """Files, list files, parquet rows and the run's packed tars: RunReader.read and read_many give
    the very bytes the test wrote (compared with the test's own copies, not through the project)."""
    written: dict[str, bytes] = {}
    for i, label in enumerate(["0_real", "1_fake", "0_real"]):
        written[str(write(tmp_path / "data" / "set" / label / f"{i}.png", image_bytes(10 + i)))] = \
            image_bytes(10 + i)
    listed = image_bytes(20)
    written[str(write(tmp_path / "listed" / "a.png", listed))] = listed
    write(tmp_path / "listed" / "list.csv", b"path,label,source\na.png,fake,listed\n")
    cells = [image_bytes(30 + i) for i in range(5)]
    write_parquet(tmp_path / "pq" / "rows.parquet", cells, ["real", "fake"] * 2 + ["real"])
    for row, cell in enumerate(cells):
        written[f"{tmp_path / 'pq' / 'rows.parquet'}#{row}"] = cell
    run_shard([tmp_path / "data", tmp_path / "listed" / "list.csv", tmp_path / "pq" / "rows.parquet"],
              tmp_path / "run", workers=1)
    run = Run(tmp_path / "run")
    entries = run.entries()
    assert sorted(e.path for e in entries) == sorted(written)
    reader = RunReader(ReadContext(run.root, tuple(run.info().roots)))
    assert [reader.read(e) for e in entries] == [written[e.path] for e in entries]
    assert reader.read_many(entries) == [written[e.path] for e in entries]
    assert reader.units(entries, 4) is not None  # parquet rows: cut by row group
    copy = pickle.loads(pickle.dumps(reader))  # as DataLoader workers get it
    assert copy.read_many(entries[::-1]) == [written[e.path] for e in entries[::-1]]
    # the packed tars of a run of files
    run_shard([tmp_path / "data"], tmp_path / "packed_run", workers=1, pack=True)
    packed = Run(tmp_path / "packed_run")
    files = packed.shard_entries(0)
    pack = open_pack(packed.root, 0, files)
    assert pack is not None
    reader = RunReader(ReadContext(packed.root), pack=pack)
    assert all(reader.reader(e) is pack for e in files)
    assert reader.read_many(files) == [written[e.path] for e in files]


def test_reads_refuse_changed_and_outside_bytes_with_the_reason(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=1, splits=("train",))
    run_shard([data], tmp_path / "run", workers=1)
    run = Run(tmp_path / "run")
    first, second = run.entries()
    Path(first.path).write_bytes(image_bytes(99))  # changed since shard
    reader = RunReader(ReadContext(run.root, tuple(run.info().roots)))
    with pytest.raises(ReadError, match="changed since `shard`"):
        reader.read(first)
    outside = Entry(**{**second.to_json(), "path": str(tmp_path / "elsewhere.png")})
    got = reader.read_many([first, outside, second])
    assert isinstance(got[0], ReadError) and "outside the run's input folders" in str(got[1])
    assert sha(got[2]) == second.key


def test_label_and_source_fields_are_recorded_only_when_given_and_folders_ignore_them(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=1, splits=("train",))
    run_shard([data], tmp_path / "plain", workers=1)
    run_shard([data], tmp_path / "fields", workers=1, label_field="is_fake", source_field="model")
    plain, fields = Run(tmp_path / "plain"), Run(tmp_path / "fields")
    assert "label_field" not in plain.info().options
    assert fields.info().options["label_field"] == "is_fake"
    assert fields.info().options["source_field"] == "model"
    assert fields.entries() == plain.entries()


class HexLines(InputSource):
    """A seventh source, as docs/extending.md shows one: a `.hexlines` file, one image per line
    (`label hex-bytes`); the address is `file.hexlines#line`."""

    kind = "hexlines"

    def recognises(self, inp) -> bool:
        return inp.suffix == ".hexlines"

    def candidates(self, inp, opts: SourceOptions, found: Collected) -> list[Candidate]:
        lines = Path(inp).read_text().splitlines()
        return [Candidate(f"{Path(inp).resolve()}#{n}", 1 if line.split()[0] == "fake" else 0, "hex", None,
                          kind=self.kind) for n, line in enumerate(lines)]

    def reader(self, ctx: ReadContext) -> EntryReader:
        return HexReader()


class HexReader(EntryReader):
    def read(self, address: Address) -> bytes:
        file, _, line = address.path.rpartition("#")
        try:
            return bytes.fromhex(Path(file).read_text().splitlines()[int(line)].split()[1])
        except (OSError, IndexError) as e:
            raise ReadError(f"unreadable: {e}") from e


def test_a_seventh_source_is_one_class_and_one_registry_line(tmp_path, monkeypatch):
    from stages.extract import ShardImages

    monkeypatch.setattr(sources, "SOURCES", (HexLines(), *sources.SOURCES))
    images = [image_bytes(50 + i) for i in range(4)]
    hexfile = write(tmp_path / "in" / "set.hexlines", "\n".join(
        f"{'fake' if i % 2 else 'real'} {b.hex()}" for i, b in enumerate(images)).encode())
    run_shard([hexfile], tmp_path / "run", workers=1)
    run = Run(tmp_path / "run")
    entries = run.entries()
    assert sorted(e.key for e in entries) == sorted(sha(b) for b in images)
    assert {e.kind for e in entries} == {"hexlines"}  # its address alone would read as a file's
    row = json.loads((run.shards_dir / "00000.jsonl").read_text().splitlines()[0])
    assert row["kind"] == "hexlines"
    by_key = {sha(b): b for b in images}
    assert RunReader(ReadContext(run.root)).read_many(entries) == [by_key[e.key] for e in entries]
    decoded = ShardImages(entries, 32, 10**8, roots=list(run.info().roots))
    assert all(decoded[i][2] is None and tuple(decoded[i][1].shape) == (3, 32, 32) for i in range(4))


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    import io
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("with_tar", [False, True])
def test_a_symlinked_folder_in_an_input_folder_is_a_reject_whichever_source_lists_it(tmp_path, with_tar):
    """A symlink to a folder inside an input folder is reported ("is a folder") both when the
    files source lists the folder and when an archive source does (a folder holding a tar): one
    walk lists a folder for every source (it was silently skipped beside a tar)."""
    data = tmp_path / "data"
    write(data / "real" / "a.png", image_bytes(1))
    write(tmp_path / "elsewhere" / "b.png", image_bytes(2))
    (data / "real" / "linked").symlink_to(tmp_path / "elsewhere")
    if with_tar:
        _tar(data / "00000.tar", {"k1.png": image_bytes(3), "k1.json": b'{"label": 1}'})
    run_shard([data], tmp_path / "run", workers=1, label_field="label" if with_tar else None)
    rejects = {Path(r["path"]).name: r["reason"] for r in Run(tmp_path / "run").rejects()}
    assert rejects == {"linked": "is a folder, not an image file"}


def test_a_forced_label_overrides_a_label_refusal_but_no_other(tmp_path):
    """`--label fake` takes an image whose metadata's --label-field value is no label (the value
    is not needed); a refusal that is not about the label (a list row outside its folder) stays."""
    from stages.shard import collect

    tar = _tar(tmp_path / "wds" / "00000.tar", {"k1.png": image_bytes(1), "k1.json": b'{"label": "maybe"}'})
    opts = SourceOptions(label_field="label")
    (plain,) = collect([tar], options=opts)
    assert plain.reason is not None and "neither real nor fake" in plain.reason
    (forced,) = collect([tar], label="fake", options=opts)
    assert forced.reason is None and forced.label == 1
    write(tmp_path / "outside.png", image_bytes(2))
    listed = write(tmp_path / "lists" / "l.csv", b"path,label\n../outside.png,real\n")
    (row,) = collect([listed], label="fake")
    assert row.reason is not None and row.reason.startswith("outside the list file's folder")
