"""Storage locations on the local disk: what `Location.write_streamed` promises."""

from __future__ import annotations

import pytest

from storage.locations.local import LocalLocation


def test_write_streamed_that_fails_leaves_no_file_behind(tmp_path):
    """An error while the stream is written leaves neither the file nor its temporary name."""
    def fill(f):
        f.write(b"half a tar")
        raise RuntimeError("disk full, say")

    with pytest.raises(RuntimeError):
        LocalLocation().write_streamed(tmp_path / "shard.tar", fill)
    assert list(tmp_path.iterdir()) == []
    LocalLocation().write_streamed(tmp_path / "shard.tar", lambda f: f.write(b"whole"))
    assert [p.name for p in tmp_path.iterdir()] == ["shard.tar"]
    assert (tmp_path / "shard.tar").read_bytes() == b"whole"
