"""Batch parts for a model whose answer is a record per row (a DataFrame or a dict of columns, issue 32): one
column per key of MLflow's JSON answer in CSV and Arrow parts, refused rows empty in each, and the prediction log
reading the record back. The scorer here computes each row's record itself; the conformance suite runs the same
writer against MLflow's own server (``tests/registry/serving/test_mlflow_conformance.py``)."""

from __future__ import annotations

import csv
import io
from typing import Any

import numpy as np

from registry import tabular


def _records(table: Any) -> tuple[np.ndarray, list[Any], list[tabular.RowError]]:
    """Rows whose x reads as a number get {"label", "score"}; the others are refused, as MLflow refuses them."""
    xs = table.column("x").to_pylist()
    good = np.array([_number(v) is not None for v in xs])
    answers = [{"label": "high" if _number(v) > 1 else "low, or \"none\"", "score": _number(v) * 0.5}  # type: ignore[operator]
               for v in xs if _number(v) is not None]
    errors = [tabular.RowError(i, "x", "not a number") for i in np.flatnonzero(~good)]
    return good, answers, errors


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def test_a_csv_part_gets_one_column_per_key_and_empty_cells_for_refused_rows() -> None:
    data = b"r1,0.5,2\nr2,abc,3\nr3,\"4.5\",1\n"  # a quoted field: the part is rewritten by the csv module
    scored = tabular.score_csv_chunk(data, columns=["row_id", "x", "y"], required=["x", "y"], id_prefix="p",
                                     newline=b"\n", predict=lambda m: [], table_predict=_records)
    assert scored.keys == ["label", "score"]
    rows = list(csv.reader(io.StringIO(scored.output.decode())))
    assert rows == [["r1", "0.5", "2", "low, or \"none\"", "0.25", "p000000"],
                    ["r2", "abc", "3", "", "", "p000001"],
                    ["r3", "4.5", "1", "high", "2.25", "p000002"]]
    plain = tabular.score_csv_chunk(b"r1,0.5,2\nr2,abc,3\n", columns=["row_id", "x", "y"], required=["x", "y"],
                                    id_prefix="p", newline=b"\n", predict=lambda m: [], table_predict=_records)
    assert list(csv.reader(io.StringIO(plain.output.decode()))) == [
        ["r1", "0.5", "2", "low, or \"none\"", "0.25", "p000000"], ["r2", "abc", "3", "", "", "p000001"]]
    logged = tabular.scored_rows(scored.output, fmt="csv", columns=["row_id", "x", "y"], required=["x", "y"],
                                 subject_column="", prediction_column="prediction", id_column="prediction_id",
                                 keys=scored.keys)
    assert logged.ids == ["p000000", "p000002"]
    assert logged.outputs == [{"label": "low, or \"none\"", "score": 0.25}, {"label": "high", "score": 2.25}]


def test_an_arrow_part_gets_typed_columns_named_apart_from_the_inputs() -> None:
    import pyarrow as pa

    table = pa.table({"x": ["0.5", "abc", "4"], "label": ["a", "b", "c"]})  # an input already named "label"
    scored = tabular.score_arrow_chunk(table, required=["x"], id_prefix="p", prediction_name="prediction",
                                       id_name="prediction_id", predict=lambda m: [], table_predict=_records)
    out = tabular.read_ipc(scored.output)
    assert out.column_names == ["x", "label", "label_2", "score", "prediction_id"]
    assert out.column("label_2").to_pylist() == ["low, or \"none\"", None, "high"]
    assert out.column("score").type == pa.float64() and out.column("score").to_pylist() == [0.25, None, 2.0]
    logged = tabular.scored_rows(scored.output, fmt="parquet", columns=["x", "label"], required=["x"],
                                 subject_column="", prediction_column="prediction", id_column="prediction_id",
                                 keys=scored.keys)
    assert logged.outputs == [{"label": "low, or \"none\"", "score": 0.25}, {"label": "high", "score": 2.0}]


def test_a_dict_of_columns_is_read_as_the_rows_records_and_other_answers_stay_as_they_are() -> None:
    assert tabular._records({"a": [1, 2], "b": ["x", "y"]}, 2) == [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]
    assert tabular._records({"a": 1, "b": 2}, 2) == {"a": 1, "b": 2}  # one answer for the request: not rows
    assert tabular._records([1, 2], 2) == [1, 2]
    assert tabular.answer_keys([{"a": 1}, {"a": 2}]) == ["a"] and tabular.answer_keys([1, 2]) == []


def test_text_is_typed_as_the_signature_says_for_mlflows_parquet_reader() -> None:
    import pyarrow as pa

    when = tabular._typed_for_mlflow(pa.chunked_array([pa.array(["2025-03-01T10:30:00"], pa.large_string())]),
                                     "datetime")
    assert when.type == pa.timestamp("ns")
    assert tabular._typed_for_mlflow(pa.chunked_array([pa.array(["1.5"])]), "double").type == pa.float64()
    kept = tabular._typed_for_mlflow(pa.chunked_array([pa.array(["abc"])]), "double")
    assert kept.type == pa.string()  # left for MLflow to refuse, row by row
