"""``python -m portal_edge``: predict (the default), ``verify`` or ``upload``; run from the package's folder."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

from portal_edge import OUTBOX, PackageError, Runner, fingerprint, public_key_bytes, read_input, store, upload, verify

ROOT = Path(__file__).resolve().parent.parent


def _predict(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m portal_edge", description="Predict with this edge package.")
    parser.add_argument("input", help="a JSON or CSV file of rows (- reads standard input)")
    parser.add_argument("--form", help="fp32 (the default) or int8, where the package has it")
    parser.add_argument("--csv", action="store_true", help="the input is CSV (the default for a .csv file)")
    parser.add_argument("--output", choices=("json", "csv"), default="json")
    parser.add_argument("--outbox", default=os.environ.get("PORTAL_EDGE_OUTBOX", ""),
                        help="where predictions are kept until uploaded (default: outbox/ beside the package)")
    parser.add_argument("--no-store", action="store_true", help="do not keep these predictions for upload")
    args = parser.parse_args(argv)
    text = sys.stdin.read() if args.input == "-" else Path(args.input).read_text(encoding="utf-8")
    try:
        runner = Runner(ROOT, form=args.form)
        rows = read_input(text, runner.columns, csv_input=args.csv or args.input.lower().endswith(".csv"))
        began = time.perf_counter()
        predictions = runner.predict(rows)
        elapsed = time.perf_counter() - began
    except (PackageError, ValueError) as exc:
        print(f"portal_edge: {exc}", file=sys.stderr)
        return 1
    ids: list[str] = []
    if not args.no_store:
        ids = store(Path(args.outbox) if args.outbox else ROOT / OUTBOX, runner.manifest, runner.form["name"], rows,
                    predictions, elapsed)
    if args.output == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["prediction_id", "prediction"])
        for pid, prediction in zip(ids or [""] * len(predictions), predictions, strict=True):
            writer.writerow([pid, prediction])
    else:
        print(json.dumps({"predictions": predictions, "prediction_ids": ids,
                          "model_version": runner.manifest["version"], "form": runner.form["name"]}))
    return 0


def _verify(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m portal_edge verify",
                                     description="Check the manifest's signature and every file's SHA-256, offline.")
    parser.add_argument("--public-key", help="the portal's edge public key (PEM) to trust; without it, the key in "
                                             "the package (compare its fingerprint with the portal's)")
    args = parser.parse_args(argv)
    trusted = Path(args.public_key).read_text() if args.public_key else None
    problems, manifest = verify(ROOT, trusted_key=trusted)
    if problems:
        print("INVALID: " + "; ".join(problems))
        return 1
    key = trusted if trusted is not None else (ROOT / "public_key.pem").read_text()
    print(f"OK: {manifest['model']} version {manifest['version']}, {len(manifest['files'])} files, signed by key "
          f"{fingerprint(public_key_bytes(key))}" + ("" if trusted else " (the package's own key: compare this "
                                                                       "fingerprint with the portal's)"))
    return 0


def _upload(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m portal_edge upload",
                                     description="Send the predictions kept on this device to the portal.")
    parser.add_argument("--url", default=os.environ.get("PORTAL_URL", ""), required=not os.environ.get("PORTAL_URL"))
    parser.add_argument("--token", default=os.environ.get("PORTAL_EDGE_TOKEN", ""),
                        required=not os.environ.get("PORTAL_EDGE_TOKEN"), help="the model's device token (mle_…)")
    parser.add_argument("--outbox", default=os.environ.get("PORTAL_EDGE_OUTBOX", ""))
    args = parser.parse_args(argv)
    try:
        report = upload(ROOT, args.url, args.token, outbox=Path(args.outbox) if args.outbox else None)
    except PackageError as exc:
        print(f"portal_edge: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    if report["error"]:
        print(f"portal_edge: {report['error']}", file=sys.stderr)
        return 3 if report.get("status") == 0 else 1
    return 0


def main(argv: list[str]) -> int:
    if argv and argv[0] == "verify":
        return _verify(argv[1:])
    if argv and argv[0] == "upload":
        return _upload(argv[1:])
    if argv and argv[0] == "predict":
        argv = argv[1:]
    return _predict(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
