#!/usr/bin/env python3
"""Check an audit export of the MLOps portal offline: plain Python and the `cryptography` package, no portal.

    python scripts/verify_export.py audit-export.zip --public-key audit-public-key.pem

Checks, in order: the manifest's Ed25519 signature against the public key; the events file's SHA-256 against the
manifest; every event's hash, recomputed as sha256_hex(prev_hash + canonical_json(event without prev_hash and
hash)); that consecutive events (seq n, n+1) link; and the manifest's count, first and last hash.
Exit status: 0 when all of it holds, 1 when anything does not (the first problem is printed), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import sys
import zipfile
from collections.abc import Iterator
from typing import Any

INT_COLUMNS = ("seq", "action_code")
JSON_COLUMNS = ("before", "after", "metadata")


class Invalid(Exception):
    pass


def canonical_json(document: dict[str, Any]) -> str:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _events(raw: bytes, fmt: str) -> Iterator[dict[str, Any]]:
    text = raw.decode("utf-8")
    if fmt == "jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError as exc:
                    raise Invalid(f"line {number} of the events file is not JSON: {exc}") from None
        return
    for number, row in enumerate(csv.DictReader(io.StringIO(text, newline="")), 2):
        try:
            event: dict[str, Any] = dict(row)
            for column in INT_COLUMNS:
                event[column] = int(event[column])
            for column in JSON_COLUMNS:
                event[column] = json.loads(event[column])
            event["ip"] = event["ip"] or None
        except (KeyError, ValueError, TypeError) as exc:
            raise Invalid(f"row {number} of the events file is malformed: {exc}") from None
        yield event


def verify(path: str, public_key_pem: bytes) -> dict[str, Any]:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = load_pem_public_key(public_key_pem)
    if not isinstance(key, Ed25519PublicKey):
        raise Invalid("the public key is not an Ed25519 key")
    try:
        archive = zipfile.ZipFile(path)
        manifest_bytes = archive.read("manifest.json")
        signature = base64.b64decode(archive.read("manifest.json.sig").strip(), validate=True)
    except (OSError, KeyError, zipfile.BadZipFile, ValueError) as exc:
        raise Invalid(f"not a readable export: {exc}") from None
    try:
        key.verify(signature, manifest_bytes)
    except InvalidSignature:
        raise Invalid("the manifest's signature does not match the public key") from None
    manifest = json.loads(manifest_bytes)
    try:
        raw = archive.read(manifest["events_file"])
    except (KeyError, zipfile.BadZipFile) as exc:
        raise Invalid(f"the events file cannot be read: {exc}") from None
    if hashlib.sha256(raw).hexdigest() != manifest["events_sha256"]:
        raise Invalid("the events file's SHA-256 differs from the manifest's")
    count, first, previous = 0, None, None
    for event in _events(raw, manifest["format"]):
        count += 1
        stored, prev_hash = event.pop("hash"), event.pop("prev_hash")
        recomputed = hashlib.sha256((prev_hash + canonical_json(event)).encode("utf-8")).hexdigest()
        if recomputed != stored:
            raise Invalid(f"event #{event['seq']} was altered: its hash does not match its content")
        if previous is not None and event["seq"] == previous[0] + 1 and prev_hash != previous[1]:
            raise Invalid(f"event #{event['seq']} does not link to event #{previous[0]}")
        if previous is not None and event["seq"] <= previous[0]:
            raise Invalid(f"event #{event['seq']} is out of order")
        first = first or stored
        previous = (event["seq"], stored)
    last = previous[1] if previous else None
    if (count, first, last) != (manifest["count"], manifest["first_hash"], manifest["last_hash"]):
        raise Invalid(f"the events file holds {count} events from {first} to {last}; the manifest says "
                      f"{manifest['count']} from {manifest['first_hash']} to {manifest['last_hash']}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Verify an audit export of the MLOps portal offline.")
    parser.add_argument("export", help="the ZIP from /api/v1/audit/export")
    parser.add_argument("--public-key", required=True, help="PEM file from /api/v1/audit/public-key")
    args = parser.parse_args(argv)
    try:
        with open(args.public_key, "rb") as fh:
            pem = fh.read()
    except OSError as exc:
        print(f"cannot read the public key: {exc}", file=sys.stderr)
        return 2
    try:
        manifest = verify(args.export, pem)
    except Invalid as exc:
        print(f"INVALID: {exc}")
        return 1
    except ValueError as exc:
        print(f"INVALID: {exc}")
        return 1
    print(f"OK: {manifest['count']} events, signature valid, events file matches the manifest "
          f"(chain head at export: #{manifest['chain_head']['seq']} {manifest['chain_head']['hash']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
