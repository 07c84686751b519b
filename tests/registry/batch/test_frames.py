"""A chunk's output written by Arrow over its bytes (no Python per row), its prediction ids built by numpy, and the
conditions under which a chunk's numbers reach an MLflow model's host as one matrix (``tabular.frame_matrix``),
including the one the CSV path rests on: pyarrow reads every decimal text as the same double as pandas' parser,
which MLflow's scoring server reads CSV bodies with."""

from __future__ import annotations

import csv
import io

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from registry import tabular


def _reference_output(data: bytes, cells: list[str], ids: list[str], newline: bytes) -> bytes:
    """The previous implementation, line by line in Python: each input line with ``,cell,id`` appended."""
    lines = data.split(b"\n")
    if lines and not lines[-1].strip(b"\r"):
        lines.pop()
    if newline == b"\r\n":
        lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    return newline.join(line + f",{c},{i}".encode() for line, c, i in zip(lines, cells, ids, strict=True)) + newline


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
@pytest.mark.parametrize("trailing", [True, False])
def test_arrow_appends_the_same_bytes_as_the_line_by_line_writer(newline: bytes, trailing: bool) -> None:
    rng = np.random.default_rng(0)
    rows = [f"c{i},{rng.normal():.17g},{rng.integers(-5, 5)}" for i in range(1000)]
    data = newline.join(r.encode() for r in rows) + (newline if trailing else b"")
    cells = [str(int(v)) for v in rng.integers(0, 3, len(rows))]
    ids = tabular.prediction_ids("ab12", len(rows))
    out = tabular._append_columns(data, pa.array(cells), ids, newline, len(rows))
    assert out == _reference_output(data, cells, ids.to_pylist(), newline)
    parsed = list(csv.reader(io.StringIO(out.decode(), newline="")))
    assert [r[-2:] for r in parsed] == [[c, i] for c, i in zip(cells, ids.to_pylist(), strict=True)]


@pytest.mark.parametrize("data, n", [
    (b"1,2\n\n3,4\n", 2),  # a blank line: pyarrow's rows and the lines do not line up
    (b'1,"a"\n2,"b"\n', 2),  # quotes: the csv module rewrites such a chunk
    (b"1,2\r\n3,4\n", 2),  # line ends mixed in a CRLF file
])
def test_lines_that_do_not_line_up_with_rows_go_to_the_rewriter(data: bytes, n: int) -> None:
    newline = b"\r\n" if b"\r\n" in data else b"\n"
    assert tabular._append_columns(data, pa.array(["0"] * n), tabular.prediction_ids("p", n), newline, n) is None


@pytest.mark.parametrize("prefix, n", [("", 0), ("p", 1), ("0a1b", 70_000), ("x" * 20, 17)])
def test_prediction_ids_are_the_prefix_and_six_hex_digits(prefix: str, n: int) -> None:
    assert tabular.prediction_ids(prefix, n).to_pylist() == [f"{prefix}{i:06x}" for i in range(n)]


def test_scored_cells_are_written_as_before() -> None:
    good = np.ones(3, dtype=bool)
    assert tabular._fast_predictions([1, 0, 2], good).to_pylist() == ["1", "0", "2"]
    assert tabular._fast_predictions([0.5, 1.0, 1e-05], good).to_pylist() == ["0.5", "1.0", "1e-05"]
    assert tabular._fast_predictions(["yes", "no", "a,b"], good).to_pylist() == ["yes", "no", '"a,b"']
    assert tabular._fast_predictions([True, False, True], good).to_pylist() == ["true", "false", "true"]
    some = np.array([True, False, True])
    assert tabular._fast_predictions([1, 2], some).to_pylist() == ["1", "", "2"]


def test_a_frame_is_only_what_mlflow_reads_as_the_same_numbers() -> None:
    table = pa.table({"a": [1.5, 2.0], "b": pa.array([3, 4], pa.int64())})
    assert tabular.frame_matrix(table, ["a", "b"], ["double", "long"]).tolist() == [[1.5, 3.0], [2.0, 4.0]]
    # MLflow's Parquet reader keeps an int64 column, which its schema enforcement refuses for a double column
    assert tabular.frame_matrix(table, ["a", "b"], ["double", "double"]) is None
    assert tabular.frame_matrix(pa.table({"a": [1.5, None]}), ["a"], ["double"]) is None
    assert tabular.frame_matrix(pa.table({"a": [1.5, float("nan")]}), ["a"], ["double"]) is None
    assert tabular.frame_matrix(pa.table({"a": [1.5, float("inf")]}), ["a"], ["double"]) is None
    assert tabular.frame_matrix(pa.table({"b": pa.array([2 ** 53 + 1], pa.int64())}), ["b"], ["long"]) is None
    assert tabular.frame_matrix(pa.table({"a": ["1.5"]}), ["a"], ["double"]) is None


def test_a_chunk_mlflow_would_read_otherwise_goes_to_mlflow() -> None:
    """The frame path declines a chunk with text in a number column or a missing value: MLflow's own scoring code
    (here a stand-in that records what it was sent) gets it, whole, as CSV text."""
    sent: list[int] = []

    def frame_predict(matrix: np.ndarray) -> list[int]:
        sent.append(len(matrix))
        return [1] * len(matrix)

    def table_predict(table: pa.Table) -> tuple[np.ndarray, list[int], list[tabular.RowError]]:
        assert all(pa.types.is_string(t) for t in table.schema.types)
        return np.ones(table.num_rows, dtype=bool), [7] * table.num_rows, []

    for data, expected, framed in ((b"r1,0.5,2\nr2,1.5,3\n", ["1", "1"], [2]),
                                  (b"r1,0.5,2\nr2,abc,3\n", ["7", "7"], []),
                                  (b"r1,0.5,2\nr2,,3\n", ["7", "7"], [])):
        sent.clear()
        scored = tabular.score_csv_chunk(data, columns=["row_id", "x", "y"], required=["x", "y"], id_prefix="p",
                                         newline=b"\n", predict=lambda m: [], table_predict=table_predict,
                                         frame_predict=frame_predict, frame_kinds=["double", "double"])
        assert [r[3] for r in csv.reader(io.StringIO(scored.output.decode()))] == expected
        assert sent == framed


def _texts(rng: np.random.Generator, n: int) -> list[str]:
    """Decimal texts as files carry them: shortest round-trip (Python, pandas, pyarrow writers), 17 significant
    digits, fixed decimals, exponents, integers, tiny and huge magnitudes, subnormals."""
    values = np.concatenate([rng.normal(size=n), rng.normal(scale=1e6, size=n), rng.uniform(-1, 1, n) * 1e-300,
                             np.exp(rng.uniform(-700, 700, n)), rng.standard_cauchy(n)])
    texts = [repr(float(v)) for v in values]
    texts += [f"{v:.17g}" for v in values[: 2 * n]]
    texts += [f"{v:.6f}" for v in values[:n]] + [f"{v:.3e}" for v in values[:n]]
    texts += [str(int(v)) for v in rng.integers(-10 ** 15, 10 ** 15, n)]
    texts += ["5e-324", "2.2250738585072014e-308", "1.7976931348623157e308", "0.1", "-0.0", "9007199254740993"]
    return texts


def test_pyarrow_reads_every_decimal_text_as_pandas_does() -> None:
    """``tabular.CSV_FRAMES``: a CSV chunk's numbers go to an MLflow model's host as pyarrow reads them, where
    MLflow's server would read them with pandas (``read_csv`` with the signature's float64). Simulated on 160,000
    texts of every common shape: the doubles must be the same, bit for bit."""
    import pandas as pd

    texts = _texts(np.random.default_rng(40), 20_000)
    body = ("x\n" + "\n".join(texts) + "\n").encode()
    by_pandas = pd.read_csv(io.BytesIO(body), dtype={"x": "float64"})["x"].to_numpy()
    by_arrow = pacsv.read_csv(io.BytesIO(body), convert_options=pacsv.ConvertOptions(
        column_types={"x": pa.float64()})).column("x").to_numpy()
    differ = np.flatnonzero(by_pandas.view(np.int64) != by_arrow.view(np.int64))
    assert not len(differ), [(texts[i], by_pandas[i], by_arrow[i]) for i in differ[:5]]
