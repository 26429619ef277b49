"""`shard --pack`: original bytes in one tar per manifest shard; `extract` reads the tars (the
original files may be gone) and gives the same cache as from the files."""

from __future__ import annotations

import json
import shutil
import tarfile

from conftest import cli
from test_extract import cache_files
from test_reliability import EXTRACT_ARGS, clean, only_cache  # noqa: F401

from storage.run import Run

_ = clean


def test_pack_holds_the_original_bytes_deterministically(clean, tmp_path):  # noqa: F811
    a = json.loads(cli("shard", clean["data"], "--run", tmp_path / "a", "--shard-size", 6, "--pack",
                       "--json").stdout)
    assert a["packed_now"] == a["packed_shards"] == 12
    cli("shard", clean["data"], "--run", tmp_path / "b", "--shard-size", 6, "--pack")
    for i in range(12):
        name = f"packed/{i:05d}.tar"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    run = Run(tmp_path / "a")
    entries = run.shard_entries(5)
    with tarfile.open(tmp_path / "a/packed/00005.tar") as tar:
        members = tar.getmembers()
        assert [m.name.split(".")[0] for m in members] == [e.key for e in entries]  # row order
        for m, e in zip(members, entries, strict=True):
            assert tar.extractfile(m).read() == open(e.path, "rb").read()
            assert m.name.endswith(e.path[e.path.rfind("."):].lower())
    again = json.loads(cli("shard", clean["data"], "--run", tmp_path / "a", "--shard-size", 6, "--pack",
                           "--json").stdout)
    assert again["packed_now"] == 0


def test_extract_reads_packs_without_the_original_files(clean, tmp_path, tiny_model):  # noqa: F811
    data = tmp_path / "data"
    shutil.copytree(clean["data"], data)
    cli("shard", data, "--run", tmp_path / "run", "--shard-size", 6)  # unpacked first ...
    out = json.loads(cli("shard", data, "--run", tmp_path / "run", "--shard-size", 6, "--pack",
                         "--json").stdout)
    assert out["packed_now"] == 12  # ... packed by a second call
    shutil.rmtree(data)  # the GPU box has only the run folder
    cli(*EXTRACT_ARGS, "--model", tiny_model, "--run", tmp_path / "run")
    # the images live elsewhere, so the manifest (paths) and its fingerprint in the configs differ;
    # every data file and done marker is the same
    got = cache_files(only_cache(tmp_path / "run"))
    assert {k for k in got if got[k] != clean["files"][k]} == {"config.json", "features.zarr/zarr.json"}
    assert got.keys() == clean["files"].keys()


def test_damaged_pack_member_is_rejected_with_its_reason(clean, tmp_path, tiny_model):  # noqa: F811
    cli("shard", clean["data"], "--run", tmp_path / "run", "--shard-size", 6, "--pack")
    tar_path = tmp_path / "run/packed/00002.tar"
    data = bytearray(tar_path.read_bytes())
    data[512 + 40] ^= 0xFF  # inside the first member's bytes
    tar_path.write_bytes(bytes(data))
    cli(*EXTRACT_ARGS, "--model", tiny_model, "--run", tmp_path / "run")
    marker = json.loads((only_cache(tmp_path / "run") / "done/00002.json").read_text())
    assert len(marker["rejected"]) == 1 and "damaged in" in marker["rejected"][0]["reason"]
    assert marker["rejected"][0]["key"] == Run(tmp_path / "run").shard_entries(2)[0].key
