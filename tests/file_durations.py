"""Writes tests/file_durations.json (seconds per test file) from a run's JUnit XML report.

    .venv/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder --junitxml=var/run.xml
    .venv/bin/python -m tests.file_durations var/run.xml

The root conftest hands the files to the test processes longest first by these numbers (a file missing from them
weighs a second per test), so they need refreshing only when a file's cost changes a lot.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).with_name("file_durations.json")


def file_of(classname: str) -> str | None:
    """``tests.registry.test_x.TestClass`` -> ``tests/registry/test_x.py`` (the longest dotted prefix that is a file)."""
    parts = classname.split(".")
    for k in range(len(parts), 0, -1):
        candidate = "/".join(parts[:k]) + ".py"
        if (ROOT / candidate).is_file():
            return candidate
    return None


def durations(report: Path) -> dict[str, float]:
    totals: dict[str, float] = {}
    for case in ET.parse(report).getroot().iter("testcase"):  # noqa: S314 - pytest's own report of our run
        path = file_of(case.get("classname", ""))
        if path is not None:
            totals[path] = totals.get(path, 0.0) + float(case.get("time") or 0.0)
    return {path: round(seconds, 1) for path, seconds in sorted(totals.items(), key=lambda kv: -kv[1])}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    found = durations(Path(argv[0]))
    OUT.write_text(json.dumps(found, indent=1) + "\n")
    print(f"{len(found)} files, {sum(found.values()):.0f} s in all, written to {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
