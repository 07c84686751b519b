#!/usr/bin/env python3
"""Check an audit export of the MLOps portal offline: plain Python and the `cryptography` package, no portal.

    python scripts/verify_export.py audit-export.zip --public-key audit-public-key.pem [--checkpoints DIR]

Checks, in order: that the ZIP is readable; the manifest's Ed25519 signature against the public key; the events
file's SHA-256 against the manifest; every event's hash, recomputed as sha256_hex(prev_hash + canonical_json(event
without prev_hash and hash)); that consecutive events (seq n, n+1) link; and the manifest's count, first and last
hash. CSV cells that the portal escaped against spreadsheet formula injection (the manifest's `csv_escape`) are
unescaped first.

With `--checkpoints DIR` (the `checkpoints/` folder of the portal's artifact store, copied): every checkpoint's
signature, that they are numbered without gaps and each links to the one before it, that every checkpointed event
inside the export has the hash its checkpoint recorded, and that the export reaches the newest checkpoint written
before it. An export that stops short of it was made from a trail whose newest events had been cut off.
Exit status: 0 when all of it holds, 1 when anything does not (the first problem is printed), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import itertools
import json
import struct
import sys
import zipfile
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

INT_COLUMNS = ("seq", "action_code")
JSON_COLUMNS = ("before", "after", "metadata")


class Invalid(Exception):
    pass


def canonical_json(document: dict[str, Any]) -> str:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _events(raw: bytes, fmt: str, escaped: bool = False) -> Iterator[dict[str, Any]]:
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
            event: dict[str, Any] = _unescape(row) if escaped else dict(row)
            for column in INT_COLUMNS:
                event[column] = int(event[column])
            for column in JSON_COLUMNS:
                event[column] = json.loads(event[column])
            event["ip"] = event["ip"] or None
        except (KeyError, ValueError, TypeError) as exc:
            raise Invalid(f"row {number} of the events file is malformed: {exc}") from None
        yield event


# A ZIP damaged inside a compressed member fails in zlib, or with a short read, or with a nonsense header field.
_UNREADABLE = (OSError, KeyError, ValueError, zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError,
               RuntimeError, OverflowError, struct.error)


def _unescape(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v[1:] if isinstance(v, str) and v.startswith("'") else v for k, v in row.items()}


def verify(path: str, public_key_pem: bytes, *, wanted: frozenset[int] = frozenset()) -> tuple[dict[str, Any],
                                                                                               dict[int, str]]:
    """The manifest of a valid export, and the hashes of its events whose seq is in ``wanted``; Invalid otherwise."""
    from cryptography.exceptions import InvalidSignature

    key = _public_key(public_key_pem)
    try:
        archive = zipfile.ZipFile(path)
        manifest_bytes = archive.read("manifest.json")
        signature = base64.b64decode(archive.read("manifest.json.sig").strip(), validate=True)
    except _UNREADABLE as exc:
        raise Invalid(f"not a readable export: {_say(exc)}") from None
    try:
        key.verify(signature, manifest_bytes)
    except InvalidSignature:
        raise Invalid("the manifest's signature does not match the public key") from None
    try:
        manifest = json.loads(manifest_bytes)
        raw = archive.read(manifest["events_file"])
    except (TypeError, *_UNREADABLE) as exc:
        raise Invalid(f"the events file cannot be read: {_say(exc)}") from None
    if hashlib.sha256(raw).hexdigest() != manifest["events_sha256"]:
        raise Invalid("the events file's SHA-256 differs from the manifest's")
    escaped = manifest["format"] == "csv" and "csv_escape" in manifest
    count, first, previous = 0, None, None
    found: dict[int, str] = {}
    try:
        events = list(_events(raw, manifest["format"], escaped))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise Invalid(f"the events file is not readable text: {_say(exc)}") from None
    for event in events:
        count += 1
        stored, prev_hash = event.pop("hash"), event.pop("prev_hash")
        recomputed = hashlib.sha256((prev_hash + canonical_json(event)).encode("utf-8")).hexdigest()
        if recomputed != stored:
            raise Invalid(f"event #{event['seq']} was altered: its hash does not match its content")
        if previous is not None and event["seq"] == previous[0] + 1 and prev_hash != previous[1]:
            raise Invalid(f"event #{event['seq']} does not link to event #{previous[0]}")
        if previous is not None and event["seq"] <= previous[0]:
            raise Invalid(f"event #{event['seq']} is out of order")
        if event["seq"] in wanted:
            found[event["seq"]] = stored
        first = first or stored
        previous = (event["seq"], stored)
    last = previous[1] if previous else None
    if (count, first, last) != (manifest["count"], manifest["first_hash"], manifest["last_hash"]):
        raise Invalid(f"the events file holds {count} events from {first} to {last}; the manifest says "
                      f"{manifest['count']} from {manifest['first_hash']} to {manifest['last_hash']}")
    return manifest, found


def _say(exc: BaseException) -> str:
    kind = type(exc)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
    return f"{name}: {exc}" if str(exc) else name


def _public_key(pem: bytes) -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise Invalid("the public key is not an Ed25519 key")
    return key


# --- Checkpoints -----------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "mlops-portal-audit-checkpoint/1"
GENESIS = "0" * 64


def load_checkpoints(folder: str, public_key_pem: bytes) -> list[dict[str, Any]]:
    """The checkpoint bodies in ``folder``, by number, each with its ``sha256``; Invalid when one is unreadable,
    not signed by the key, missing from the run of numbers or not linked to the one before it."""
    from cryptography.exceptions import InvalidSignature

    key = _public_key(public_key_pem)
    found: dict[int, dict[str, Any]] = {}
    for path in sorted(Path(folder).glob("*.json")):
        try:
            document = json.loads(path.read_bytes())
            body, signature = document["checkpoint"], base64.b64decode(document["signature"], validate=True)
            if body.get("format") != CHECKPOINT_FORMAT or not isinstance(body.get("number"), int):
                raise ValueError("not a checkpoint of this format")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise Invalid(f"checkpoint file {path.name} is not readable: {_say(exc)}") from None
        data = canonical_json(body).encode("utf-8")
        try:
            key.verify(signature, data)
        except InvalidSignature:
            raise Invalid(f"checkpoint #{body['number']} ({path.name}) is not signed by this public key: it was "
                          f"replaced or forged") from None
        if body["number"] in found:
            raise Invalid(f"checkpoint #{body['number']} is given twice ({path.name})")
        found[body["number"]] = {**body, "sha256": hashlib.sha256(data).hexdigest(), "file": path.name}
    if not found:
        raise Invalid(f"no checkpoint files (*.json) in {folder}")
    numbers = sorted(found)
    for number in range(numbers[0], numbers[-1] + 1):
        if number not in found:
            raise Invalid(f"checkpoint #{number} is missing: the checkpoint chain has a gap between #{number - 1} "
                          f"and the next one given")
        expected = GENESIS if number == 1 else found[number - 1]["sha256"] if number - 1 in found else None
        if expected is not None and found[number]["previous"] != expected:
            raise Invalid(f"checkpoint #{number} does not link to checkpoint #{number - 1}: one was replaced")
    return [found[n] for n in numbers]


def _when(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def check_against_checkpoints(manifest: dict[str, Any], hashes: dict[int, str],
                              checkpoints: list[dict[str, Any]]) -> str:
    """What the checkpoints say about the export: a sentence when it reaches the newest one written before it;
    Invalid when it contradicts one or stops short of it."""
    for checkpoint in checkpoints:
        seq = checkpoint["seq"]
        if seq in hashes and hashes[seq] != checkpoint["head_hash"]:
            raise Invalid(f"event #{seq} in the export differs from checkpoint #{checkpoint['number']} of "
                          f"{checkpoint['time']}: the trail was rewritten at or before it")
    head = manifest["chain_head"]
    made = manifest.get("checkpoint")
    if made:
        given = next((c for c in checkpoints if c["number"] == made["number"]), None)
        if given is None:
            raise Invalid(f"checkpoint #{made['number']}, written at this export, is not among the checkpoints "
                          f"given: it was removed from the store (or the folder is incomplete)")
        if given["sha256"] != made["sha256"]:
            raise Invalid(f"checkpoint #{made['number']} differs from the one written at this export: it was "
                          f"replaced")
    exported_at = _when(manifest["exported_at"])
    before = [c for c in checkpoints if _when(c["time"]) <= exported_at]
    after = len(checkpoints) - len(before)
    later = f"; {after} checkpoint{'s' if after != 1 else ''} written after it" if after else ""
    if not before:
        return f"no checkpoint given precedes the export, so its completeness is not judged{later}"
    latest = before[-1]
    for older, newer in itertools.pairwise(checkpoints):
        if newer["seq"] < older["seq"]:
            raise Invalid(f"the trail went backwards between checkpoint #{older['number']} (event #{older['seq']}) "
                          f"and #{newer['number']} (event #{newer['seq']}): events were cut off in between")
    if head["seq"] < latest["seq"]:
        raise Invalid(f"INCOMPLETE: the export reaches event #{head['seq']}, but checkpoint #{latest['number']} "
                      f"of {latest['time']}, written before it, recorded the trail reaching event #{latest['seq']}: "
                      f"events #{head['seq'] + 1}-#{latest['seq']} were cut off")
    if head["seq"] == latest["seq"] and head["hash"] != latest["head_hash"]:
        raise Invalid(f"the export's chain head differs from checkpoint #{latest['number']} at event #{head['seq']}")
    return (f"reaches the newest checkpoint before it (#{latest['number']} of {latest['time']}, event "
            f"#{latest['seq']}); {len(checkpoints)} checkpoints verified{later}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Verify an audit export of the MLOps portal offline.")
    parser.add_argument("export", help="the ZIP from /api/v1/audit/export")
    parser.add_argument("--public-key", required=True, help="PEM file from /api/v1/audit/public-key")
    parser.add_argument("--checkpoints", metavar="DIR",
                        help="the checkpoints/ folder of the portal's artifact store: also say whether the export "
                             "reaches the newest checkpoint written before it")
    args = parser.parse_args(argv)
    try:
        with open(args.public_key, "rb") as fh:
            pem = fh.read()
    except OSError as exc:
        print(f"cannot read the public key: {exc}", file=sys.stderr)
        return 2
    if args.checkpoints and not Path(args.checkpoints).is_dir():
        print(f"--checkpoints {args.checkpoints}: not a folder", file=sys.stderr)
        return 2
    try:
        checkpoints = load_checkpoints(args.checkpoints, pem) if args.checkpoints else []
        manifest, hashes = verify(args.export, pem, wanted=frozenset(c["seq"] for c in checkpoints))
        anchored = check_against_checkpoints(manifest, hashes, checkpoints) if args.checkpoints else ""
    except Invalid as exc:
        print(f"INVALID: {exc}")
        return 1
    except ValueError as exc:
        print(f"INVALID: {exc}")
        return 1
    except Exception as exc:  # anything else a damaged file can raise: still a verdict, never a traceback
        print(f"INVALID: the export cannot be checked: {_say(exc)}")
        return 1
    print(f"OK: {manifest['count']} events, signature valid, events file matches the manifest "
          f"(chain head at export: #{manifest['chain_head']['seq']} {manifest['chain_head']['hash']})"
          + (f"; {anchored}" if anchored else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
