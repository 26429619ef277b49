"""Which folders the archive sources take (issue 35 review): a folder of archives (and their own
metadata) is read as archives; a stray archive inside an image folder is not read, and a parquet
dataset that also holds a zip keeps its rows; an archive that cannot be listed counts in `files`."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

from archive_data import sample_images, write_img2dataset_tar
from conftest import image_bytes, write

from stages.domain.sources import Collected, SourceOptions
from stages.domain.sources.archive_folders import STRAY_ARCHIVE, archive_refusal
from stages.shard import collect, run_shard


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_a_stray_archive_in_an_image_folder_is_not_read(tmp_path):
    """CNNDetection's train/sd/1_fake/ holding a backup.tar and a backup.zip beside its PNGs: the
    folder stays a folder of files, the archives' members are not indexed under its label."""
    root = tmp_path / "CNNDetection"
    fake = root / "train" / "sd" / "1_fake"
    write(fake / "a.png", image_bytes(1))
    write(root / "train" / "sd" / "0_real" / "b.png", image_bytes(2))
    write_img2dataset_tar(fake / "backup", 0, sample_images(2))
    (fake / "backup" / "00000.tar").rename(fake / "backup.tar")
    shutil.rmtree(fake / "backup")
    _zip(fake / "backup.zip", {"c.png": image_bytes(3)})
    got = collect([root])
    assert {c.kind for c in got} == {"files"} and not any("#" in c.path for c in got)
    reasons = {Path(c.path).name: c.reason for c in got}
    assert reasons == {"a.png": None, "b.png": None, "backup.tar": STRAY_ARCHIVE, "backup.zip": STRAY_ARCHIVE}
    # the same archive given as its own input, or a folder of archives, is read
    members = collect([fake / "backup.zip"])
    assert [c.path.rsplit("#", 1)[1] for c in members] == ["c.png"] and members[0].label == 1


def test_an_archive_in_an_image_folder_has_a_reason_saying_so():
    """The reason such an archive is refused with (and none for an image file)."""
    assert archive_refusal("x/backup.tar") == STRAY_ARCHIVE
    assert archive_refusal("x/part.ZIP") == STRAY_ARCHIVE
    assert archive_refusal("x/old.tgz") == STRAY_ARCHIVE
    assert archive_refusal("x/a.png") is None
    assert "its members are not read" in STRAY_ARCHIVE


def test_a_folder_of_archives_with_their_metadata_is_still_read_as_archives(tmp_path):
    """img2dataset's .parquet/_stats.json beside each tar, a README: still the archive source's."""
    write_img2dataset_tar(tmp_path / "wds", 0, sample_images(3))
    write(tmp_path / "wds" / "README.md", b"# laion subset\n")
    got = collect([tmp_path / "wds"], options=SourceOptions(label_field="label"))
    assert sum(c.kind == "webdataset" for c in got) == 3


def test_a_parquet_dataset_with_an_extra_zip_keeps_its_rows(tmp_path):
    """A Hugging Face repo with data/train-*.parquet and an extra images.zip: a parquet dataset."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "hf" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"image": [{"bytes": image_bytes(10 + i), "path": f"{i}.png"} for i in range(4)],
                             "label": [0, 1, 0, 1]}), tmp_path / "hf/data/train-00000-of-00001.parquet")
    _zip(tmp_path / "hf" / "extra_images.zip", {"1_fake/a.png": image_bytes(20)})
    found = Collected()
    got = collect([tmp_path / "hf"], found=found)
    assert sum(c.kind == "parquet" for c in got) == 4, [(c.kind, c.path) for c in got]
    assert not any(c.path.endswith(".parquet") and c.kind != "parquet" for c in got)


def test_an_archive_that_cannot_be_listed_counts_in_files(tmp_path):
    """files = images + rejects + duplicates, a tar that is no tar and a truncated zip included."""
    write(tmp_path / "one" / "fake.tar", b"no tar at all" * 100)
    s1 = run_shard([tmp_path / "one" / "fake.tar"], tmp_path / "r1", label="fake")
    assert (s1["files"], s1["images"], s1["rejects"]) == (1, 0, 1), s1
    write_img2dataset_tar(tmp_path / "many", 0, sample_images(2))
    whole = _zip(tmp_path / "many" / "p.zip", {"a.png": image_bytes(30)}).read_bytes()
    (tmp_path / "many" / "p.zip").write_bytes(whole[:len(whole) // 2])
    write(tmp_path / "many" / "x.tgz", b"\x1f\x8b not really")
    s2 = run_shard([tmp_path / "many"], tmp_path / "r2", label_field="label")
    assert s2["files"] == s2["images"] + s2["rejects"] + s2["duplicates"] == 4, s2
