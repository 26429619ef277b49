"""The Zarr cache as any Zarr v3 client sees it: the direct shard writer gives zarr-python's bytes,
every array opens in tensorstore (core data types only), and format-1 caches still read."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tensorstore as ts
import zarr
from conftest import cli, make_dataset
from zarr.codecs import ZstdCodec

from storage.cache_folder import CacheError
from storage.caches import find_cache
from storage.feature_dataset import cache_index
from storage.run import Run
from storage.zarr_cache import RowShardLayout, write_row_shard

EXTRACT = ["extract", "--size", 32, "--batch-size", 4, "--workers", 0, "--device", "cpu"]


@pytest.mark.parametrize("dtype", ["uint8", "float16"])
def test_direct_shard_writer_gives_zarr_pythons_bytes(tmp_path, dtype):
    rng = np.random.default_rng(0)
    scale = 255 if dtype == "uint8" else 1
    data = np.clip(rng.normal(0, 0.3, (10, 3, 16, 16)) * scale, 0, 255).astype(dtype)
    data[2] = 0  # an empty row (no chunk in the shard)
    data[8:] = 0  # a wholly empty last shard (no file)
    paths = [tmp_path / f"{k}.zarr" for k in ("zarr-python", "direct")]
    arrays = [zarr.create_array(p, shape=data.shape, dtype=dtype, chunks=(1, 3, 16, 16),
                                shards=(4, 3, 16, 16), compressors=ZstdCodec(level=3), fill_value=0)
              for p in paths]
    for start in range(0, 10, 4):
        arrays[0][start:start + 4] = data[start:start + 4]
        write_row_shard(RowShardLayout.read(paths[1]), start // 4, data[start:start + 4])
    files = [sorted(str(f.relative_to(p)) for f in p.rglob("*") if f.is_file()) for p in paths]
    assert files[0] == files[1] == ["c/0/0/0/0", "c/1/0/0/0", "zarr.json"]
    assert all((paths[0] / f).read_bytes() == (paths[1] / f).read_bytes() for f in files[0])
    assert np.array_equal(zarr.open_array(paths[1])[:], data)


def tensorstore_array(path) -> np.ndarray:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
    return np.asarray(ts.open(spec, read=True).result().read().result())


@pytest.fixture(scope="module")
def cached(module_tmp, tiny_model):
    tmp = module_tmp("ts")
    data = make_dataset(tmp / "data", per_class=3, sources=("gan_a", "gan_b"))
    cli("shard", data, "--run", tmp / "run", "--shard-size", 8)
    cli(*EXTRACT, "--model", tiny_model, "--run", tmp / "run")
    return tmp / "run"


def test_every_array_reads_in_tensorstore(cached):
    cache = find_cache(cached / "cache")
    group = zarr.open_group(str(cache.root / "features.zarr"), mode="r")
    assert json.loads((cache.root / "config.json").read_text())["format"] == 2
    for name in ("dnf", "label", "key", "split", "source"):
        assert np.array_equal(tensorstore_array(cache.root / "features.zarr" / name), group[name][:]), name
    entries = Run(cached).entries()
    keys = tensorstore_array(cache.root / "features.zarr" / "key")
    assert [row.tobytes().hex() for row in keys[: len(entries)]] == [e.key for e in entries]
    for name, attr in (("source", "source"), ("split", "split")):
        names = group[name].attrs["names"]
        codes = tensorstore_array(cache.root / "features.zarr" / name)
        assert [names[c] for c in codes[: len(entries)]] == [getattr(e, attr) for e in entries]
    labels = tensorstore_array(cache.root / "features.zarr" / "label")
    assert list(labels[: len(entries)]) == [e.label for e in entries]


def test_format_1_caches_are_read_and_refused_for_writing(cached, tmp_path, tiny_model):
    run = tmp_path / "run"
    shutil.copytree(cached, run)
    cache = find_cache(run / "cache")
    root = cache.root / "features.zarr"
    group = zarr.open_group(str(root), mode="r+")
    strings = {n: cache._strings(group, n) for n in ("key", "split", "source")}
    for name, values in strings.items():  # as format 1 stored them: variable-length strings
        del group[name]
        group.create_array(name, shape=(len(values),), dtype=str, chunks=(8,))
        group[name][:] = values
    config = json.loads((cache.root / "config.json").read_text())
    del config["format"]
    (cache.root / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    old = find_cache(run / "cache")
    assert old.config().format == 1
    before = cache_index(cache, "train")
    after = cache_index(old, "train")
    assert after.keys == before.keys and after.sources == before.sources
    assert cli("verify", "--run", run).returncode == 0
    proc = cli(*EXTRACT, "--model", tiny_model, "--run", run, "--redo", 0, check=False)
    assert proc.returncode == 2 and "format-1" in proc.stderr and "new cache folder" in proc.stderr
    with pytest.raises(CacheError, match="format-1"):
        old.write_shard(0, *old.read_rows(0, 8)[:2], *old.shard_metadata(0, 8), old.read_rows(0, 8)[2])


def test_direct_shard_writer_checks_the_claim_as_its_last_step(tmp_path):
    """A worker whose claim was taken while it computed must not replace the taker's shard file:
    the direct writer's rename is fenced like every other write of a shard."""
    from storage.locations import fenced

    data = np.arange(4 * 3 * 8 * 8, dtype="uint8").reshape(4, 3, 8, 8)
    path = tmp_path / "a.zarr"
    zarr.create_array(path, shape=data.shape, dtype="uint8", chunks=(1, 3, 8, 8), shards=(4, 3, 8, 8),
                      compressors=ZstdCodec(level=3), fill_value=0)
    layout = RowShardLayout.read(path)
    write_row_shard(layout, 0, data)
    taker = (path / "c/0/0/0/0").read_bytes()

    def claim_lost():
        raise LookupError("claim lost")

    with fenced(claim_lost), pytest.raises(LookupError):
        write_row_shard(layout, 0, data[::-1].copy())
    assert (path / "c/0/0/0/0").read_bytes() == taker
    assert sorted(p.name for p in (path / "c/0/0/0").iterdir()) == ["0"]  # no temporary file left
