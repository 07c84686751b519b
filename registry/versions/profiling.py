"""Reference data profiles: what monitoring's drift checks compare live traffic against.

Per feature: its kind, missing rate and, for numeric features, quantile bin edges (deciles, deduplicated) with the
count of reference values in each bin, plus the two open-ended outer bins ``(-inf, e0)`` and ``[e_last, +inf)``;
for categorical features, the frequencies of the 50 most common values with the rest counted as ``__other__``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

QUANTILES = np.linspace(0.0, 1.0, 11)
MAX_CATEGORIES = 50


class ReferenceDataError(Exception):
    pass


def sniff_table_format(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if head.startswith(b"PAR1"):
        return "parquet"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            raise ReferenceDataError("reference data must be CSV (UTF-8 text) or Parquet") from None
    if not text.strip():
        raise ReferenceDataError("the reference data file is empty")
    if "," not in text.splitlines()[0]:
        raise ReferenceDataError("the reference data's first line is not a CSV header (no commas)")
    return "csv"


def read_table(path: Path, fmt: str) -> Any:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path) if fmt == "parquet" else pacsv.read_csv(path)
    except Exception as exc:
        raise ReferenceDataError(f"the reference data cannot be read as {fmt}: {str(exc)[:300]}") from None


def profile_table(table: Any) -> dict[str, Any]:
    import pyarrow as pa

    rows = table.num_rows
    if rows == 0:
        raise ReferenceDataError("the reference data has a header but no rows")
    features: dict[str, Any] = {}
    for name in table.column_names:
        column = table.column(name)
        missing = column.null_count
        kind_numeric = pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
        if kind_numeric:
            values = column.to_numpy(zero_copy_only=False).astype("float64")
            values = values[~np.isnan(values)]
            if values.size == 0:
                features[name] = {"kind": "numeric", "missing_rate": 1.0, "edges": [], "counts": []}
                continue
            edges = np.unique(np.quantile(values, QUANTILES))
            inner = edges
            counts = np.histogram(values, bins=np.concatenate(([-np.inf], inner, [np.inf])))[0]
            features[name] = {
                "kind": "numeric",
                "missing_rate": missing / rows,
                "edges": inner.tolist(),
                "counts": counts.astype(int).tolist(),
                "mean": float(values.mean()),
                "std": float(values.std()),
                "min": float(values.min()),
                "max": float(values.max()),
            }
        else:
            values = column.cast(pa.string()).to_pylist()
            freq: dict[str, int] = {}
            for v in values:
                if v is not None:
                    freq[v] = freq.get(v, 0) + 1
            top = sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_CATEGORIES]
            kept = dict(top)
            other = sum(freq.values()) - sum(kept.values())
            if other:
                kept["__other__"] = other
            features[name] = {"kind": "categorical", "missing_rate": missing / rows, "frequencies": kept}
    return {"rows": rows, "features": features, "bins": "deciles with open outer bins"}


def profile_file(path: Path, fmt: str) -> dict[str, Any]:
    return profile_table(read_table(path, fmt))
