"""WebDataset tars (img2dataset's layout, written by `webdataset.TarWriter`) and zips (DiffusionDB's
layout, written by `zipfile`) read in place: sharded with no option beyond the label field (or the
folder layout), extracted, trained on and evaluated, locally and on the loopback S3 server, with
the features of the same images sharded and extracted as loose files; bad members and damaged
archives as rejects naming them; a shard and an extract killed part-way resume to the same bytes."""

from __future__ import annotations

import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest
from archive_data import sample_images, write_diffusiondb_zip, write_img2dataset_tar
from conftest import cli, write
from test_crash_points import run_killed_at, tree
from test_object_storage import bucket, in_process, s3, upload  # noqa: F401 (fixtures)

from stages.extract import ExtractOptions, run_extract
from stages.shard import run_shard
from storage.caches import find_cache
from storage.locations import as_path
from storage.run import Run

SPLITS = ("train", "val", "test")
PER_SPLIT = 4  # 2 real, 2 fake
EXTRACT = dict(size=32, batch_size=4, workers=0, device="cpu")


def split_images() -> dict[str, list[tuple[str, bytes, int]]]:
    images = sample_images(PER_SPLIT * len(SPLITS))
    return {s: images[k * PER_SPLIT:(k + 1) * PER_SPLIT] for k, s in enumerate(SPLITS)}


def make_inputs(root: Path) -> dict[str, Path]:
    """The same images three ways: loose files `files/<split>/{0_real,1_fake}/`, img2dataset tars
    `wds/<split>/NNNNN.tar` (labels in each sample's JSON `label`), DiffusionDB zips
    `zips/<split>/{0_real,1_fake}/part-NNNNNN.zip` (labels from the folders)."""
    for k, (split, images) in enumerate(split_images().items()):
        write_img2dataset_tar(root / "wds" / split, k, images)
        for label in (0, 1):
            mine = [im for im in images if im[2] == label]
            folder = ("0_real", "1_fake")[label]
            write_diffusiondb_zip(root / "zips" / split / folder, 2 * k + label, mine)
            for i, (ext, data, _) in enumerate(mine):
                write(root / "files" / split / folder / f"{i}.{ext}", data)
    return {name: root / name for name in ("files", "wds", "zips")}


def features(run: str | Path, feature_id: str) -> dict[str, bytes]:
    """key -> the cached feature's bytes."""
    cache = find_cache(as_path(str(run)) / "cache", feature_id)
    _, labels, _, keys = cache.index_arrays()
    rows = cache.read_rows(0, len(keys))[0]
    return {str(k): rows[i].tobytes() for i, k in enumerate(keys)}


def manifest(run: str | Path) -> list[dict]:
    return [e.to_json() for e in Run(as_path(str(run))).entries()]


@pytest.fixture(scope="module")
def reference(module_tmp, tiny_model):
    """The loose files, sharded and extracted: the features every archive run must give."""
    root = module_tmp("archives")
    inputs = make_inputs(root / "data")
    run = root / "files-run"
    run_shard([inputs["files"]], run, shard_size=4)
    out = run_extract(run, ExtractOptions(model=tiny_model, **EXTRACT))
    return inputs, {(e["key"], e["label"], e["split"]) for e in manifest(run)}, \
        features(run, out["feature_id"])


def check_run(run: str | Path, reference, tiny_model, kind: str) -> str:
    """Extract the sharded `run`; its manifest and features must be the loose files'."""
    _, entries, feats = reference
    rows = manifest(run)
    assert {(e["key"], e["label"], e["split"]) for e in rows} == entries
    suffix = {"webdataset": ".tar#", "zip": ".zip#"}[kind]
    assert all(e["kind"] == kind and suffix in e["path"] and e["offset"] is not None for e in rows)
    out = run_extract(run, ExtractOptions(model=tiny_model, **EXTRACT))
    assert out["rejected"] == 0 and out["images"] == len(entries), out
    assert features(run, out["feature_id"]) == feats
    return out["feature_id"]


def train_and_eval(run: str | Path) -> dict:
    cli("train", "--run", run, "--epochs", 1, "--batch-size", 4, "--workers", 0, "--device", "cpu",
        "--head", "linear")
    cli("eval", "--run", run, "--checkpoint", f"{run}/train/default/best.pt", "--workers", 0,
        "--device", "cpu", "--bootstrap", 20)
    return json.loads(as_path(f"{run}/eval/default-test/report.json").read_text())


def test_webdataset_tars_and_zips_give_the_features_of_the_same_files(reference, tiny_model, tmp_path):
    inputs, entries, _ = reference
    summary = run_shard([inputs["wds"]], tmp_path / "wds-run", shard_size=4, label_field="label")
    assert summary["rejects"] == 0 and summary["images"] == len(entries), summary
    check_run(tmp_path / "wds-run", reference, tiny_model, "webdataset")
    assert Run(tmp_path / "wds-run").rejects() == []  # img2dataset's .parquet and _stats.json: metadata
    assert {e["source"] for e in manifest(tmp_path / "wds-run")} == {"wds"}
    run_shard([inputs["zips"]], tmp_path / "zip-run", shard_size=4)
    check_run(tmp_path / "zip-run", reference, tiny_model, "zip")
    report = train_and_eval(tmp_path / "zip-run")
    assert report["overall"]["n"] == PER_SPLIT


def test_archives_on_s3_read_in_place_as_locally(reference, tiny_model, in_process, s3, bucket):  # noqa: F811
    inputs, entries, _ = reference
    bucket_url = in_process
    upload(s3, bucket, inputs["wds"], "wds")
    upload(s3, bucket, inputs["zips"], "zips")
    run = f"{bucket_url}/runs/wds"
    run_shard([f"{bucket_url}/wds"], run, shard_size=4, label_field="label")
    check_run(run, reference, tiny_model, "webdataset")
    report = train_and_eval(run)
    assert report["overall"]["n"] == PER_SPLIT
    run = f"{bucket_url}/runs/zips"
    run_shard([f"{bucket_url}/zips"], run, shard_size=4)
    check_run(run, reference, tiny_model, "zip")
    assert all(e["path"].startswith(f"{bucket_url}/zips/") for e in manifest(run))


def test_labels_sources_and_splits_from_metadata_cls_and_folders(tmp_path):
    images = sample_images(4)
    write_img2dataset_tar(tmp_path / "cls", 0, images, cls=True)  # .cls 0/1, named by --label-field cls
    write_img2dataset_tar(tmp_path / "gen/test", 1, images)  # --source-field generator
    write_diffusiondb_zip(tmp_path / "ddb", 1, images, label_field=True)
    summary = run_shard([tmp_path / "cls"], tmp_path / "r1", shard_size=8, label_field="cls")
    assert sorted((e["label"], e["source"], e["split"]) for e in manifest(tmp_path / "r1")) == \
        [(0, "cls", "train"), (0, "cls", "train"), (1, "cls", "train"), (1, "cls", "train")], summary
    run_shard([tmp_path / "gen"], tmp_path / "r2", shard_size=8, label_field="label",
              source_field="generator")
    assert sorted((e["label"], e["source"], e["split"]) for e in manifest(tmp_path / "r2")) == \
        [(0, "laion", "test"), (0, "laion", "test"), (1, "flux", "test"), (1, "sdxl", "test")]
    run_shard([tmp_path / "ddb"], tmp_path / "r3", shard_size=8, label_field="label")
    assert sorted((e["label"], e["source"]) for e in manifest(tmp_path / "r3")) == \
        [(0, "ddb"), (0, "ddb"), (1, "ddb"), (1, "ddb")]
    run_shard([tmp_path / "ddb"], tmp_path / "r4", shard_size=8, label="fake")  # DiffusionDB: all generated
    assert [e["label"] for e in manifest(tmp_path / "r4")] == [1] * 4
    # folders inside a zip count after those above it, as if it were unpacked where it is
    with zipfile.ZipFile(write(tmp_path / "dl/GenImage/data.zip", b""), "w") as zf:
        for i, (ext, data, label) in enumerate(images):
            zf.writestr(f"{SPLITS[i % 2]}/{('0_real', '1_fake')[label]}/{i}.{ext}", data)
    run_shard([tmp_path / "dl"], tmp_path / "r5", shard_size=8)
    assert sorted((e["path"].rsplit("#", 1)[1], e["label"], e["source"], e["split"])
                  for e in manifest(tmp_path / "r5")) == [
        ("train/0_real/0.jpg", 0, "GenImage", "train"), ("train/0_real/2.webp", 0, "GenImage", "train"),
        ("val/1_fake/1.png", 1, "GenImage", "val"), ("val/1_fake/3.jpg", 1, "GenImage", "val")]


def test_a_cls_of_class_indices_is_no_label_and_other_limits_are_applied(tmp_path):
    import webdataset as wds

    images = sample_images(3)
    folder = tmp_path / "imagenet/1_fake"  # the folder's label, not the class indices 0, 1, 7
    folder.mkdir(parents=True)
    with wds.TarWriter(str(folder / "00000.tar")) as sink:
        for i, cls in enumerate((0, 1, 7)):
            sink.write({"__key__": f"k{i}", images[i][0]: images[i][1], "cls": cls})
    run_shard([tmp_path / "imagenet"], tmp_path / "r1", shard_size=8)
    assert [e["label"] for e in manifest(tmp_path / "r1")] == [1, 1, 1]
    # the listing pass probes under the default limits; a smaller one is applied as to files
    run_shard([tmp_path / "imagenet"], tmp_path / "r2", shard_size=8, max_pixels=40 * 36)
    reasons = sorted(r["reason"] for r in Run(tmp_path / "r2").rejects())
    widths = sorted(int(r.split("too large: ")[1].split("x")[0]) for r in reasons)
    assert widths == [41, 42] and all(r.endswith("pixels > --max-pixels 1440") for r in reasons)


def test_bad_members_and_damaged_archives_are_rejects_naming_them(tmp_path):
    import webdataset as wds

    good = sample_images(3)
    folder = tmp_path / "wds"
    folder.mkdir()
    with wds.TarWriter(str(folder / "00000.tar")) as sink:
        sink.write({"__key__": "a", "jpg": good[0][1], "json": {"label": "real"}})
        sink.write({"__key__": "b", "png": b"not an image", "json": {"label": "fake"}})
        sink.write({"__key__": "c", "png": good[1][1][:60], "json": {"label": "fake"}})  # truncated
        sink.write({"__key__": "d", "webp": good[2][1], "json": {"label": "cat"}})
        sink.write({"__key__": "e", "jpg": good[0][1] + b"x", "json": {}})  # no label anywhere
    raw = (folder / "00000.tar").read_bytes()
    with tarfile.open(folder / "00000.tar") as t:
        cut = t.getmember("d.webp").offset_data + 10
    (folder / "00001.tar").write_bytes(raw[:cut])  # a copy truncated inside d.webp
    (folder / "00002.tar").write_bytes(b"garbage" * 100)
    run_shard([folder], tmp_path / "run", shard_size=8, label_field="label", max_bytes=10_000)
    rejects = {r["path"].removeprefix(f"{folder}/"): r["reason"] for r in Run(tmp_path / "run").rejects()}
    assert "not an image" in rejects.pop("00000.tar#b.png")
    assert "truncated" in rejects.pop("00000.tar#c.png")
    assert "'cat'" in rejects.pop("00000.tar#d.webp")
    assert "no label" in rejects.pop("00000.tar#e.jpg")
    assert "truncated" in rejects.pop("00001.tar")
    assert "not a readable tar" in rejects.pop("00002.tar")
    # the truncated copy's members before the damage are read: a duplicate of a, b and c bad again
    assert "not an image" in rejects.pop("00001.tar#b.png")
    assert "truncated" in rejects.pop("00001.tar#c.png")
    assert rejects == {}
    assert [e["path"].rsplit("/", 1)[1] for e in manifest(tmp_path / "run")] == ["00000.tar#a.jpg"]
    dup = json.loads((tmp_path / "run/duplicates.jsonl").read_text().splitlines()[0])
    assert dup["path"].endswith("00001.tar#a.jpg")


def test_members_changed_after_shard_are_extract_rejects_naming_them(tmp_path, tiny_model):
    folder = tmp_path / "wds"
    images = sample_images(4)
    tar = write_img2dataset_tar(folder, 0, images)
    run_shard([folder], tmp_path / "run", shard_size=8, label_field="label")
    member = manifest(tmp_path / "run")[0]
    raw = bytearray(tar.read_bytes())
    raw[member["offset"] + 20] ^= 0xFF
    tar.write_bytes(bytes(raw))
    out = run_extract(tmp_path / "run", ExtractOptions(model=tiny_model, **EXTRACT))
    assert out["rejected"] == 1 and out["images"] == 3
    cache = find_cache(tmp_path / "run/cache", out["feature_id"])
    (rejected,) = cache.done_marker(0).rejected
    assert rejected["path"] == member["path"] and "changed since" in rejected["reason"]


def test_a_killed_shard_and_extract_of_tars_and_zips_resume_to_the_same_bytes(tmp_path, tiny_model):
    images = sample_images(6)
    write_img2dataset_tar(tmp_path / "data/train", 0, images[:3])
    write_img2dataset_tar(tmp_path / "data/test", 1, images[3:])
    write_diffusiondb_zip(tmp_path / "data/val", 1, sample_images(4, seed=9500), label_field=True)

    def shard(root: Path) -> None:
        run_shard([tmp_path / "data"], root / "run", shard_size=2, label_field="label")

    def extract(root: Path) -> None:
        run_extract(root / "run", ExtractOptions(model=tiny_model, **EXTRACT))

    shard(tmp_path / "ref")
    assert {e["kind"] for e in manifest(tmp_path / "ref/run")} == {"webdataset", "zip"}
    shutil.copytree(tmp_path / "ref", tmp_path / "sharded")
    extract(tmp_path / "ref")
    for stage, start, step in ((shard, None, 2), (extract, tmp_path / "sharded", 3)):
        target = tmp_path / f"killed-{stage.__name__}"
        shutil.copytree(start, target) if start else target.mkdir()
        assert run_killed_at(lambda t=target, s=stage: s(t), step, after=True)
        stage(target)
        if stage is shard:
            assert tree(target / "run") == tree(tmp_path / "sharded/run")
        else:
            assert tree(target / "run") == tree(tmp_path / "ref/run")


def test_shard_reads_a_tar_twice_at_most_and_extract_one_ranged_read_per_member(tmp_path, tiny_model,
                                                                                monkeypatch):
    """shard lists a tar in one pass and its probe task reads the images in one more (large reads
    both); extract reads each member by its offset."""
    from storage.locations.local import FileReader

    tar = write_img2dataset_tar(tmp_path / "wds", 0, sample_images(6))
    reads: list[tuple[int, int]] = []
    original = FileReader.read
    monkeypatch.setattr(FileReader, "read", lambda self, o, n: reads.append((o, n)) or original(self, o, n))
    run_shard([tmp_path / "wds"], tmp_path / "run", shard_size=8, label_field="label")
    assert sum(n for _, n in reads) <= 2 * tar.stat().st_size  # the listing pass, the probe's pass
    reads.clear()
    run_extract(tmp_path / "run", ExtractOptions(model=tiny_model, **EXTRACT))
    members = {(e["offset"], e["size"]) for e in manifest(tmp_path / "run")}
    assert sorted(r for r in reads if r in members) == sorted(members)
    with tarfile.open(tar) as t:
        assert len([m for m in t.getmembers() if m.name.endswith(("jpg", "png", "webp"))]) == len(members)


def test_a_folder_with_a_symlink_loop_beside_its_tars_is_read(tmp_path):
    """Looking for archives lists the folder: a symlink loop there (ELOOP on stat) is a reject, as in
    a folder of files, not a crash of the listing."""
    write_img2dataset_tar(tmp_path / "wds", 0, sample_images(2))
    (tmp_path / "wds/loop_a.png").symlink_to(tmp_path / "wds/loop_b.png")
    (tmp_path / "wds/loop_b.png").symlink_to(tmp_path / "wds/loop_a.png")
    run_shard([tmp_path / "wds"], tmp_path / "run", shard_size=8, label_field="label")
    assert len(manifest(tmp_path / "run")) == 2
    rejected = sorted(Path(r["path"]).name for r in Run(tmp_path / "run").rejects())
    assert rejected == ["loop_a.png", "loop_b.png"]


# --- review of issue 35: pairing, .cls, unreadable archives, memory, resume, dotted keys, compressed tars


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A plain tar holding `members` (name, bytes) in this order, duplicate names kept."""
    import io

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def write_zip(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A zip holding `members` in this order (a duplicate name warns in zipfile but is written)."""
    import warnings

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as zf:
        warnings.simplefilter("ignore")
        for name, data in members:
            zf.writestr(name, data)
    return path


def labels_by_member(run: Path) -> dict[tuple[str, int], int]:
    """(member name, offset) -> label of every entry of the run."""
    return {(e["path"].rsplit("#", 1)[1], e["offset"]): e["label"] for e in manifest(run)}


def rejects_by_name(run: Path) -> dict[str, str]:
    return {r["path"].rsplit("/", 1)[1]: r["reason"] for r in Run(run).rejects()}


def test_duplicate_member_names_take_the_metadata_of_their_own_sample(tmp_path):
    (a, _, _), (b, _, _), (c, _, _) = [(d, e, lab) for e, d, lab in sample_images(3)]
    tar = write_tar(tmp_path / "t/x.tar", [("same.png", a), ("same.json", b'{"label": 1}'),
                                           ("same.png", b), ("same.json", b'{"label": 0}')])
    run_shard([tmp_path / "t"], tmp_path / "r1", label_field="label")
    with tarfile.open(tar) as t:
        first, second = [m.offset_data for m in t.getmembers() if m.name == "same.png"]
    assert labels_by_member(tmp_path / "r1") == {("same.png", first): 1, ("same.png", second): 0}
    # a zip's metadata is keyed by name: two members of one name cannot be paired with it
    write_zip(tmp_path / "z/x.zip", [("same.png", a), ("same.png", b), ("same.json", b'{"label": 1}'),
                                     ("m/d.png", c), ("m/d.png", a),
                                     ("m/meta.json", b'{"d.png": {"label": 0}}'),
                                     ("ok.png", c), ("ok.json", b'{"label": 1}')])
    run_shard([tmp_path / "z"], tmp_path / "r2", label_field="label")
    rejects = Run(tmp_path / "r2").rejects()
    assert sorted(r["path"].removeprefix(f"{tmp_path}/z/") for r in rejects) == \
        ["x.zip#m/d.png", "x.zip#m/d.png", "x.zip#same.png", "x.zip#same.png"]
    assert all("duplicate member name" in r["reason"] for r in rejects)
    assert [e["path"].rsplit("/", 1)[1] for e in manifest(tmp_path / "r2")] == ["x.zip#ok.png"]
    # no name-keyed metadata: the folders label each copy, nothing is ambiguous
    write_zip(tmp_path / "f/1_fake/x.zip", [("same.png", a), ("same.png", b)])
    run_shard([tmp_path / "f"], tmp_path / "r3")
    assert sorted(e["label"] for e in manifest(tmp_path / "r3")) == [1, 1]


def test_cls_is_a_label_only_when_named_by_label_field(tmp_path):
    images = sample_images(2)
    write_img2dataset_tar(tmp_path / "data/0_real", 0, images, cls=True)  # .cls 0 and 1, all 0/1
    run_shard([tmp_path / "data"], tmp_path / "r1")
    assert [e["label"] for e in manifest(tmp_path / "r1")] == [0, 0]  # the folder's, .cls unnamed
    run_shard([tmp_path / "data"], tmp_path / "r2", label_field="cls")
    assert sorted(e["label"] for e in manifest(tmp_path / "r2")) == [0, 1]
    # a class index named as the label is refused like any other value of the field
    write_tar(tmp_path / "idx/x.tar", [("k.png", images[1][1]), ("k.cls", b"7")])
    run_shard([tmp_path / "idx"], tmp_path / "r3", label_field="cls")
    assert "'7'" in rejects_by_name(tmp_path / "r3")["x.tar#k.png"]


def test_unreadable_archives_are_rejects_naming_them(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    write_img2dataset_tar(folder, 0, sample_images(2))
    for name in ("loop.tar", "loop.zip"):
        (folder / name).symlink_to(folder / name)
    (folder / "gone.tar").symlink_to(folder / "nowhere.tar")
    (folder / "gone.zip").symlink_to(folder / "nowhere.zip")
    run_shard([folder], tmp_path / "r1", label_field="label")
    rejects = rejects_by_name(tmp_path / "r1")
    assert rejects.pop("loop.tar").startswith("unreadable: ")
    assert rejects.pop("loop.zip").startswith("unreadable: ")
    for name in ("gone.tar", "gone.zip"):
        reason = rejects.pop(name)
        assert reason.startswith("missing") and "link" in reason
    assert rejects == {} and len(manifest(tmp_path / "r1")) == 2
    # no permission, an I/O error: the same (root reads a chmod 000 file, so the error is injected)
    from storage.locations.local import FileReader

    def refuse(self, path):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(FileReader, "__init__", refuse)
    run_shard([folder / "00000.tar"], tmp_path / "r2", label_field="label")
    assert rejects_by_name(tmp_path / "r2") == {"00000.tar": "unreadable: Permission denied"}


def test_the_listing_pass_keeps_no_member_bytes(tmp_path):
    import tracemalloc

    from stages.domain.sources import Collected, SourceOptions
    from stages.domain.sources.webdataset_tar import WebDatasetTars

    members = []
    for i in range(40):  # 40 MiB of members, 1 MiB each
        members += [(f"{i:03d}.png", bytes([i]) * (1 << 20)), (f"{i:03d}.json", b'{"label": 1}')]
    write_tar(tmp_path / "big/x.tar", members)
    tracemalloc.start()
    try:
        got = WebDatasetTars().candidates(tmp_path / "big", SourceOptions(label_field="label"), Collected())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(got) == 40 and all(c.label == 1 for c in got)
    assert peak < 24 << 20, peak  # a read buffer (8 MiB) and a member, not the tar


def test_a_killed_shard_of_tars_resumes_without_probing_finished_tars(tmp_path, monkeypatch):
    import stages.domain.sources.webdataset_tar as wt

    images = sample_images(9)
    for k in range(3):
        write_img2dataset_tar(tmp_path / "data", k, images[3 * k:3 * k + 3])

    def shard(root: Path, **kw) -> dict:
        return run_shard([tmp_path / "data"], root / "run", shard_size=4, label_field="label", **kw)

    probed: list[bytes] = []
    original = wt.probe_bytes
    monkeypatch.setattr(wt, "probe_bytes", lambda data, *a: probed.append(data) or original(data, *a))
    dry = shard(tmp_path / "dry", dry_run=True)
    assert dry["files"] == 9 and probed == []  # a dry run lists, it decodes nothing
    shard(tmp_path / "ref")
    assert len(probed) == 9
    target = tmp_path / "killed"
    target.mkdir()
    # the probe checkpoints are the first writes: one per tar; die after the second
    assert run_killed_at(lambda: shard(target), 2, after=True)
    probed.clear()
    shard(target)
    assert len(probed) == 3  # only the third tar's images
    assert tree(target / "run") == tree(tmp_path / "ref/run")


def test_members_are_classified_by_their_last_extension_and_paired_by_key_then_stem(tmp_path):
    images = [d for _, d, _ in sample_images(4)]
    write_tar(tmp_path / "t/x.tar", [
        ("sub/a.b.jpg", images[0]), ("sub/a.b.json", b'{"label": "fake"}'),  # dotted stem
        ("k.seg.png", images[1]), ("k.json", b'{"label": "real"}'),  # WebDataset's key: k
    ])
    write_zip(tmp_path / "z/x.zip", [("sub/a.b.png", images[2]), ("sub/a.b.json", b'{"label": "fake"}'),
                                     ("k.seg.png", images[3]), ("k.json", b'{"label": "real"}')])
    for name in ("t", "z"):
        run_shard([tmp_path / name], tmp_path / f"r{name}", label_field="label")
        assert Run(tmp_path / f"r{name}").rejects() == []
        assert sorted((e["path"].rsplit("#", 1)[1], e["label"]) for e in manifest(tmp_path / f"r{name}")) \
            == sorted([(f"sub/a.b.{'jpg' if name == 't' else 'png'}", 1), ("k.seg.png", 0)])


def test_compressed_tars_are_refused_saying_so(tmp_path):
    import gzip

    images = sample_images(2)
    tar = write_img2dataset_tar(tmp_path / "in", 0, images)
    (tmp_path / "in/01.tar.gz").write_bytes(gzip.compress(tar.read_bytes()))
    (tmp_path / "in/02.tgz").write_bytes(gzip.compress(tar.read_bytes()))
    run_shard([tmp_path / "in"], tmp_path / "r1", label_field="label")
    rejects = rejects_by_name(tmp_path / "r1")
    assert set(rejects) == {"01.tar.gz", "02.tgz"}
    assert all(r.startswith("compressed tar: members cannot be read in place; decompress it")
               for r in rejects.values())
    (tmp_path / "one").mkdir()
    (tmp_path / "one/x.tgz").write_bytes(gzip.compress(tar.read_bytes()))
    run_shard([tmp_path / "one/x.tgz"], tmp_path / "r2", label_field="label")
    assert list(rejects_by_name(tmp_path / "r2")) == ["x.tgz"]
