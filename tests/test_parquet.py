"""Hugging Face parquet datasets as shard inputs: OpenFake's and Community Forensics' layouts with no
options, rows read in place (each row group once), bad rows and files as rejects, a changed file
refused at extract, appends and mixed runs, and a kill -9 during shard and extract."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import (
    ROOT,
    _write_parquet,
    cli,
    image_bytes,
    make_community_forensics,
    make_dataset,
    make_openfake,
)

from stages.evaluate import run_eval
from stages.extract import ExtractOptions, run_extract
from stages.shard import run_shard
from stages.train import TrainOptions, run_train
from stages.verify import run_verify
from storage.caches import find_cache
from storage.parquet_images import ParquetSource, RowGroupReader, read_index, read_units
from storage.run import Run

EXTRACT = ["extract", "--size", 32, "--batch-size", 4, "--device", "cpu"]


def extract(run: Path, model: Path, workers: int = 0) -> dict:
    return run_extract(run, ExtractOptions(model=model, size=32, batch_size=4, workers=workers, device="cpu"))


def train_and_eval(run: Path, **kw) -> dict:
    run_train(run, TrainOptions(epochs=1, batch_size=8, workers=0, device="cpu", **kw))
    run_eval(run, run / "train/default/best.pt", workers=0, device="cpu")
    return json.loads((run / "eval/default-test/report.json").read_text())


def rows_of(root: Path) -> list[tuple[str, int, dict]]:
    """Every row of every parquet file below root, read independently with pyarrow."""
    out = []
    for f in sorted(root.rglob("*.parquet")):
        for r, row in enumerate(pq.read_table(f).to_pylist()):
            out.append((str(f), r, row))
    return out


def files_outside(run: Path, before: set[str], roots: list[Path]) -> set[str]:
    return {str(p) for root in roots for p in root.rglob("*")} - before


@pytest.mark.slow  # about 23 s: in make test-long; make test keeps Community Forensics' and the hub layouts
def test_openfake_layout_with_no_options(tmp_path, tiny_model):
    data = make_openfake(tmp_path / "OpenFake")
    before = {str(p) for p in data.rglob("*")}
    dry = cli("shard", data, "--run", tmp_path / "run", "--dry-run").stdout
    assert "parquet split train (from README.md configs): 2 files, 60 rows" in dry
    assert "image=image.bytes label=label source=model" in dry
    run = tmp_path / "run"
    cli("shard", data, "--run", run, "--shard-size", 16)
    entries = Run(run).entries()
    want = rows_of(data)
    assert len(entries) == len(want) == 120
    by_path = {e.path: e for e in entries}
    for f, r, row in want:  # every row: its key, label, source and split, checked independently
        e = by_path[f"{f}#{r}"]
        assert e.key == hashlib.sha256(row["image"]["bytes"]).hexdigest()
        assert e.label == (row["label"] == "fake") and e.source == row["model"]
        assert e.split == ("train" if "/train-" in f else "test")
    # the files' own order: files by name, rows in order
    assert [e.path for e in entries] == [f"{f}#{r}" for f, r, _ in want]
    extract(run, tiny_model, workers=2)
    assert run_verify(run)["ok"]
    report = train_and_eval(run, val_from="train:0.3")
    assert report["overall"]["n"] == 60 and set(report["sources"]) >= {"sdxl", "flux.1-dev", "midjourney-6"}
    assert (run / "eval/default-test/gallery.png").exists()
    assert files_outside(run, before, [data]) == set()  # nothing unpacked beside the dataset


def test_community_forensics_layout_with_no_options(tmp_path, tiny_model):
    data = make_community_forensics(tmp_path / "cf")
    dry = cli("shard", data, "--run", tmp_path / "run", "--dry-run").stdout
    assert "image=image_data label=label (ClassLabel real/fake) source=model_name" in dry
    for split in ("Systematic", "Manual", "PublicEval"):
        assert f"parquet split {split} (from README.md configs): 2 files, 40 rows" in dry
    run = tmp_path / "run"
    run_shard([data], run, shard_size=16, workers=2)
    entries = Run(run).entries()
    assert Counter(e.split for e in entries) == {"Systematic": 40, "Manual": 40, "PublicEval": 40}
    for f, r, row in rows_of(data):
        e = next(x for x in entries if x.path == f"{f}#{r}")
        assert e.key == hashlib.sha256(row["image_data"]).hexdigest()
        assert e.label == row["label"] and e.source == row["model_name"]
        assert e.format == row["format"].upper()  # the header facts, for the audit
    # to train on Systematic and test on PublicEval, as its authors do: name the splits' roles
    run = tmp_path / "mapped"
    cli("shard", data, "--run", run, "--shard-size", 16, "--split-map", "Systematic=train",
        "--split-map", "Manual=val", "--split-map", "PublicEval=test")
    extract(run, tiny_model)
    assert train_and_eval(run)["overall"]["n"] == 40


def test_features_equal_those_of_the_same_images_as_files(tmp_path, tiny_model):
    """Read in place with 0 or 2 loader workers: the same stored bytes; read from files (other
    batches, as files are sharded by key): within one uint8 step, as batch sums may round apart."""
    data = make_openfake(tmp_path / "of", rows=40, files=1, row_group_size=3)
    folder = tmp_path / "files"
    for f, r, row in rows_of(data):
        label = "1_fake" if row["label"] == "fake" else "0_real"
        (folder / "train/x" / label).mkdir(parents=True, exist_ok=True)
        (folder / "train/x" / label / f"{Path(f).stem}-{r}.img").write_bytes(row["image"]["bytes"])
    features = {}
    for name, inp, workers in (("pq0", data, 0), ("pq2", data, 2), ("files", folder, 0)):
        run = tmp_path / name
        run_shard([inp], run, shard_size=8)
        extract(run, tiny_model, workers)
        cache = find_cache(run / "cache")
        labels, _, _, keys = cache.index_arrays()
        arrays = cache.read_rows(0, len(keys))[0]
        features[name] = {str(k): arrays[i] for i, k in enumerate(keys) if labels[i] >= 0}
    assert len(features["files"]) == 40 and sorted(features["pq0"]) == sorted(features["files"])
    for k, want in features["files"].items():
        assert np.array_equal(features["pq0"][k], features["pq2"][k])
        assert np.abs(features["pq0"][k].astype(int) - want).max() <= 1


def test_each_row_group_is_read_once(tmp_path):
    """The units of a shard cover each of its row groups once; over all shards a row group is read
    once, plus once more where a shard boundary cuts it."""
    data = make_openfake(tmp_path / "of", rows=200, files=2, row_group_size=7)
    run = tmp_path / "run"
    run_shard([data], run, shard_size=32)
    sources = read_index(run)
    reads = Counter()
    info = Run(run).info()
    for s in range(info.num_shards):
        paths = [e.path for e in Run(run).shard_entries(s)]
        units = read_units(paths, sources, batch_size=8)
        assert sorted(i for u in units for i in u) == list(range(len(paths)))
        groups = [{(p.split("#")[0], sources[p.split("#")[0]].row_group_of(int(p.split("#")[1]))[0])
                   for p in (paths[i] for i in u)} for u in units]
        for g in groups:
            reads.update(g)
        flat = [g for gs in groups for g in gs]
        assert len(flat) == len(set(flat))  # no row group in two units of one shard
    total_groups = sum(len(s.row_groups) for s in sources.values())
    assert len(reads) == total_groups
    assert sum(reads.values()) <= total_groups + info.num_shards - 1
    # and the reader reads a row group's column once for consecutive rows
    reader = RowGroupReader(sources)
    entries = Run(run).shard_entries(0)
    for e in entries:
        assert hashlib.sha256(reader.read(e.path)).hexdigest() == e.key
    col = sum(len(r["image"]["bytes"]) for f, i, r in rows_of(data)
              if f"{f}#{i}" in {e.path for e in entries})
    assert col <= reader.bytes_read < col + 8 * max(len(r["image"]["bytes"]) for *_, r in rows_of(data))


def test_bad_rows_and_files_become_rejects(tmp_path, tiny_model):
    root = tmp_path / "ds"
    good = [image_bytes(i, (30, 30)) for i in range(6)]
    png = image_bytes(99, (30, 30))
    cells = good + [b"not an image", png[: len(png) // 2], b"", None]
    _write_parquet(root / "data/train-00000-of-00002.parquet",
                   {"image": [{"bytes": b, "path": None} for b in cells],
                    "label": ["real", "fake"] * 5, "model": ["m"] * 10}, 4)
    _write_parquet(root / "data/train-00001-of-00002.parquet",
                   {"image": [{"bytes": image_bytes(50 + i), "path": None} for i in range(3)],
                    "label": ["maybe", "real", "fake"], "model": ["m"] * 3}, 4)
    _write_parquet(root / "data/test-00000-of-00001.parquet", {"other": [1, 2]}, 4)  # no image column
    (root / "data/train-00002-of-00002.parquet").write_bytes(b"PAR1 truncated")
    run = tmp_path / "run"
    summary = run_shard([root], run, shard_size=4)
    rejects = {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in Run(run).rejects()}
    f0 = "train-00000-of-00002.parquet"
    assert rejects[f"{f0}#6"].startswith("not an image")
    assert rejects[f"{f0}#7"].startswith("truncated or corrupt")
    assert rejects[f"{f0}#8"].startswith("empty image bytes") and rejects[f"{f0}#9"].startswith("empty")
    assert "'maybe' is neither real nor fake" in rejects["train-00001-of-00002.parquet#0"]
    assert "no image column" in rejects["test-00000-of-00001.parquet"]
    assert "not a parquet file" in rejects["train-00002-of-00002.parquet"]
    assert summary["images"] == 8
    # a file rewritten after shard is refused at extract, naming it
    f1 = root / "data/train-00001-of-00002.parquet"
    table = pq.read_table(f1)
    pq.write_table(table.slice(1), f1)
    out = cli(*EXTRACT, "--model", tiny_model, "--run", run, "--workers", 0, check=False)
    assert out.returncode != 0 and f"{f1}: changed since `shard`" in out.stderr
    assert "Traceback" not in out.stderr


def test_append_parquet_to_a_folder_run_and_options(tmp_path, tiny_model):
    folder = make_dataset(tmp_path / "files", per_class=3, splits=("train", "test"))
    run = tmp_path / "run"
    run_shard([folder], run, shard_size=4)
    n_before = Run(run).info().images
    extract(run, tiny_model)
    # a generator whose parquet names its labels otherwise, and columns named otherwise
    _write_parquet(tmp_path / "newgen/shard.parquet",
                   {"picture": [image_bytes(300 + i, smooth=True) for i in range(6)],
                    "kind": ["synthetic", "authentic"] * 3, "gen": ["newgen"] * 6, "part": ["test"] * 6}, 2)
    out = run_shard([tmp_path / "newgen/shard.parquet"], run, shard_size=4, append=True)
    assert out["appended_now"] == 0 and Run(run).info().images == n_before  # labels not understood
    assert all("name it with --label-column" in r["reason"] for r in Run(run).rejects()[-6:])
    out = run_shard([tmp_path / "newgen/shard.parquet"], run, shard_size=4, append=True,
                    columns=_columns(label="kind"))
    assert out["appended_now"] == 0
    assert all("'synthetic' is neither real nor fake" in r["reason"] for r in Run(run).rejects()[-6::2])
    out = run_shard([tmp_path / "newgen/shard.parquet"], run, shard_size=4, append=True,
                    columns=_columns(image="picture", label="kind", source="gen", split="part",
                                     real_values=("authentic",), fake_values=("synthetic",)))
    assert out["appended_now"] == 6
    new = Run(run).entries()[n_before:]
    assert {(e.source, e.split) for e in new} == {("newgen", "test")}
    assert [e.label for e in new] == [1, 0] * 3
    res = extract(run, tiny_model)
    assert res["images"] == 6 and run_verify(run)["ok"]


def _columns(**kw):
    from stages.domain.parquet_layouts import ColumnOptions

    return ColumnOptions(**kw)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 60) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    proc.wait()
    return False


def test_kill_9_during_shard_and_extract_resumes_to_the_same_bytes(tmp_path, tiny_model):
    data = make_openfake(tmp_path / "of", rows=160, files=2, row_group_size=4)
    clean = tmp_path / "clean"
    run_shard([data], clean, shard_size=8)
    extract(clean, tiny_model)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "shard", str(data), "--run", str(run),
                             "--shard-size", "8", "--workers", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = _kill_when(proc, lambda: sum(1 for _ in (run / ".shard-progress").rglob("*.jsonl")) >= 5)
    cli("shard", data, "--run", run, "--shard-size", 8)
    for f in ["run.json", "rejects.jsonl", "duplicates.jsonl", "parquet.json",
              *(f"shards/{p.name}" for p in (clean / "shards").iterdir())]:
        assert (clean / f).read_bytes() == (run / f).read_bytes(), f
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *map(str, EXTRACT), "--model",
                             str(tiny_model), "--run", str(run), "--workers", "0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_extract = _kill_when(proc, lambda: len(list(run.glob("cache/*/done/*"))) >= 3)
    cli(*EXTRACT, "--model", tiny_model, "--run", run, "--workers", 0)
    a, b = find_cache(clean / "cache"), find_cache(run / "cache")
    for s in range(Run(run).info().num_shards):
        assert a.done_marker(s).checksum == b.done_marker(s).checksum
    assert np.array_equal(a.read_rows(0, 160)[0], b.read_rows(0, 160)[0])
    assert killed or killed_extract, "no kill landed"


def test_parquet_source_maps_rows_to_row_groups():
    src = ParquetSource("f.parquet", 1, "x", (3, 0, 2), "image")
    assert [src.row_group_of(r) for r in range(5)] == [(0, 0), (0, 0), (0, 0), (2, 3), (2, 3)]
    with pytest.raises(ValueError, match="has 5 rows"):
        src.row_group_of(5)
    assert pa is not None


def test_dataset_id_from_the_local_hub_cache(tmp_path, monkeypatch):
    """`shard ORG/NAME` reads a dataset snapshot from the local Hugging Face cache, offline, through
    its links to the blobs, and says how to fetch one that is missing."""
    hub = tmp_path / "hub"
    repo = hub / "datasets--org--tiny-openfake"
    source = make_openfake(tmp_path / "src", rows=8, files=1)
    snap = repo / "snapshots" / "0123abcd"
    for p in sorted(source.rglob("*")):
        if p.is_file():
            blob = repo / "blobs" / hashlib.sha256(p.read_bytes()).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(p.read_bytes())
            link = snap / p.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    cli("shard", "org/tiny-openfake", "--run", tmp_path / "run", "--shard-size", 4, env=env)
    entries = Run(tmp_path / "run").entries()
    assert len(entries) == 8 and {e.split for e in entries} == {"train", "test"}
    assert entries[0].path.startswith(str(snap / "data"))
    out = cli("shard", "org/missing", "--run", tmp_path / "run2", env=env, check=False)
    assert out.returncode != 0 and "--download" in out.stderr and "Traceback" not in out.stderr
