"""Drift on 1,000,000 rows x 20 numeric features: Evidently's DataDriftPreset against the portal's drift computation,
from raw rows and from rollups, on the same reference and current data, in one run.

    .venv/bin/python bench/drift.py [--rows 1000000] [--repeat 3]

Evidently 0.7.23 needs pandas < 3, so it runs from its own virtualenv (var/bench/evidently-venv, made on first use
with pip from the package registry). Each measurement runs in a fresh process that loads the same Parquet files;
Evidently's time is its drift report once both frames are in memory; the portal's "raw rows" time includes reading
the current file, a row group at a time, as the rollup task streams the prediction log; "rollups" merges 24 hourly rollups
made beforehand and judges them. Memory is each process's peak RSS, data included (median of --repeat). The
portal's reference profile is made once at upload; its cost is printed apart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "var" / "bench" / "drift"
EVIDENTLY_VENV = ROOT / "var" / "bench" / "evidently-venv"
FEATURES = 20

EVIDENTLY = textwrap.dedent("""
    import json, resource, sys, time
    import pandas as pd
    from evidently import Report
    from evidently.presets import DataDriftPreset
    ref = pd.read_parquet(sys.argv[1]); cur = pd.read_parquet(sys.argv[2])
    started = time.perf_counter()
    snapshot = Report([DataDriftPreset()]).run(current_data=cur, reference_data=ref)
    result = snapshot.dict()
    seconds = time.perf_counter() - started
    drifted = [m for m in result["metrics"] if "ValueDrift" in str(m.get("metric_id", ""))]
    print(json.dumps({"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "metrics": len(result["metrics"]), "value_drift": len(drifted)}))
""")

PORTAL = textwrap.dedent("""
    import json, resource, sys, time
    import numpy as np, pyarrow.parquet as pq
    sys.path.insert(0, sys.argv[4])
    from monitoring import drift
    from monitoring.additive import add
    mode, prepared = sys.argv[3], sys.argv[5]
    thresholds = dict(drift.DEFAULT_THRESHOLDS)

    if mode == "prepare":  # what upload and the rollup task did beforehand: the profile, then 24 hourly rollups
        from registry.versions.profiling import profile_table
        started = time.perf_counter()
        profile = profile_table(pq.read_table(sys.argv[1]))["features"]
        profile_seconds = time.perf_counter() - started
        names = list(profile)
        current = pq.read_table(sys.argv[2])
        bounds = np.linspace(0, current.num_rows, 25).astype(int)
        rollups = [{"features": {n: drift.numeric_bins(current.column(n).to_numpy()[lo:hi],
                                                     np.asarray(profile[n]["edges"]))
                                 for n in names}} for lo, hi in zip(bounds, bounds[1:])]
        with open(prepared, "w") as fh:
            json.dump({"profile": profile, "rollups": rollups}, fh)
        print(json.dumps({"seconds": 0.0, "profile_seconds": profile_seconds, "peak_mb": 0.0, "drifted": 0, "flagged": 0}))
        sys.exit(0)
    with open(prepared) as fh:
        stored = json.load(fh)  # the profile as the database holds it (and, for "rollups", the hourly rollups)
    profile = stored["profile"]
    names = list(profile)
    if mode == "raw":  # streamed from the file a row group at a time, as the rollup task reads the log: timed too
        del stored
        started = time.perf_counter()
        edges = {n: np.asarray(profile[n]["edges"]) for n in names}
        totals = {n: np.zeros(len(edges[n]) + 2, dtype=np.int64) for n in names}
        current = pq.ParquetFile(sys.argv[2], pre_buffer=False)
        for group in range(current.num_row_groups):
            table = current.read_row_group(group, columns=names)
            for i, n in enumerate(names):
                totals[n] += drift.numeric_bins(table.column(i).to_numpy(), edges[n])
            del table
        report = [drift.feature_drift(n, profile[n], totals[n].tolist(), thresholds) for n in names]
        seconds = time.perf_counter() - started
    else:  # rollups: merge the 24 hourly rollups and judge
        started = time.perf_counter()
        merged = {}
        for r in stored["rollups"]:
            merged = add(merged, r)
        report = [drift.feature_drift(n, profile[n], merged["features"][n], thresholds) for n in names]
        seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "profile_seconds": 0.0,
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "drifted": sum(f["status"] == "alert" for f in report),
                      "flagged": sum(f["status"] in ("warning", "alert") for f in report)}))
""")


def make_data(rows: int) -> tuple[Path, Path]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    WORK.mkdir(parents=True, exist_ok=True)
    ref_path, cur_path = WORK / f"reference-{rows}-rg64k.parquet", WORK / f"current-{rows}-rg64k.parquet"
    if not cur_path.exists():
        rng = np.random.default_rng(42)
        names = [f"f{i:02d}" for i in range(FEATURES)]
        reference = {n: rng.normal(0, 1, rows // 10) for n in names}
        # Half the features shift (mean +0.5 and wider), half stay as they were.
        current = {n: rng.normal(0.5, 1.3, rows) if i % 2 else rng.normal(0, 1, rows) for i, n in enumerate(names)}
        pq.write_table(pa.table(reference), ref_path, row_group_size=65_536)
        pq.write_table(pa.table(current), cur_path, row_group_size=65_536)
    return ref_path, cur_path


def evidently_python() -> Path:
    python = EVIDENTLY_VENV / "bin" / "python"
    if not python.exists():
        print("making", EVIDENTLY_VENV, "(evidently 0.7.23, pandas < 3) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(EVIDENTLY_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "evidently==0.7.23", "pandas<3"], check=True)
    return python


def run(command: list[str]) -> dict[str, float]:
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    ref, cur = make_data(args.rows)
    evidently = evidently_python()
    results: dict[str, list[dict[str, float]]] = {"evidently": [], "raw": [], "rollups": []}
    prepared = WORK / f"prepared-{args.rows}.json"
    profile_seconds = run([sys.executable, "-c", PORTAL, str(ref), str(cur), "prepare", str(ROOT),
                           str(prepared)])["profile_seconds"]
    for _ in range(args.repeat):  # interleaved, so drift in the machine's load hits all three alike
        results["evidently"].append(run([str(evidently), "-c", EVIDENTLY, str(ref), str(cur)]))
        for mode in ("raw", "rollups"):
            results[mode].append(run([sys.executable, "-c", PORTAL, str(ref), str(cur), mode, str(ROOT),
                                      str(prepared)]))
    med = {k: (statistics.median(r["seconds"] for r in v), statistics.median(r["peak_mb"] for r in v))
           for k, v in results.items()}
    print(f"\n{args.rows:,} current rows x {FEATURES} features (reference {args.rows // 10:,} rows); "
          f"median of {args.repeat}\n")
    print(f"{'':38}{'seconds':>10}{'peak MB':>10}{'speed-up':>10}{'memory':>9}")
    labels = {"evidently": "Evidently DataDriftPreset", "raw": "portal, from raw rows",
              "rollups": "portal, from 24 hourly rollups"}
    for key, label in labels.items():
        seconds, peak = med[key]
        print(f"{label:38}{seconds:10.3f}{peak:10.0f}{med['evidently'][0] / seconds:9.1f}x"
              f"{peak / med['evidently'][1]:8.2f}x")
    print(f"\nportal reference profile (once, at upload, not in the figures above): {profile_seconds:.3f} s")
    for mode in ("raw", "rollups"):
        first = results[mode][0]
        print(f"{mode}: {first['flagged']} of {FEATURES} features flagged (PSI >= 0.1), {first['drifted']} at alert "
              f"(PSI >= 0.25); 10 were shifted (mean +0.5, sd 1.3: PSI about 0.25 on deciles)")
    print("targets: speed-up >= 50x, memory <= 0.25x of Evidently")
    print("all runs:", json.dumps({k: [round(r["seconds"], 3) for r in v] for k, v in results.items()}))


if __name__ == "__main__":
    main()
