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


def test_a_fenced_write_is_checked_last_and_stopped_before_its_file_appears(tmp_path):
    """`fenced(check)`: every write that makes a file appear calls `check` as its last step (after
    the data are complete, before the rename); a check that raises leaves the old file as it was
    and no temporary file; writes inside the check itself (a claim's heartbeat) are not fenced."""
    from storage.locations import fenced
    from storage.locations.local import LocalLocation

    target = tmp_path / "shard.bin"
    target.write_bytes(b"the taker's")
    seen = []

    def check():
        seen.append(target.read_bytes())
        LocalLocation().write_whole(tmp_path / "heartbeat", b"beat")  # not fenced again
        raise LookupError("claim lost")

    for write in (lambda: LocalLocation().write_whole(target, b"mine"),
                  lambda: LocalLocation().write_streamed(target, lambda f: f.write(b"mine"))):
        with fenced(check), pytest.raises(LookupError):
            write()
    assert seen == [b"the taker's", b"the taker's"]
    assert target.read_bytes() == b"the taker's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heartbeat", "shard.bin"]
    LocalLocation().write_whole(target, b"unfenced")  # outside the block: no check
    assert target.read_bytes() == b"unfenced" and len(seen) == 2
