"""zarr-python's fsspec store for object storage with keys deleted as names (imported only by a
process that opens a Zarr store on object storage: it loads zarr)."""

from __future__ import annotations

import zarr


class LiteralKeyStore(zarr.storage.FsspecStore):
    """zarr-python's fsspec store with keys deleted as names: fsspec's `rm` expands `[ ] * ?` as
    patterns (S3 allows them in keys), so deleting under a run `r[1]` also deleted `r1`'s objects."""

    async def _remove(self, paths: list[str]) -> None:
        for path in paths:
            try:
                await self.fs._rm_file(path)
            except FileNotFoundError:
                pass

    async def delete(self, key: str) -> None:
        """Delete one key (absent: nothing to do)."""
        self._check_writable()
        await self._remove([f"{self.path}/{key}".rstrip("/")])

    async def delete_dir(self, prefix: str) -> None:
        """Delete every key under `prefix`, listed first."""
        self._check_writable()
        root = f"{self.path}/{prefix}".rstrip("/")
        try:
            await self._remove(list(await self.fs._find(root)))
        except FileNotFoundError:
            pass

    async def clear(self) -> None:
        """Delete every key of the store, listed first."""
        try:
            await self._remove([p for p in await self.fs._find(self.path) if p != self.path])
        except FileNotFoundError:
            pass
