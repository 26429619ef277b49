"""Rows of parquet files (Hugging Face datasets and the like), read in place: a `.parquet` file, or a
folder (or prefix) holding a parquet dataset (its README configs, split folders or file names; see
`stages.domain.parquet_layouts`). The address is `file.parquet#row`; `shard` records each file read
in `RUN/parquet.json` (`storage.parquet_images`), and every read goes a row group at a time."""

from __future__ import annotations

from collections.abc import Hashable

from stages.domain.layouts import SPLIT_NAMES
from stages.domain.parquet_layouts import (
    ColumnOptions,
    Columns,
    ParquetInputError,
    Row,
    dataset_files,
    describe_label,
    infer_columns,
    is_parquet_dataset,
    path_only_rows,
    read_rows,
    source_folder,
)
from stages.domain.probing import probe_bytes
from stages.domain.sources.base import (
    Address,
    Candidate,
    Collected,
    EntryReader,
    InputSource,
    ReadContext,
    ReadError,
    ShardError,
    SourceOptions,
)
from storage.locations import StoragePath
from storage.parquet_images import (
    ParquetError,
    ParquetSource,
    RowGroupReader,
    address,
    footer_signature,
    open_parquet,
    read_column,
    read_index,
    split_address,
)

NO_LABEL = ("no label: the parquet file has no label column (label, labels, is_fake, fake, class, "
            "target); name it with --label-column, or give --label")


def row_refusal(r: Row, cols: Columns, path_only: str | None) -> str | None:
    """Why a parquet row is refused before its bytes are read (None: it is read)."""
    if path_only is not None:
        return (f"the Image cell has a path ({path_only!r}) but no bytes: the image is elsewhere, on the "
                f"machine that wrote the file; write the dataset with its images embedded (push_to_hub "
                f"does; to_parquet of images loaded from paths does not)")
    if r.label is None and r.raw_label is not None:
        named = "the value or its class name" if cols.class_names else "the value"
        return (f"label {describe_label(r.raw_label, cols)} is neither real nor fake (name its values with "
                f"--real-values / --fake-values: {named})")
    return None


def parquet_candidates(inp: StoragePath, columns: ColumnOptions, found: Collected) -> list[Candidate]:
    """A candidate per row of a parquet file or dataset folder; its files are added to `found`, the
    files the dataset's conventions leave out to its rejects, and files in no split to its notes."""
    import pyarrow as pa

    listing = dataset_files(inp, columns.config)
    for p, why in listing.left_out:
        found.refuse(str(p), why)
    if not listing.files:
        left = listing.left_out
        raise ShardError(f"{inp}: no .parquet files" + (f" to read ({len(left)} left out, e.g. {left[0][0]}: "
                                                        f"{left[0][1]})" if left else ""))
    out = []
    for file, file_split in listing.files:
        try:
            size, footer = footer_signature(str(file))
            meta = open_parquet(str(file)).metadata
            cols = infer_columns(meta.schema.to_arrow_schema(), columns, file)
            rows = list(read_rows(file, cols, columns))
            path_only = path_only_rows(file, cols)
        except (ParquetError, ParquetInputError) as e:  # one bad file is a reject, the others are read
            found.refuse(str(file), str(e))
            continue
        except (OSError, pa.ArrowException) as e:  # pyarrow's refusal of a damaged file; a bug still raises
            found.refuse(str(file), f"not a readable parquet file: {e}")
            continue
        found.parquet[str(file)] = ParquetSource(str(file), size, footer, tuple(
            meta.row_group(i).num_rows for i in range(meta.num_row_groups)), cols.image)
        unsplit = file_split is None and cols.split is None
        if unsplit:
            found.unsplit.append(str(file))
        found.inferred.append({"file": str(file), "rows": meta.num_rows,
                               "split": "train" if unsplit else file_split,
                               "splits_from": listing.how, "columns": cols.describe()})
        for r in rows:
            split = r.split or file_split
            out.append(Candidate(address(str(file), r.row), r.label, r.source or source_folder(file),
                                 SPLIT_NAMES.get(split.lower(), split) if split else None,
                                 row_refusal(r, cols, path_only.get(r.row)), kind="parquet"))
    return out


class RowReader(EntryReader):
    """Parquet rows by address, from the column `shard` recorded in the run's parquet.json; the last
    row group read is kept, so consecutive rows cost one read."""

    changed = "changed since `shard`: the row's sha256 no longer matches the manifest key"
    kind_name = "parquet"

    def __init__(self, ctx: ReadContext):
        self.ctx = ctx
        self._rows: RowGroupReader | None = None
        self._checked: set[str] = set()

    def _reader(self) -> RowGroupReader:
        if self._rows is None:
            given, root = (self.ctx.indexes or {}).get(self.kind_name), self.ctx.run_root
            self._rows = RowGroupReader(dict(given) if given is not None else
                                        read_index(root) if root is not None else {})
        return self._rows

    def read(self, address: Address) -> bytes:
        """The row's bytes (b"" for a null cell); a file changed since `shard` is refused naming it."""
        rows = self._reader()
        parts = split_address(address.path)
        try:
            if parts is None or parts[0] not in rows.sources:
                raise ParquetError(f"{address.path}: its file is not in the run's parquet.json (the image "
                                   f"column shard read is recorded there)")
            if self.ctx.recheck and parts[0] not in self._checked:
                rows.sources[parts[0]].check_unchanged()
                self._checked.add(parts[0])
            return rows.read(address.path) or b""
        except ParquetError as e:
            raise ReadError(str(e)) from e

    def group(self, address: Address) -> Hashable | None:
        parts = split_address(address.path)
        sources = self._reader().sources
        if parts is None or parts[0] not in sources:
            return None
        return parts[0], sources[parts[0]].row_group_of(parts[1])[0]


class ParquetRows(InputSource):
    """Rows of a parquet file or dataset, an image column's bytes each."""

    kind = "parquet"
    no_label = NO_LABEL

    def recognises(self, inp: StoragePath) -> bool:
        return inp.suffix.lower() == ".parquet" or (inp.is_dir() and is_parquet_dataset(inp))

    def candidates(self, inp: StoragePath, opts: SourceOptions, found: Collected) -> list[Candidate]:
        return parquet_candidates(inp, opts.columns, found)

    def owns(self, address: str) -> bool:
        return split_address(address) is not None

    def order(self, address: Address) -> tuple | None:
        return split_address(address.path)  # files by name, rows in order: a row group read once

    def reader(self, ctx: ReadContext) -> EntryReader:
        return RowReader(ctx)

    def probe_group(self, address: Address, found: Collected) -> Hashable | None:
        parts = split_address(address.path)
        if parts is None or parts[0] not in found.parquet:
            return None
        src = found.parquet[parts[0]]
        rg, first = src.row_group_of(parts[1])
        return src, rg, first

    def probe(self, addresses: list[Address], group: Hashable | None, max_pixels: int,
              max_bytes: int) -> list[dict]:
        """One row group's image column read once for all its rows."""
        if group is None:  # a row of a file the listing did not read: cannot happen from `candidates`
            return [{"reason": "not a row of a parquet file read by shard"} for _ in addresses]
        source, row_group, first = group
        try:
            cells = read_column(source.file, row_group, source.column)
        except ParquetError as e:
            return [{"reason": str(e)} for _ in addresses]
        return [probe_bytes(cells[split_address(a.path)[1] - first], max_pixels, max_bytes)
                for a in addresses]
