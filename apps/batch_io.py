"""Files of `edgevlm batch`: input rows (JSONL, CSV, Parquet) and an output that a kill cannot tear.

Every input row gets a stable id: its `id` column when it has one (unique), else its position (0-based).
Output rows carry that id, so a rerun skips the ids already written:
  JSONL    lines appended, flushed and fsynced after every batch of results; a line torn by a kill (the last
           one) is cut off before the next run appends.
  Parquet  a directory of parts (`part-NNNNNN-<pid>.parquet`), each written to a temp file and renamed, so
           a part is there whole or not at all; any Parquet reader opens the directory as one table.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

from edgevlm.errors import ArgumentError

from .common import requires

INPUTS = (".jsonl", ".csv", ".parquet")
OUTPUTS = (".jsonl", ".parquet")


def _fmt(path: Path, known: tuple[str, ...], what: str) -> str:
    suffix = path.suffix.lower()
    if suffix not in known:
        raise ArgumentError(f"{what} {path} is not {'/'.join(known)} (told by its suffix)")
    return suffix


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The input's rows as dicts (JSONL objects, CSV rows of strings, Parquet rows), in file order."""
    path = Path(path)
    suffix = _fmt(path, INPUTS, "input")
    if not path.is_file():
        raise ArgumentError(f"input {path} does not exist")
    if suffix == ".parquet":
        requires("batch", "parquet")
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8", newline="") as f:
        if suffix == ".csv":
            return list(csv.DictReader(f))
        rows = []
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ArgumentError(f"{path} line {n} is not JSON: {e}") from None
            if not isinstance(row, dict):
                raise ArgumentError(f"{path} line {n} is not a JSON object")
            rows.append(row)
        return rows


def row_ids(rows: list[dict], path) -> list:
    """Each row's id: its `id` column (every row has one, all distinct), else its position."""
    if not any("id" in r for r in rows):
        return list(range(len(rows)))
    ids = [r.get("id") for r in rows]
    if any(i is None for i in ids):
        raise ArgumentError(f"{path}: some rows have an `id` and some do not; give every row one, or none")
    if any(not isinstance(i, (str, int)) or isinstance(i, bool) for i in ids):
        raise ArgumentError(f"{path}: `id` values must be strings or integers")
    if len(set(ids)) != len(ids):
        raise ArgumentError(f"{path}: `id` values repeat; they must be unique (or drop the column)")
    return ids


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class JsonlOut:
    """An append-only JSONL output: `done` holds the ids already in it; `write` appends durably."""

    def __init__(self, path: Path):
        self.path, self.done = path, set()
        if path.exists():
            self._scan()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")

    def _scan(self) -> None:
        good = 0  # bytes up to the end of the last complete line
        with open(self.path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.endswith(b"\n"):
                    break  # a line torn by a kill (always the last): cut off below, redone this run
                good += len(raw)
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw)
                except json.JSONDecodeError:
                    row = None
                if not isinstance(row, dict) or "id" not in row:
                    raise ArgumentError(f"output {self.path} line {n} is not a batch result; "
                                        "pass a new --output (or remove this file)")
                self.done.add(row["id"])
        if good < self.path.stat().st_size:
            os.truncate(self.path, good)

    def write(self, rows: list[dict]) -> None:
        self._f.write("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


class ParquetOut:
    """A directory of Parquet parts; rows are buffered and written as a part every `part_rows` rows or
    `part_s` seconds (a kill loses at most the buffer, which the rerun redoes)."""

    def __init__(self, path: Path, schema, part_rows: int = 2000, part_s: float = 30.0):
        requires("batch", "parquet")
        import pyarrow.parquet as pq

        self.path, self.schema, self.part_rows, self.part_s = path, schema, part_rows, part_s
        self.done, self._buf, self._t = set(), [], time.monotonic()
        if path.exists() and not path.is_dir():
            raise ArgumentError(f"output {path} is a file; Parquet output is a directory of parts")
        path.mkdir(parents=True, exist_ok=True)
        self._seq = 0
        for part in sorted(path.iterdir()):
            if part.name.startswith(".") and ".tmp" in part.name:
                part.unlink()  # a part a kill left half-written (never renamed into place)
            elif part.suffix == ".parquet":
                self.done.update(pq.read_table(part, columns=["id"]).column("id").to_pylist())
                self._seq = max(self._seq, int(part.name.split("-")[1]) + 1)

    def write(self, rows: list[dict]) -> None:
        self._buf.extend(rows)
        if len(self._buf) >= self.part_rows or time.monotonic() - self._t >= self.part_s:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._t = time.monotonic()
        if not self._buf:
            return
        name = f"part-{self._seq:06d}-{os.getpid()}.parquet"
        tmp = self.path / f".{name}.tmp"
        pq.write_table(pa.Table.from_pylist(self._buf, schema=self.schema), tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path / name)
        _fsync_dir(self.path)
        self._seq, self._buf = self._seq + 1, []

    def close(self) -> None:
        self.flush()


def parquet_schema(rows: list[dict], result_types: dict[str, str]):
    """The output schema: the input's columns as pyarrow infers them over all rows, then the result fields
    (result_types: name -> pyarrow type name)."""
    import pyarrow as pa

    try:
        inferred = pa.Table.from_pylist(rows).schema if rows else pa.schema([])
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ArgumentError(f"the input's columns have mixed types, which Parquet cannot hold: {e}") from None
    fields = [f if not pa.types.is_null(f.type) else pa.field(f.name, pa.string()) for f in inferred
              if f.name not in result_types]
    if "id" not in inferred.names:
        fields.insert(0, pa.field("id", pa.int64()))
    return pa.schema(fields + [pa.field(k, pa.type_for_alias(t)) for k, t in result_types.items()])


def open_output(path: str | os.PathLike, rows: list[dict], result_types: dict[str, str], source=None):
    """JsonlOut or ParquetOut by the path's suffix; its `done` holds the ids it already has."""
    path = Path(path)
    if source is not None and path.resolve() == Path(source).resolve():
        raise ArgumentError(f"--output {path} is the input file; give the results their own file")
    if _fmt(path, OUTPUTS, "output") == ".jsonl":
        if path.is_dir():
            raise ArgumentError(f"output {path} is a directory")
        return JsonlOut(path)
    return ParquetOut(path, parquet_schema(rows, result_types))


def read_output(path: str | os.PathLike) -> list[dict]:
    """Every row of a batch output (JSONL file or Parquet directory)."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        requires("batch", "parquet")
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist() if any(path.glob("part-*.parquet")) else []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
