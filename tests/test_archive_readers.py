"""The byte-level archive readers (storage/tar_members.py, storage/zip_members.py): every member's
bytes as the writer put them, by a pass and by recorded offset; damaged and truncated archives said,
naming the archive, after the members before the damage; members that cannot be read refused."""

from __future__ import annotations

import io
import random
import tarfile
import zipfile
from pathlib import Path

import pytest
from archive_data import sample_images, write_diffusiondb_zip, write_img2dataset_tar

from storage.archive_members import ArchiveError, RangeFile
from storage.locations.local import FileReader
from storage.tar_members import TarMembers, iter_tar
from storage.zip_members import ZipMembers, iter_zip

BIG = 1 << 30


def tar_contents(path: Path) -> dict[str, bytes]:
    """An independent reading: Python's tarfile extracting every member."""
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_a_pass_over_a_webdataset_tar_gives_every_member_and_its_offset(tmp_path):
    tar = write_img2dataset_tar(tmp_path / "wds", 0, sample_images(5), cls=True)
    members = list(iter_tar(tar, BIG))
    expected = tar_contents(tar)
    assert [m.name for m in members] == list(expected)  # archive order, sidecars included
    assert {m.name: m.data for m in members} == expected
    raw = tar.read_bytes()
    reader = TarMembers()
    for m in members:
        assert raw[m.offset:m.offset + m.size] == expected[m.name]
        assert reader.read(str(tar), m.offset, m.size) == expected[m.name]
    reader.close()


def test_a_member_over_the_limit_is_given_without_its_bytes(tmp_path):
    tar = write_img2dataset_tar(tmp_path / "wds", 0, sample_images(2))
    members = list(iter_tar(tar, 100))
    assert [m.data for m in members if m.name.endswith((".jpg", ".png"))] == [None, None]
    assert all(m.data is not None for m in members if m.name.endswith(".txt"))


def test_links_in_a_tar_are_refused_not_followed(tmp_path):
    path = tmp_path / "links.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("a.png")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    (m,) = list(iter_tar(path, BIG))
    assert m.name == "a.png" and m.data is None and "not a regular file" in m.refused


def end_of(member) -> int:
    """Where the tar's next header block starts after `member`'s data (512-byte blocks)."""
    return member.offset + -(-member.size // 512) * 512


@pytest.mark.parametrize("cut", ["inside_a_member", "at_a_member_boundary", "inside_a_header"])
def test_a_truncated_tar_gives_its_complete_members_then_names_the_archive(tmp_path, cut):
    tar = write_img2dataset_tar(tmp_path / "wds", 0, sample_images(4))
    members = list(iter_tar(tar, BIG))
    third = members[6]  # the third sample's first member
    raw = tar.read_bytes()
    boundary = end_of(members[5])  # where the third sample's first header block starts
    at = {"inside_a_member": third.offset + third.size // 2, "at_a_member_boundary": boundary,
          "inside_a_header": boundary + 300}[cut]
    damaged = tmp_path / "cut.tar"
    damaged.write_bytes(raw[:at])
    got = []
    with pytest.raises(ArchiveError, match=r"cut\.tar: .*truncated"):
        for m in iter_tar(damaged, BIG):
            got.append(m)
    assert [(m.name, m.data) for m in got] == [(m.name, m.data) for m in members[:6]]


def test_a_damaged_header_and_a_file_that_is_no_tar_are_named(tmp_path):
    tar = write_img2dataset_tar(tmp_path / "wds", 0, sample_images(2))
    members = list(iter_tar(tar, BIG))
    raw = bytearray(tar.read_bytes())
    second = end_of(members[2])  # the second sample's first header block
    raw[second:second + 100] = b"\x07" * 100
    (tmp_path / "bad.tar").write_bytes(bytes(raw))
    with pytest.raises(ArchiveError, match=r"bad\.tar: .*damaged"):
        list(iter_tar(tmp_path / "bad.tar", BIG))
    (tmp_path / "no.tar").write_bytes(b"PK\x03\x04 this is not a tar" * 40)
    with pytest.raises(ArchiveError, match=r"no\.tar: not a readable tar"):
        list(iter_tar(tmp_path / "no.tar", BIG))
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(ArchiveError, match=r"empty\.tar"):
        list(iter_tar(tmp_path / "empty.tar", BIG))


def test_a_tar_read_by_offset_costs_one_ranged_read_per_member(tmp_path, monkeypatch):
    tar = write_img2dataset_tar(tmp_path / "wds", 0, sample_images(3))
    members = [m for m in iter_tar(tar, BIG) if m.name.endswith((".jpg", ".png", ".webp"))]
    calls = []
    original = FileReader.read
    monkeypatch.setattr(FileReader, "read", lambda self, o, n: calls.append((o, n)) or original(self, o, n))
    reader = TarMembers()
    for m in members:
        assert reader.read(str(tar), m.offset, m.size) == m.data
    assert calls == [(m.offset, m.size) for m in members]


def zip_contents(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def test_a_pass_over_a_diffusiondb_zip_and_reads_by_offset_give_the_written_bytes(tmp_path):
    path = write_diffusiondb_zip(tmp_path / "ddb", 1, sample_images(5))
    members = list(iter_zip(path, BIG))
    expected = zip_contents(path)
    assert {m.name: m.data for m in members} == expected
    assert [m.offset for m in members] == sorted(m.offset for m in members)
    reader = ZipMembers()
    for m in reversed(members):
        assert reader.read(str(path), m.name, m.offset, m.size) == expected[m.name]
    with pytest.raises(ArchiveError, match="changed since"):
        reader.read(str(path), "other.png", members[0].offset, members[0].size)
    with pytest.raises(ArchiveError, match="changed since"):
        reader.read(str(path), members[0].name, members[0].offset, members[0].size + 1)
    reader.close()


def test_damaged_encrypted_and_oversized_zip_members_are_refused_one_by_one(tmp_path):
    images = sample_images(3)
    path = tmp_path / "z.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i, (ext, data, _) in enumerate(images):
            zf.writestr(f"{i}.{ext}", data)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        second = zf.getinfo(f"1.{images[1][0]}")
        first = zf.getinfo(f"0.{images[0][0]}")
    data_at = second.header_offset + 30 + len(second.filename)
    raw[data_at + 5:data_at + 25] = bytes(20)  # the deflate stream or its CRC no longer holds
    cd = raw.find(b"PK\x01\x02")  # the first member's central directory entry: its encryption flag
    raw[cd + 8] |= 0x1
    path.write_bytes(bytes(raw))
    members = {m.name: m for m in iter_zip(path, BIG)}
    assert "encrypted" in members[first.filename].refused
    assert "damaged in the zip" in members[second.filename].refused
    assert members[f"2.{images[2][0]}"].data == images[2][1]
    small = {m.name: m for m in iter_zip(path, 10)}
    assert small[f"2.{images[2][0]}"].data is None and small[f"2.{images[2][0]}"].refused is None


def test_a_truncated_zip_is_named_with_its_lost_central_directory(tmp_path):
    path = write_diffusiondb_zip(tmp_path / "ddb", 1, sample_images(3))
    cut = tmp_path / "part-cut.zip"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ArchiveError, match=r"part-cut\.zip: .*truncated"):
        list(iter_zip(cut, BIG))


def test_range_file_reads_and_seeks_as_the_bytes_are(tmp_path):
    data = random.Random(3).randbytes(100_000)
    (tmp_path / "f").write_bytes(data)
    rng = random.Random(4)
    for readahead in (1, 7, 4096, 1 << 20):
        f = RangeFile(FileReader(tmp_path / "f"), readahead)
        pos = 0
        for _ in range(200):
            if rng.random() < 0.3:
                whence = rng.choice([io.SEEK_SET, io.SEEK_CUR, io.SEEK_END])
                offset = rng.randrange(0, 100_000) - {io.SEEK_SET: 0, io.SEEK_CUR: pos,
                                                      io.SEEK_END: 100_000}[whence]
                pos = f.seek(offset, whence)
            n = rng.choice([-1, 0, 1, 13, 5000, 200_000])
            got = f.read(n)
            want = data[pos:] if n < 0 else data[pos:pos + n]
            assert got == want and f.tell() == pos + len(want)
            pos += len(want)
        f.close()
