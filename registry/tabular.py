"""Batch files, read and written in chunks: no function here holds more than one chunk of a file in memory.

A CSV is cut into byte ranges that end on a row boundary. A newline ends a row only where the number of quote
characters before it is even (RFC 4180 escapes a quote by doubling it, which keeps the count's parity), so quoted
fields with line breaks never straddle two chunks. A Parquet file is cut by row groups; a row group larger than a
chunk is re-cut into Arrow IPC chunk files by the planner.

Scoring a CSV chunk keeps each input line as it was and appends the prediction columns, so the scored file carries
the caller's values byte for byte (no re-formatting of numbers); a chunk with quoted fields goes through pyarrow's
CSV writer instead. Rows that fail the signature are reported (row, column, reason) and left without a prediction.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from portal.csv_safety import neutralise_cell

BLOCK = 8 * 1024 * 1024
SNIFF_BYTES = 1024 * 1024
PARQUET_MAGIC = b"PAR1"


class BatchInputError(Exception):
    """The file cannot be scored as it is; the message tells the person what to change."""


# ---------------------------------------------------------------------------------------------------------------
# Looking at a submitted file


@dataclass
class InputDescription:
    format: str  # csv | parquet
    columns: list[str]
    rows: int | None  # known up front for Parquet only
    newline: bytes = b"\n"


def describe(path: str, filename: str) -> InputDescription:
    """The format and header of a submitted file; refuses what is not a non-empty CSV or Parquet file."""
    with open(path, "rb") as fh:
        head = fh.read(SNIFF_BYTES)
        fh.seek(0, io.SEEK_END)
        size = fh.tell()
        tail = b""
        if size >= 8:
            fh.seek(size - 4)
            tail = fh.read(4)
    if not head:
        raise BatchInputError("The file is empty.")
    if head.startswith(PARQUET_MAGIC) and tail == PARQUET_MAGIC:
        return _describe_parquet(path)
    if filename.lower().endswith(".parquet") or head.startswith(PARQUET_MAGIC):
        raise BatchInputError("The file is named or starts like Parquet but is not a complete Parquet file.")
    if b"\x00" in head:
        raise BatchInputError("The file is neither CSV (text) nor Parquet: it holds binary data.")
    return _describe_csv(head, size)


def _describe_parquet(path: str) -> InputDescription:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as exc:  # pyarrow raises several types for a damaged footer
        raise BatchInputError(f"The Parquet file cannot be read: {str(exc)[:200]}") from None
    if meta.num_rows == 0:
        raise BatchInputError("The Parquet file has no rows.")
    return InputDescription("parquet", [meta.schema.column(i).name for i in range(meta.num_columns)], meta.num_rows)


def _describe_csv(head: bytes, size: int) -> InputDescription:
    if head.startswith(b"\xef\xbb\xbf"):
        raise BatchInputError("The CSV starts with a byte-order mark; save it as UTF-8 without BOM.")
    end = _first_row_end(head)
    if end is None:
        if size > len(head):
            raise BatchInputError("The CSV's header line is longer than 1 MB; is this a CSV file?")
        raise BatchInputError("The CSV has a header but no rows.")
    header_bytes = head[:end]
    try:
        text = header_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise BatchInputError("The CSV's header is not UTF-8 text.") from None
    columns = next(csv.reader([text.rstrip("\r\n")]), [])
    columns = [c.strip() for c in columns]
    if not columns or not any(columns):
        raise BatchInputError("The CSV's first line is empty; it must name the columns.")
    if len(set(columns)) != len(columns):
        dup = next(c for c in columns if columns.count(c) > 1)
        raise BatchInputError(f"The CSV names the column {dup[:60]!r} twice.")
    if not head[end + 1:].strip(b"\r\n \t"):
        if size <= len(head):
            raise BatchInputError("The CSV has a header but no rows.")
    newline = b"\r\n" if header_bytes.endswith(b"\r") else b"\n"
    return InputDescription("csv", columns, None, newline)


def _first_row_end(data: bytes) -> int | None:
    """Index of the newline that ends the first row (quote-aware), or None."""
    quotes = 0
    start = 0
    while True:
        nl = data.find(b"\n", start)
        if nl < 0:
            return None
        quotes += data.count(b'"', start, nl)
        if quotes % 2 == 0:
            return nl
        start = nl + 1


def check_columns(description: InputDescription, required: list[str], optional: dict[str, str]) -> None:
    """Refuse a file that lacks a signature input, or an id/subject column the caller named."""
    have = set(description.columns)
    missing = [c for c in required if c not in have]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise BatchInputError(f"The file lacks the model's input column {missing[0]!r}{more}. Its columns are: "
                              f"{', '.join(description.columns[:12])}{'…' if len(description.columns) > 12 else ''}.")
    for role, name in optional.items():
        if name and name not in have:
            raise BatchInputError(f"The {role} column {name!r} is not in the file.")


def output_names(columns: list[str]) -> tuple[str, str]:
    """Names for the prediction and prediction id columns that do not clash with the input's."""
    taken = set(columns)

    def free(base: str) -> str:
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}_{n}"
        taken.add(name)
        return name

    return free("prediction"), free("prediction_id")


# ---------------------------------------------------------------------------------------------------------------
# Planning: cutting a file into chunks


@dataclass
class ChunkPlan:
    start: int  # CSV: byte offset; Parquet: first row group; IPC: 0
    end: int  # CSV: byte offset (exclusive); Parquet: last row group (exclusive)
    rows: int
    source: str = ""  # IPC chunk file name in the store, when the planner re-cut a Parquet row group


@dataclass
class CsvPlan:
    sha256: str
    size: int
    header_end: int  # offset of the first data byte
    chunks: list[ChunkPlan] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(c.rows for c in self.chunks)


class CsvPlanner:
    """Cuts a CSV into chunks of about ``chunk_bytes`` that end on row boundaries, fed block by block (from a file,
    or from an upload while it arrives). Each chunk carries its number of lines: an estimate of its rows, since
    the worker's parse is what counts (blank lines drop out)."""

    def __init__(self, chunk_bytes: int, *, digest: bool = True) -> None:
        self.chunk_bytes = chunk_bytes
        self.digest = hashlib.sha256() if digest else None
        self.quotes = 0  # quote characters before the current position
        self.pos = 0  # file offset of the next block's first byte
        self.header_end: int | None = None
        self.chunk_start = self.rows = 0
        self.chunks: list[ChunkPlan] = []
        self.ends_with_newline = True
        self._pending = b""  # the start of the file until its header line is complete

    def feed(self, block: bytes) -> None:
        if not block:
            return
        if self.digest is not None:
            self.digest.update(block)
        i = 0
        if self.header_end is None:
            block = self._pending + block
            first = _first_row_end(block)
            if first is None:
                if len(block) > SNIFF_BYTES:
                    raise BatchInputError("The CSV's header line is longer than 1 MB; is this a CSV file?")
                self._pending = block
                return
            self._pending = b""
            self.quotes = block.count(b'"', 0, first)
            i = first + 1
            self.header_end = self.chunk_start = first + 1
        pos, chunk_bytes = self.pos, self.chunk_bytes
        if self.quotes % 2 == 0 and block.find(b'"', i) < 0:
            # The common case, at memchr speed: every newline ends a row. Rows are counted by numpy (a vectorised
            # compare, about 8x bytes.count's byte-by-byte loop on an upload's 64 KiB blocks).
            view = np.frombuffer(block, dtype=np.uint8)
            while True:
                target = self.chunk_start + chunk_bytes - pos - 1
                nl = block.find(b"\n", max(target, i)) if target < len(block) else -1
                if nl < 0:
                    self.rows += _newlines(view, i, len(block))
                    break
                self.rows += _newlines(view, i, nl + 1)
                i = nl + 1
                self.chunks.append(ChunkPlan(self.chunk_start, pos + i, self.rows))
                self.chunk_start, self.rows = pos + i, 0
        else:
            while (nl := block.find(b"\n", i)) >= 0:
                self.quotes += block.count(b'"', i, nl)
                i = nl + 1
                if self.quotes % 2:
                    continue  # a line break inside a quoted field: the row goes on
                self.rows += 1
                if pos + i - self.chunk_start >= chunk_bytes:
                    self.chunks.append(ChunkPlan(self.chunk_start, pos + i, self.rows))
                    self.chunk_start, self.rows = pos + i, 0
            self.quotes += block.count(b'"', i)
        self.ends_with_newline = block.endswith(b"\n")
        self.pos += len(block)

    def finish(self) -> CsvPlan:
        if self.quotes % 2:
            raise BatchInputError("The CSV ends inside a quoted field: a quote character is never closed.")
        if self.header_end is None:
            raise BatchInputError("The file is empty." if not self._pending else "The CSV has a header but no rows.")
        chunks = list(self.chunks)
        if self.pos > self.chunk_start:
            chunks.append(ChunkPlan(self.chunk_start, self.pos, self.rows + (0 if self.ends_with_newline else 1)))
        if not any(c.rows for c in chunks):
            raise BatchInputError("The CSV has a header but no rows.")
        return CsvPlan(self.digest.hexdigest() if self.digest is not None else "", self.pos, self.header_end, chunks)


def _newlines(view: np.ndarray, start: int, end: int) -> int:
    """The newline bytes in ``view[start:end]`` (a block's bytes as uint8)."""
    return int(np.count_nonzero(view[start:end] == 10)) if end > start else 0


def plan_csv(fh: IO[bytes], chunk_bytes: int) -> CsvPlan:
    """One pass over a file: its SHA-256 and its chunks (see :class:`CsvPlanner`)."""
    planner = CsvPlanner(chunk_bytes)
    while block := fh.read(BLOCK):
        planner.feed(block)
    return planner.finish()


def plan_parquet(path: str, chunk_rows: int) -> list[ChunkPlan]:
    """Row-group ranges of about ``chunk_rows`` rows; a row group bigger than twice that is marked for re-cutting
    (``ChunkPlan.rows`` then holds its size and ``source`` is ``"recut"``)."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    chunks: list[ChunkPlan] = []
    start, rows = 0, 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if n > 2 * chunk_rows:
            if rows:
                chunks.append(ChunkPlan(start, g, rows))
            chunks.append(ChunkPlan(g, g + 1, n, "recut"))
            start, rows = g + 1, 0
            continue
        rows += n
        if rows >= chunk_rows:
            chunks.append(ChunkPlan(start, g + 1, rows))
            start, rows = g + 1, 0
    if rows:
        chunks.append(ChunkPlan(start, meta.num_row_groups, rows))
    return [c for c in chunks if c.rows]


def recut_row_group(path: str, group: int, chunk_rows: int) -> Iterator[bytes]:
    """A big row group as Arrow IPC files of ``chunk_rows`` rows each (pyarrow decodes the row group's column
    chunks to do it, so a single huge row group costs the planner its decoded size once)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    for batch in pf.iter_batches(batch_size=chunk_rows, row_groups=[group]):
        yield ipc_bytes(batch)


# ---------------------------------------------------------------------------------------------------------------
# Scoring one chunk


@dataclass
class RowError:
    row: int  # 0-based within the chunk
    column: str
    reason: str


@dataclass
class ScoredChunk:
    output: bytes  # CSV lines without a header, or an Arrow IPC file
    rows: int
    errors: list[RowError]
    good: np.ndarray  # boolean mask of rows that were scored
    predictions: list[Any]  # one per good row
    ids: Any  # one prediction id per row: an Arrow (large) string array, built without a Python string per row
    # The columns a DataFrame or dict answer fills, in MLflow's JSON order (each prediction then a dict of them);
    # [] for one prediction per row in one column.
    keys: list[str] = field(default_factory=list)
    format_seconds: float = 0.0  # writing ``output``


def answer_keys(predictions: list[Any]) -> list[str]:
    """The columns of MLflow's JSON answer when every row's prediction is a record (a DataFrame or a dict the model
    returned), [] otherwise. Rows answering other columns than the first are the model's fault, not the file's."""
    if not predictions or not all(isinstance(p, dict) for p in predictions):
        return []
    keys = [str(k) for k in predictions[0]]
    first = set(keys)
    for p in predictions:
        if set(map(str, p)) != first:
            raise RuntimeError(f"the model answered the columns {sorted(map(str, p))[:10]} for one row and "
                               f"{keys[:10]} for another")
    return keys


def prediction_names(columns: list[str], keys: list[str], id_name: str) -> list[str]:
    """The result file's column for each key of a record answer: the key itself, or ``key_2``... where the input
    (or the prediction id column) already has that name."""
    taken = {*columns, id_name}
    names = []
    for key in keys:
        name, n = key, 1
        while name in taken:
            n += 1
            name = f"{key}_{n}"
        taken.add(name)
        names.append(name)
    return names


def float_columns(table: Any, columns: list[str],
                  allow_missing: bool = False) -> tuple[np.ndarray, np.ndarray, list[RowError]]:
    """The signature's columns as one float64 matrix, a mask of usable rows and the reasons others are not.
    ``allow_missing``: the serving form was proven on missing values, so an empty cell passes as NaN."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = table.num_rows
    matrix = np.empty((n, len(columns)), dtype="float64")
    good = np.ones(n, dtype=bool)
    errors: list[RowError] = []
    for j, name in enumerate(columns):
        col = table.column(name)
        if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type) \
                or pa.types.is_null(col.type):
            values = col.cast(pa.float64()).to_numpy(zero_copy_only=False) if col.num_chunks != 1 or \
                col.null_count or not pa.types.is_float64(col.type) else col.chunk(0).to_numpy()
            bad = np.isinf(values) if allow_missing else ~np.isfinite(values)
            matrix[:, j] = values
            for i in np.flatnonzero(bad & good)[:10_000]:
                errors.append(RowError(int(i), name, "missing value" if np.isnan(values[i]) else
                                       f"{values[i]} is not a finite number"))
            good &= ~bad
            continue
        text = pc.cast(col, pa.string()) if not pa.types.is_string(col.type) else col
        import pandas as pd

        series = pd.Series(text.to_pylist(), dtype="object")
        numbers = pd.to_numeric(series, errors="coerce").to_numpy(dtype="float64")
        bad = ~np.isfinite(numbers)
        if allow_missing:
            empty = series.isna().to_numpy() | (series.astype(str).str.strip() == "").to_numpy()
            bad &= ~(np.isnan(numbers) & empty)
        matrix[:, j] = numbers
        for i in np.flatnonzero(bad & good)[:10_000]:
            raw = series.iat[i]
            reason = "missing value" if raw is None or str(raw).strip() == "" else \
                f"{str(raw)[:40]!r} is not a number"
            errors.append(RowError(int(i), name, reason))
        good &= ~bad
    return matrix, good, errors


def _predictions_text(predictions: list[Any], good: np.ndarray, keys: list[str] | None = None) -> list[str]:
    """One CSV fragment per row: the prediction's cell, or for a record answer its cells (one per key, comma
    separated); rows not scored get as many empty cells."""
    if keys:
        out = ["," * (len(keys) - 1)] * len(good)
        it = iter(predictions)
        for i in np.flatnonzero(good):
            record = next(it)
            out[i] = ",".join(_cell(record.get(k)) for k in keys)
        return out
    out = [""] * len(good)
    it = iter(predictions)
    for i in np.flatnonzero(good):
        value = next(it)
        out[i] = _cell(value)
    return out


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if np.isfinite(value) else ""
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        # A multi-output prediction (or a nested value in a record answer), as MLflow's JSON shapes it: one quoted
        # cell (a Python repr would split into several fields under the header).
        return _quote(json.dumps(value, default=str))  # NaN written as MLflow's server writes it
    return str(value)


def _quote(text: str) -> str:
    if any(ch in text for ch in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def _fast_predictions(predictions: list[Any], good: np.ndarray, keys: list[str] | None = None) -> Any:
    """Prediction cells for every row ('' for rows not scored), as an Arrow string array: integers, and labels
    with nothing to quote, converted by Arrow (no Python per row); floats by ``repr`` (which round-trips exactly,
    where Arrow's cast may not); anything else cell by cell."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if keys:
        return pa.array(_predictions_text(predictions, good, keys), type=pa.string())
    first = predictions[0] if predictions else None
    if good.all() and isinstance(first, (int, float)) and not isinstance(first, bool):
        arr = pa.array(predictions)
        if pa.types.is_floating(arr.type):
            return pa.array([repr(v) for v in predictions], type=pa.string())
        return arr.cast(pa.string()).fill_null("")
    if good.all() and isinstance(first, str):
        try:
            arr = pa.array(predictions, type=pa.string())
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arr = None
        if arr is not None and not arr.null_count and not pc.any(pc.match_substring_regex(arr, '[,"\r\n]')).as_py():
            return arr
    return pa.array(_predictions_text(predictions, good), type=pa.string())


# Scores a table of the signature's columns whole: (mask of rows scored, their predictions, why the others were not).
TablePredict = Callable[[Any], tuple[np.ndarray, list[Any], list[RowError]]]
MAX_REQUESTS_PER_CHUNK = 64  # when MLflow refuses a chunk, the halves it is cut into to find the rows it refuses


_SIGNATURE_ARROW = {"double": "float64", "float": "float32", "long": "int64", "integer": "int32",
                    "boolean": "bool", "datetime": "timestamp[ns]"}


def _typed_for_mlflow(column: Any, kind: str | None) -> Any:
    """A column as MLflow's server takes it in Parquet: dictionaries decoded, and text (a CSV chunk's) read as the
    signature's numbers or datetimes where every value of it reads so (else left as text, for MLflow to refuse
    the rows that do not)."""
    import pyarrow as pa

    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    target = _SIGNATURE_ARROW.get(kind or "")
    if target is None or not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return column
    try:
        return column.cast(pa.timestamp("ns") if target == "timestamp[ns]" else target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return column


def mlflow_scorer(invoke: Callable[[bytes, str], Any], *, csv_body: bool, tensor: bool = False,
                  types: dict[str, str] | None = None) -> TablePredict:
    """Rows scored by MLflow's own scoring code (a model's sandboxed host), so every column type the signature has
    (strings, categoricals, integers, datetimes) is read as MLflow reads it: a CSV chunk is sent as CSV (MLflow
    parses it with the signature's types), a Parquet chunk as Parquet (dictionary-encoded columns, a pandas
    categorical, decoded to their values). When MLflow refuses a chunk (400), it is cut in halves until the rows
    it refuses are found; each is reported with MLflow's message and the rest are scored.

    Two kinds of model MLflow's server refuses those bodies for: a tensor signature (its Parquet reader gives
    float64 columns, which a float32 tensor refuses) gets the rows as JSON ``inputs``, which MLflow converts to the
    tensor's type; a signature with datetime columns (its CSV reader cannot take them) gets Parquet, the text read
    as the signature's types (``types``, from the signature)."""
    import json

    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    kinds = types or {}
    text_body = csv_body and "datetime" not in kinds.values()

    def body_of(table: Any) -> tuple[bytes, str]:
        sink = io.BytesIO()
        if tensor:
            rows = [list(r) for r in zip(*(c.to_pylist() for c in table.columns), strict=True)]
            # Python's json writes NaN as MLflow's server reads it (a missing value), not as null
            return json.dumps({"inputs": [[float("nan") if v is None else v for v in r] for r in rows]}).encode(), \
                "application/json"
        if text_body:
            pacsv.write_csv(table, sink)
            return sink.getvalue(), "text/csv"
        columns = [_typed_for_mlflow(c, kinds.get(name)) for c, name in zip(table.columns, table.column_names,
                                                                              strict=True)]
        pq.write_table(pa.table(columns, names=table.column_names), sink)
        return sink.getvalue(), "application/vnd.apache.parquet"

    def run(table: Any) -> tuple[np.ndarray, list[Any], list[RowError]]:
        n = table.num_rows
        good = np.ones(n, dtype=bool)
        out: list[Any] = [None] * n
        errors: list[RowError] = []
        budget = [MAX_REQUESTS_PER_CHUNK]

        def score(lo: int, hi: int) -> None:
            budget[0] -= 1
            answer = invoke(*body_of(table.slice(lo, hi - lo)))
            if answer.status == 200:
                payload = json.loads(answer.body)  # MLflow writes NaN, which only the standard library reads
                values = payload.get("predictions", payload) if isinstance(payload, dict) else payload
                values = _records(values, hi - lo)
                if not isinstance(values, list) or len(values) != hi - lo:
                    raise RuntimeError(f"MLflow answered {len(values) if isinstance(values, list) else 'one'} "
                                       f"predictions for {hi - lo} rows")
                out[lo:hi] = values
                return
            try:
                message = str(json.loads(answer.body).get("message") or answer.body)
            except (ValueError, AttributeError):
                message = str(answer.body)
            if answer.status != 400:
                raise RuntimeError(f"MLflow answered {answer.status}: {message[:300]}")
            if hi - lo == 1 or budget[0] < 2:
                reason = f"MLflow refused {'the row' if hi - lo == 1 else 'these rows'}: {message[:300]}"
                good[lo:hi] = False
                errors.extend(RowError(i, "", reason) for i in range(lo, hi))
                return
            mid = (lo + hi) // 2
            score(lo, mid)
            score(mid, hi)

        if n:
            score(0, n)
        return good, [out[i] for i in np.flatnonzero(good)], errors

    return run


def _records(values: Any, rows: int) -> Any:
    """A dict answer of one list per key, each a value per row (a model returning a dict of columns), as the rows'
    records; anything else as it is."""
    if isinstance(values, dict) and values and all(isinstance(v, list) and len(v) == rows for v in values.values()):
        keys = list(values)
        return [{k: values[k][i] for k in keys} for i in range(rows)]
    return values


# Scores the signature's numeric columns as one float64 matrix, as MLflow's scoring server answers those rows (an
# MLflow model's host, ``LoadedModel.predict_frame``); raises when it cannot be certain of that answer (the caller's
# ``declined`` exception), and the rows then go to MLflow's own scoring code.
FramePredict = Callable[[np.ndarray], list[Any]]


def score_csv_chunk(data: bytes, *, columns: list[str], required: list[str], id_prefix: str, newline: bytes,
                    predict: Callable[[np.ndarray], list[Any]],
                    table_predict: TablePredict | None = None, as_text: bool = True,
                    allow_missing: bool = False, frame_predict: FramePredict | None = None,
                    frame_kinds: list[str] | None = None,
                    declined: type[Exception] | tuple[type[Exception], ...] = ()) -> ScoredChunk:
    """Score the rows in ``data`` (whole rows of a CSV without its header). ``table_predict`` (a model MLflow's
    scoring code answers) takes the signature's columns as text, for MLflow to read with the signature's types
    (``as_text``), or as numbers for a tensor signature. ``frame_predict`` (such a model whose host answers a
    matrix as MLflow would, with ``frame_kinds`` its signature's column types) gets the chunk as one float64
    matrix instead when every value of it is a finite number of a ``double`` column (``frame_matrix``)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    include = list(dict.fromkeys(required))
    read = pacsv.ReadOptions(column_names=columns, use_threads=False, block_size=1 << 20)
    parse = pacsv.ParseOptions(newlines_in_values=b'"' in data)
    if frame_predict is not None and table_predict is not None and CSV_FRAMES and frame_kinds \
            and all(k == "double" for k in frame_kinds):
        scored = _score_frames(data, read, parse, include=include, required=required, id_prefix=id_prefix,
                               frame_predict=frame_predict, kinds=frame_kinds, declined=declined)
        if scored is not None:
            scored.output = _csv_output(data, scored, newline)
            return scored
    types = {c: pa.string() if table_predict is not None and as_text else pa.float64() for c in required}
    try:
        table = pacsv.read_csv(io.BytesIO(data), read_options=read, parse_options=parse,
                               convert_options=pacsv.ConvertOptions(include_columns=include, column_types=types,
                                                                    null_values=[""], strings_can_be_null=True))
    except pa.ArrowInvalid as exc:
        if "CSV parse error" in str(exc) or "Expected" in str(exc):
            raise BatchInputError(f"The CSV cannot be parsed: {str(exc)[:300]}") from None
        # A value that is not a number: read those columns as text and report the rows one by one.
        text_types = {c: pa.string() for c in include}
        table = pacsv.read_csv(io.BytesIO(data), read_options=read, parse_options=parse,
                               convert_options=pacsv.ConvertOptions(include_columns=include, column_types=text_types,
                                                                    null_values=[""], strings_can_be_null=True))
    scored = _score_table(table, required=required, id_prefix=id_prefix, predict=predict,
                          table_predict=table_predict, allow_missing=allow_missing)
    scored.output = _csv_output(data, scored, newline)
    return scored


# Whether a CSV chunk's numbers may reach an MLflow model's host as a matrix read by pyarrow: only where pyarrow
# reads every decimal text as the same double as pandas' parser (which MLflow's server uses), see
# ``tests/registry/batch/test_frames.py``.
CSV_FRAMES = True


def _score_frames(data: bytes, read: Any, parse: Any, *, include: list[str], required: list[str], id_prefix: str,
                  frame_predict: FramePredict, kinds: list[str],
                  declined: type[Exception] | tuple[type[Exception], ...]) -> ScoredChunk | None:
    """The chunk's rows scored through ``frame_predict``, or None: a value is not a number (pyarrow refuses it),
    missing or not finite, or the host declined; MLflow's own scoring code then answers the chunk."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    try:
        table = pacsv.read_csv(io.BytesIO(data), read_options=read, parse_options=parse,
                               convert_options=pacsv.ConvertOptions(
                                   include_columns=include, column_types={c: pa.float64() for c in include},
                                   null_values=[""], strings_can_be_null=True))
    except pa.ArrowInvalid:
        return None
    return score_frames(table, required=required, id_prefix=id_prefix, frame_predict=frame_predict, kinds=kinds,
                        declined=declined)


def frame_matrix(table: Any, required: list[str], kinds: list[str]) -> np.ndarray | None:
    """The signature's columns of ``table`` as one float64 matrix when MLflow's scoring server would read them as
    exactly these numbers, the types it enforces already theirs: a ``double`` column of doubles, a ``long``
    column of 64-bit integers within 2^53 (a double holds them exactly), no missing or non-finite value. None
    otherwise."""
    import pyarrow as pa

    if len(required) != len(kinds):
        return None
    matrix = np.empty((table.num_rows, len(required)), dtype="float64")
    for j, (name, kind) in enumerate(zip(required, kinds, strict=True)):
        column = table.column(name)
        if column.null_count:
            return None
        if kind == "double" and pa.types.is_float64(column.type):
            values = column.to_numpy()
            if not np.isfinite(values).all():
                return None
        elif kind == "long" and pa.types.is_int64(column.type):
            ints = column.to_numpy()
            if len(ints) and np.abs(ints).max() > 2 ** 53:
                return None
            values = ints.astype("float64")
        else:
            return None
        matrix[:, j] = values
    return matrix


def score_frames(table: Any, *, required: list[str], id_prefix: str, frame_predict: FramePredict,
                 kinds: list[str], declined: type[Exception] | tuple[type[Exception], ...]) -> ScoredChunk | None:
    """Every row of ``table`` scored through ``frame_predict`` (``frame_matrix``'s conditions), or None."""
    matrix = frame_matrix(table, required, kinds)
    if matrix is None:
        return None
    try:
        predictions = list(frame_predict(matrix)) if matrix.shape[0] else []
    except declined:
        return None
    n = table.num_rows
    if len(predictions) != n:
        raise RuntimeError(f"the model returned {len(predictions)} predictions for {n} rows")
    return ScoredChunk(b"", n, [], np.ones(n, dtype=bool), predictions, prediction_ids(id_prefix, n))


def _csv_output(data: bytes, scored: ScoredChunk, newline: bytes) -> bytes:
    started = time.perf_counter()
    cells = _fast_predictions(scored.predictions, scored.good, scored.keys)
    output = _append_columns(data, cells, scored.ids, newline, scored.rows)
    if output is None:
        output = _rewrite_csv(data, cells=cells.to_pylist(), ids=scored.ids.to_pylist(),
                              width=max(len(scored.keys), 1))
    scored.format_seconds = time.perf_counter() - started
    return output


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def prediction_ids(prefix: str, n: int) -> Any:
    """``{prefix}{i:06x}`` for each row i, as an Arrow large string array built by numpy (no string per row)."""
    import pyarrow as pa

    head = prefix.encode()
    if n >= 16 ** 6 or not head.isascii():
        return pa.array([f"{prefix}{i:06x}" for i in range(n)], type=pa.large_string())
    width = len(head) + 6
    out = np.empty((n, width), dtype=np.uint8)
    out[:, :len(head)] = np.frombuffer(head, dtype=np.uint8)
    index = np.arange(n, dtype=np.int64)
    for k in range(6):
        out[:, len(head) + k] = _HEX[(index >> (4 * (5 - k))) & 15]
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int64)
    return pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(out))


def _score_table(table: Any, *, required: list[str], id_prefix: str,
                 predict: Callable[[np.ndarray], list[Any]], table_predict: TablePredict | None = None,
                 allow_missing: bool = False) -> ScoredChunk:
    """Check the rows against the signature and predict the good ones; the caller writes the output."""
    n = table.num_rows
    ids = prediction_ids(id_prefix, n)
    if table_predict is not None:
        good, predictions, errors = table_predict(table.select(list(dict.fromkeys(required))))
        return ScoredChunk(b"", n, errors, good, predictions, ids, answer_keys(predictions))
    matrix, good, errors = float_columns(table, required, allow_missing)
    scored_matrix = matrix if good.all() else matrix[good]
    predictions = list(predict(np.ascontiguousarray(scored_matrix))) if scored_matrix.shape[0] else []
    if len(predictions) != scored_matrix.shape[0]:
        raise RuntimeError(f"the model returned {len(predictions)} predictions for {scored_matrix.shape[0]} rows")
    return ScoredChunk(b"", n, errors, good, predictions, ids)


def _append_columns(data: bytes, cells: Any, ids: Any, newline: bytes, n: int) -> bytes | None:
    """Each input line with ``,prediction,prediction_id`` appended, by Arrow over the chunk's bytes (no Python per
    row): the lines are cut out of ``data`` where its newlines are, joined element-wise with their cells and ids.
    None when lines and rows do not line up (quoted fields, blank lines, mixed line ends), so the caller rewrites
    the chunk instead."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if b'"' in data:
        return None
    buffer = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(buffer == 10)
    crlf = newline == b"\r\n"
    if crlf:
        if len(ends) and (ends[0] == 0 or not (buffer[ends - 1] == 13).all()):
            return None
        cuts = ends - 1
    else:
        cuts = ends
    if not data.endswith(b"\n"):
        cuts = np.append(cuts, len(data))  # a last line without its newline
    if len(cuts) != n:
        return None
    # Line i is data[cuts[i-1]:cuts[i]]: the previous line's newline, then its own text without the newline.
    offsets = np.empty(n + 1, dtype=np.int64)
    offsets[0] = 0
    offsets[1:] = cuts
    lines = pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(buffer))
    joined = pc.binary_join_element_wise(lines, cells.cast(pa.large_string()), ids.cast(pa.large_string()),
                                         pa.scalar(",", pa.large_string()))
    _validity, value_offsets, values = joined.buffers()
    start, stop = np.frombuffer(value_offsets, dtype=np.int64)[[joined.offset, joined.offset + n]]
    # One copy out of Arrow's buffer, the last newline with it (to_pybytes() + newline copied the part twice).
    return b"".join((memoryview(values)[int(start):int(stop)], newline))


def _rewrite_csv(data: bytes, *, cells: list[str], ids: list[str], width: int = 1) -> bytes:
    """The slow path for chunks with quoted fields: every row re-written by the csv module (``width``: the
    prediction cells each row's fragment holds)."""
    reader = csv.reader(io.StringIO(data.decode("utf-8")))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    k = 0
    for row in reader:
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        predicted = [_unquote(cells[k])] if width == 1 else next(csv.reader([cells[k]]))
        writer.writerow([*row, *predicted, ids[k]])
        k += 1
    if k != len(ids):
        raise BatchInputError(f"The chunk has {k} rows where {len(ids)} were parsed; the CSV is inconsistent.")
    return out.getvalue().encode("utf-8")


def _unquote(cell: str) -> str:
    if cell.startswith('"') and cell.endswith('"'):
        return cell[1:-1].replace('""', '"')
    return cell


def score_arrow_chunk(table: Any, *, required: list[str], id_prefix: str, prediction_name: str, id_name: str,
                      predict: Callable[[np.ndarray], list[Any]],
                      table_predict: TablePredict | None = None, allow_missing: bool = False,
                      frame_predict: FramePredict | None = None, frame_kinds: list[str] | None = None,
                      declined: type[Exception] | tuple[type[Exception], ...] = ()) -> ScoredChunk:
    """Score an Arrow table (a Parquet chunk); the output is an Arrow IPC file of the input plus two columns.
    ``frame_predict``: as for ``score_csv_chunk`` (a Parquet file's columns are already typed: MLflow's reader
    keeps a double column's doubles and a long column's integers)."""
    import pyarrow as pa

    scored = None
    if frame_predict is not None and table_predict is not None and frame_kinds:
        scored = score_frames(table, required=required, id_prefix=id_prefix, frame_predict=frame_predict,
                              kinds=frame_kinds, declined=declined)
    if scored is None:
        scored = _score_table(table, required=required, id_prefix=id_prefix, predict=predict,
                              table_predict=table_predict, allow_missing=allow_missing)
    rows = np.flatnonzero(scored.good)
    out = table
    if scored.keys:  # a record answer: one column per key, named as prediction_names says
        for key, name in zip(scored.keys, prediction_names(table.column_names, scored.keys, id_name), strict=True):
            full: list[Any] = [None] * table.num_rows
            for i, record in zip(rows, scored.predictions, strict=True):
                full[i] = record.get(key)
            out = out.append_column(name, _arrow_values(full))
    elif scored.good.all():
        out = out.append_column(prediction_name, _arrow_values(scored.predictions))
    else:
        full = [None] * table.num_rows
        for i, value in zip(rows, scored.predictions, strict=True):
            full[i] = value
        out = out.append_column(prediction_name, _arrow_values(full))
    out = out.append_column(id_name, scored.ids.cast(pa.string()))
    started = time.perf_counter()
    scored.output = ipc_bytes(out)
    scored.format_seconds = time.perf_counter() - started
    return scored


def _arrow_values(values: list[Any]) -> Any:
    """A prediction column: Arrow's own type when the values have one; else (mixed, nested) each value as MLflow's
    JSON writes it."""
    import pyarrow as pa

    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v, default=str)
                         for v in values], type=pa.string())


def ipc_bytes(data: Any) -> bytes:
    """An Arrow table or record batch as the bytes of an Arrow IPC file."""
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, data.schema) as writer:
        writer.write(data)
    return bytes(sink.getvalue().to_pybytes())


def read_parquet_groups(path: str, start: int, end: int) -> Any:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_groups(list(range(start, end)), use_threads=False)


def read_ipc(data: bytes) -> Any:
    import pyarrow as pa

    return pa.ipc.open_file(pa.BufferReader(data)).read_all()


@dataclass
class LoggedRows:
    matrix: Any  # float64 rows (numeric signatures) or a list of rows of values (any other column types)
    ids: list[str]
    outputs: list[Any]
    subjects: list[str] | None


_ARROW_TYPES = {"long": "int64", "integer": "int32", "double": "float64", "float": "float32", "boolean": "bool"}


def scored_rows(data: bytes, *, fmt: str, columns: list[str], required: list[str], subject_column: str,
                prediction_column: str, id_column: str, types: dict[str, str] | None = None,
                keys: list[str] | None = None) -> LoggedRows:
    """The scored rows of a part (inputs, prediction id, prediction, subject) for the prediction log: rows without
    a prediction (they failed the signature) are left out. ``types`` (the signature's column types) gives a
    column read as text, because another row of its chunk was not a number, its numbers back. ``keys``: the part
    holds a record answer (one column per key), logged as one record per row, as MLflow's JSON answer has it."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    names = prediction_names(columns, keys, id_column) if keys else [prediction_column]
    include = list(dict.fromkeys([*required, *names, id_column, *([subject_column] if subject_column else [])]))
    if fmt == "csv":
        text = {id_column: pa.string(), **({subject_column: pa.string()} if subject_column else {})}
        table = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(column_names=[*columns, *names, id_column], use_threads=False),
            parse_options=pacsv.ParseOptions(newlines_in_values=b'"' in data),
            convert_options=pacsv.ConvertOptions(include_columns=include, column_types=text, null_values=[""],
                                                 strings_can_be_null=True))
    else:
        table = read_ipc(data).select(include)
    valid = [table.column(n).is_valid() for n in names]
    while len(valid) > 1:
        valid = [pc.or_(valid[0], valid[1]), *valid[2:]]
    predicted = valid[0].to_numpy(zero_copy_only=False)
    numeric = all(pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_null(t)
                  for t in (table.column(c).type for c in required))
    inputs: Any
    if numeric or not predicted.any():
        matrix, good, _errors = float_columns(table, required)
        keep = good & predicted
        inputs = matrix[keep]
    else:  # strings, categoricals, dates: the values as MLflow's scoring code got them, JSON-safe
        keep = predicted
        kept = table.select(list(dict.fromkeys(required))).filter(pa.array(keep))
        values = [[_json_safe(v) for v in _as_signature_type(kept.column(c), (types or {}).get(c)).to_pylist()]
                  for c in required]
        inputs = [list(row) for row in zip(*values, strict=True)] if values else []
    index = pa.array(np.flatnonzero(keep))
    subjects = None
    if subject_column:
        subjects = ["" if s is None else str(s) for s in table.column(subject_column).take(index).to_pylist()]
    if keys:
        values = [table.column(n).take(index).to_pylist() for n in names]
        outputs = [dict(zip(keys, row, strict=True)) for row in zip(*values, strict=True)]
    else:
        outputs = table.column(prediction_column).take(index).to_pylist()
    return LoggedRows(inputs, table.column(id_column).take(index).to_pylist(), outputs, subjects)


def _as_signature_type(column: Any, kind: str | None) -> Any:
    import pyarrow as pa

    target = _ARROW_TYPES.get(kind or "")
    if target is None or not pa.types.is_string(column.type):
        return column
    try:
        return column.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return column


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    return str(value)  # dates, times, decimals, bytes


def errors_csv(errors: list[tuple[int, str, str]]) -> bytes:
    """The errors file: row number, column and reason. Reasons quote the uploaded file's cells, so cells a
    spreadsheet would run as formulas are neutralised (``portal.csv_safety``; nothing verifies this file against a
    hash, so the escape need not be reversible and a reason that begins with a quote is left as it is)."""
    out = io.StringIO()
    # Every text cell quoted: with "\n" line ends the csv module would leave a bare "\r" unquoted, and readers
    # take it for the end of the row.
    writer = csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
    for row in errors:
        writer.writerow([neutralise_cell(cell, reversible=False) for cell in row])
    return out.getvalue().encode("utf-8")
