"""MLflow's scoring protocol: ``dataframe_split``, ``dataframe_records``, ``instances``, ``inputs`` (rows, records or
named tensors), CSV and Parquet, with MLflow's content-type rules (UTF-8 only, no other parameters: 415).

Requests are turned into one float64 matrix in the signature's column order. Errors name the first problem (a
missing column, a value that is not a number) without echoing the whole schema back.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

MAX_ROWS = 100_000
PARQUET = "application/vnd.apache.parquet"


# MLflow's error codes, as its scoring server gives them: a request it cannot read is a BAD_REQUEST, values its
# schema enforcement refuses (a missing column, a value of the wrong type, an invalid param) INVALID_PARAMETER_VALUE.
BAD_REQUEST = "BAD_REQUEST"
INVALID_VALUE = "INVALID_PARAMETER_VALUE"


class InputError(Exception):
    def __init__(self, message: str, code: str = "invalid_input", mlflow_code: str = BAD_REQUEST) -> None:
        super().__init__(message)
        self.code = code
        self.mlflow_code = mlflow_code


class NoRows(InputError):
    """A well-formed request of no rows: refused (400) unless the model answers those, as MLflow's server does."""

    def __init__(self) -> None:
        super().__init__("There are no rows to score.")


class SchemaError(InputError):
    """A value MLflow's schema enforcement refuses (400 INVALID_PARAMETER_VALUE)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "invalid_input", INVALID_VALUE)


@dataclass
class ParsedRequest:
    columns: list[str] | None
    rows: list[Any]
    subject_ids: list[str] | None
    params: dict[str, Any] | None = None
    # how the rows came: "split", "records" (a list of objects), "tensors" (named), "rows", "csv" or "parquet"
    form: str = "rows"


def parse(content_type: str, body: bytes) -> ParsedRequest:
    kind, _, parameters = (content_type or "").partition(";")
    kind = kind.strip().lower()
    if parameters:
        _check_parameters(parameters)
    if kind == "text/csv":
        return _parse_csv(body)
    if kind == PARQUET:
        return _parse_parquet(body)
    if not kind:
        # MLflow's server crashes on a request without one (500); its own rule for a type it does not know is 415.
        raise InputError(f"Say what the body is with a Content-Type header: application/json, text/csv or {PARQUET}.",
                         "unsupported_media_type")
    if kind != "application/json":
        raise InputError(f"Send JSON (application/json), CSV (text/csv) or Parquet ({PARQUET}); got {kind!r}.",
                         "unsupported_media_type")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # MLflow's server reads bodies with Python's json, which takes NaN and Infinity as numbers (pandas writes
        # them so); orjson does not, so only a body it refuses is read again that way.
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise InputError(f"The body is not valid JSON: {exc}.", "parse_error") from None
    if not isinstance(payload, dict):
        raise InputError("The body must be a JSON object with one of: dataframe_split, dataframe_records, "
                         "instances, inputs.")
    subject_ids = payload.get("subject_ids")
    if subject_ids is not None and (not isinstance(subject_ids, list)
                                    or not all(isinstance(s, (str, int)) for s in subject_ids)):
        raise InputError("subject_ids must be a list of strings, one per row.")
    params = payload.get("params")
    if params is not None and not isinstance(params, dict):
        raise InputError("params must be a JSON object of parameter names and values.")
    keys = [k for k in ("dataframe_split", "dataframe_records", "instances", "inputs") if k in payload]
    if len(keys) != 1:
        raise InputError("Give exactly one of: dataframe_split, dataframe_records, instances, inputs.")
    data = payload[keys[0]]
    if keys[0] == "dataframe_split":
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise InputError("dataframe_split needs {\"columns\": [...], \"data\": [[...], ...]}.")
        columns = data.get("columns")
        if columns is not None:
            if not isinstance(columns, list) or not all(isinstance(c, (str, int)) for c in columns):
                raise InputError("dataframe_split.columns must be a list of column names.")
            columns = [c if isinstance(c, str) else str(c) for c in columns]  # pandas' integer names
        parsed = ParsedRequest(columns, data["data"], None, form="split")
    elif keys[0] == "dataframe_records" or (isinstance(data, list) and data and isinstance(data[0], dict)):
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise InputError(f"{keys[0]} must be a list of objects, one per row.")
        parsed = ParsedRequest(None, data, None, form="records" if keys[0] != "dataframe_records" else "split")
    elif isinstance(data, dict):  # named tensors: {"inputs": {"column": [value, ...], ...}}
        values = list(data.values())
        if not values or not all(isinstance(v, list) for v in values) or len({len(v) for v in values}) != 1:
            raise InputError(f"{keys[0]} as named tensors needs one list of values per input, all as long.")
        parsed = ParsedRequest([str(c) for c in data], [list(r) for r in zip(*values, strict=True)], None,
                               form="tensors")
    else:
        if not isinstance(data, list):
            raise InputError(f"{keys[0]} must be a list of rows.")
        parsed = ParsedRequest(None, data, None)
    if not parsed.rows:
        raise NoRows()
    if len(parsed.rows) > MAX_ROWS:
        raise InputError(f"At most {MAX_ROWS} rows per request; use a batch job for more.")
    parsed.params = params or None
    if subject_ids is not None:
        if len(subject_ids) != len(parsed.rows):
            raise InputError(f"subject_ids has {len(subject_ids)} entries for {len(parsed.rows)} rows.")
        parsed.subject_ids = [str(s) for s in subject_ids]
    return parsed


def _check_parameters(parameters: str) -> None:
    """As MLflow's scoring server: ``charset`` may only be UTF-8, and no other parameter is known."""
    for pair in parameters.split(";"):
        key, _, value = pair.partition("=")
        key = key.strip().lower()
        if key == "charset":
            if value.strip().strip('"').lower() != "utf-8":
                raise InputError("The scoring server only supports UTF-8.", "unsupported_media_type")
        elif key:
            raise InputError(f"Unrecognized content type parameter: {key}.", "unsupported_media_type")


def _parse_parquet(body: bytes) -> ParsedRequest:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(pyarrow.BufferReader(body))
    except Exception as exc:  # any malformed file: pyarrow raises several kinds
        raise InputError(f"The body is not a Parquet file: {str(exc)[:200]}", "parse_error") from None
    columns = [c for c in table.column_names if not c.startswith("__index_level_")]  # a saved pandas index
    if table.num_rows > MAX_ROWS:
        raise InputError(f"At most {MAX_ROWS} rows per request; use a batch job for more.")
    if not columns:
        raise InputError("There are no rows to score.")
    if not table.num_rows:
        raise NoRows()
    rows = [list(r) for r in zip(*(table.column(c).to_pylist() for c in columns), strict=True)]
    return ParsedRequest(columns, rows, None, form="parquet")


def _parse_csv(body: bytes) -> ParsedRequest:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError("The CSV is not UTF-8 text.", "parse_error") from None
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        raise InputError("The CSV is empty.") from None
    # An empty field is a missing value, as pandas (and so MLflow's server) reads it: NaN, which then passes only to a
    # form proven on missing values.
    rows = [[field if field.strip() else "nan" for field in row] for row in reader if row]
    if not rows:
        raise InputError("The CSV has a header but no rows.")
    return ParsedRequest([h.strip() for h in header], rows, None, form="csv")


def to_matrix(parsed: ParsedRequest, columns: list[str], *, named: bool = False, tensor: bool = False,
              allow_missing: bool = False) -> np.ndarray:
    """Rows as a float64 matrix in ``columns`` order; a missing or non-numeric value is a 400 naming it.

    ``named``: the columns are a column signature's (MLflow enforces them by name), so rows without column names
    are refused as MLflow refuses them. Otherwise (a tensor signature, a bare ONNX file) the columns only give the
    width, and names that are not the expected ones are ignored, as MLflow turns such a frame into a tensor.
    ``tensor``: an MLflow tensor signature, for which MLflow's server refuses CSV bodies, named tensors and records
    under ``instances``/``inputs``; so does this. ``allow_missing``: the serving form was proven on missing values, so a
    null (or NaN) passes to it as NaN, as MLflow passes it to the model; infinities are refused either way."""
    if tensor and parsed.form in ("csv", "tensors"):
        raise InputError("This model's signature is an unnamed tensor: send rows as dataframe_split, "
                         "dataframe_records, instances or inputs (lists of values) or Parquet"
                         + (", not CSV." if parsed.form == "csv" else ", not named tensors."))
    if tensor and parsed.form == "records":
        raise SchemaError("This model's signature is an unnamed tensor: send instances or inputs as lists of "
                          "values, not objects.")
    width = len(columns)
    rows = parsed.rows
    if parsed.columns is None and rows and isinstance(rows[0], dict):
        missing = [c for c in columns if c not in rows[0]]
        if missing and not named and len(rows[0]) == width:
            rows = [list(r.values()) if isinstance(r, dict) else r for r in rows]
            parsed = ParsedRequest(None, rows, parsed.subject_ids, parsed.params, parsed.form)
        else:
            if missing:
                raise SchemaError(f"Row 0 lacks the input {missing[0]!r}" + (f" and {len(missing) - 1} more." if
                                                                             len(missing) > 1 else "."))
            try:
                matrix = np.array([[row[c] for c in columns] for row in rows], dtype="float64")
            except KeyError as exc:
                raise SchemaError(f"A row lacks the input {exc.args[0]!r}.") from None
            except (TypeError, ValueError):
                raise InputError(_first_bad_value(rows, columns)) from None
            return _finite(matrix, columns, allow_missing)
    if named and parsed.columns is None:
        raise SchemaError(f"The model's signature names its inputs ({', '.join(columns[:5])}"
                          f"{', …' if width > 5 else ''}): send rows with column names (dataframe_split with "
                          "columns, dataframe_records, or a list of objects).")
    order: list[int] | None = None  # None: the columns come in the signature's order already (the usual case)
    if parsed.columns is not None and parsed.columns != columns:
        index = {c: i for i, c in enumerate(parsed.columns)}
        missing = [c for c in columns if c not in index]
        if missing and not named and len(parsed.columns) == width:
            order = None  # unnamed inputs: taken in the order sent
        elif missing:
            raise SchemaError(f"The input {missing[0]!r} is missing" + (f", and {len(missing) - 1} more." if
                                                                         len(missing) > 1 else "."))
        else:
            order = [index[c] for c in columns]
    try:
        raw = np.array(rows, dtype="float64" if parsed.columns is None or _is_numeric_table(rows) else object)
    except (TypeError, ValueError):
        if not _rectangular(rows):
            raise InputError("Rows have different lengths.") from None
        raw = np.array(rows, dtype=object)
    if raw.ndim != 2:
        raise InputError("Each row must be a list of values.")
    needed = width if order is None else max(order) + 1 if order else 0
    if raw.shape[1] < needed or (parsed.columns is None and raw.shape[1] != width):
        raise SchemaError(f"Each row needs {width} values in the signature's order; got {raw.shape[1]}.")
    try:
        matrix = (raw[:, :width] if order is None else raw[:, order]).astype("float64", copy=False)
    except (TypeError, ValueError):
        names = parsed.columns or columns
        raise InputError(_first_bad_matrix_value(raw, order or list(range(width)), names)) from None
    return _finite(matrix, columns, allow_missing)


EXACT_INTEGER = 2 ** 53  # the largest magnitude below which every integer is a double exactly


def numeric_rows(content_type: str, body: bytes, columns: list[str], kinds: list[str]) -> np.ndarray | None:
    """The rows of a JSON ``dataframe_split`` body as one float64 matrix in the signature's column order, when
    MLflow's scoring server would read them as exactly these numbers: a body of that one key (no params, nothing
    else), ``columns`` naming each of the signature's columns once and nothing more, rows of that width holding
    JSON numbers only (integers within 2^53, which a double holds exactly; a ``long`` column integers only), at
    most ``MAX_ROWS`` of them. ``kinds``: the signature's column types (``double`` or ``long``), in its order.

    None for anything else, and the body goes to MLflow's own parser, which answers it (refusals included): this is
    a shortcut for the common request, never a second reading of MLflow's rules."""
    if content_type.strip().lower() != "application/json":
        return None
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(payload) is not dict or len(payload) != 1:
        return None
    split = payload.get("dataframe_split")
    if type(split) is not dict or len(split) != 2:
        return None
    names, data = split.get("columns"), split.get("data")
    width = len(columns)
    if type(names) is not list or type(data) is not list or not data or len(data) > MAX_ROWS or len(names) != width:
        return None
    order = None
    if names != columns:
        if not all(type(n) is str for n in names) or set(names) != set(columns) or len(set(names)) != width:
            return None
        order = [names.index(c) for c in columns]
    for row in data:
        if type(row) is not list or len(row) != width:
            return None
    types = {type(v) for row in data for v in row}
    if not types <= _NUMBERS:
        return None
    try:
        matrix = np.array(data, dtype="float64")
    except (OverflowError, ValueError):
        return None
    if not np.isfinite(matrix).all():
        return None
    if int in types and np.abs(matrix).max(initial=0.0) > EXACT_INTEGER:
        return None
    for j, kind in enumerate(kinds):
        if kind != "double":
            source = j if order is None else order[j]
            if kind != "long" or not all(type(row[source]) is int for row in data):
                return None
    return matrix if order is None else np.ascontiguousarray(matrix[:, order])


def logged_values(matrix: np.ndarray, kinds: list[str]) -> list[list[Any]]:
    """A matrix from ``numeric_rows`` as the prediction log keeps MLflow's parsed rows: ``long`` columns as
    integers, the rest as floats."""
    rows = matrix.tolist()
    longs = [j for j, kind in enumerate(kinds) if kind == "long"]
    if longs:
        for row in rows:
            for j in longs:
                row[j] = int(row[j])
    return rows


# MLflow's param types and the Python values each takes (its ParamSpec conversion: a whole number is a valid
# float, a float is not a valid integer; a boolean is neither).
_PARAM_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "boolean": (bool,), "integer": (int,), "long": (int,), "float": (int, float),
    "double": (int, float), "datetime": (str,), "binary": (str, bytes),
}


def check_params(params: dict[str, Any] | None, schema: list[dict[str, Any]]) -> None:
    """Params against the signature's ParamSchema, as MLflow enforces it: a value of the wrong type is a 400
    INVALID_PARAMETER_VALUE; a param the schema does not declare is ignored (MLflow only logs a warning)."""
    if not params or not schema:
        return
    for spec in schema:
        name = spec.get("name")
        if name not in params or params[name] is None:
            continue
        value, kind = params[name], str(spec.get("type") or "")
        allowed = _PARAM_TYPES.get(kind)
        if allowed is None:
            continue
        values = value if spec.get("shape") is not None and isinstance(value, list) else [value]
        if spec.get("shape") is not None and not isinstance(value, list):
            raise InputError(f"Param {name!r} takes a list of {kind} values; got {str(value)[:40]!r}.",
                             mlflow_code=INVALID_VALUE)
        for v in values:
            if (isinstance(v, bool) and kind != "boolean") or not isinstance(v, allowed):
                raise InputError(f"Param {name!r} takes a {kind} value; {str(v)[:40]!r} is not one.",
                                 mlflow_code=INVALID_VALUE)


_NUMBERS = {int, float}


def _is_numeric_table(rows: list[Any]) -> bool:
    """Whether the first row holds only JSON numbers (not strings, not booleans)."""
    return {type(v) for v in (rows[0] if rows else [])} <= _NUMBERS


def _rectangular(rows: list[Any]) -> bool:
    return all(isinstance(r, list) for r in rows) and len({len(r) for r in rows}) == 1


def _first_bad_value(rows: list[dict[str, Any]], columns: list[str]) -> str:
    for i, row in enumerate(rows):
        for c in columns:
            try:
                float(row[c])
            except (TypeError, ValueError):
                return f"Row {i}, input {c!r}: {str(row[c])[:40]!r} is not a number."
    return "A value is not a number."


def _first_bad_matrix_value(raw: np.ndarray, order: list[int], names: list[str]) -> str:
    for i, row in enumerate(raw):
        for j in order:
            try:
                float(row[j])
            except (TypeError, ValueError):
                return f"Row {i}, input {names[j]!r}: {str(row[j])[:40]!r} is not a number."
    return "A value is not a number."


def _finite(matrix: np.ndarray, columns: list[str], missing: bool = False) -> np.ndarray:
    bad = np.isinf(matrix) if missing else ~np.isfinite(matrix)
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        value = matrix[i, j]
        raise InputError(f"Row {i}, input {columns[j]!r}: {'missing' if math.isnan(value) else value} is not a "
                         "finite number.")
    return np.ascontiguousarray(matrix)
