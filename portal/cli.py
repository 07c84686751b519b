"""``portal``: the portal's API for CI pipelines and terminals.

    export PORTAL_URL=https://portal.example.com PORTAL_TOKEN=mlp_...
    portal upload churn model.zip --reference ref.csv --metrics '{"auc": 0.91}' --wait

Exit status: 0 on success, 1 when the portal refused or the version was rejected, 2 on usage or connection errors.
Files are streamed from disk, so a multi-gigabyte upload needs no more memory than a small one.
"""

from __future__ import annotations

import argparse
import mimetypes
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

CHUNK = 1024 * 1024


class CliError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class MultipartStream:
    """A multipart/form-data body generated on the fly from fields and files on disk, with a known length."""

    def __init__(self, fields: dict[str, str], files: dict[str, Path], progress: Any = None) -> None:
        self.boundary = uuid.uuid4().hex
        self.parts: list[tuple[bytes, Path | None]] = []
        for name, value in fields.items():
            head = (f"--{self.boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n"
                    f"{value}\r\n").encode()
            self.parts.append((head, None))
        for name, path in files.items():
            ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            head = (f"--{self.boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; "
                    f"filename=\"{path.name}\"\r\nContent-Type: {ctype}\r\n\r\n").encode()
            self.parts.append((head, path))
        self.tail = f"--{self.boundary}--\r\n".encode()
        self.length = sum(len(h) + ((p.stat().st_size + 2) if p else 0) for h, p in self.parts) + len(self.tail)
        self.progress = progress

    def __len__(self) -> int:
        # requests sends a Content-Length (not chunked encoding) for an iterable that knows its length.
        return self.length

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __iter__(self) -> Iterator[bytes]:
        sent = 0
        for head, path in self.parts:
            yield head
            sent += len(head)
            if path is not None:
                with open(path, "rb") as fh:
                    while chunk := fh.read(CHUNK):
                        yield chunk
                        sent += len(chunk)
                        if self.progress:
                            self.progress(sent, self.length)
                yield b"\r\n"
        yield self.tail


class Client:
    def __init__(self, url: str, token: str, timeout: float = 60) -> None:
        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.headers.update({"Authorization": f"Bearer {token}", "Accept": "application/json",
                                     "User-Agent": "portal-cli/1"})
        self.timeout = timeout

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.session.request(method, self.url + path, timeout=kwargs.pop("timeout", self.timeout),
                                            **kwargs)
        except requests.RequestException as exc:
            raise CliError(f"cannot reach the portal at {self.url}: {exc}", 2) from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400:
            error = (body or {}).get("error", {}) if isinstance(body, dict) else {}
            message = error.get("message") or f"HTTP {response.status_code}"
            findings = (error.get("details") or {}).get("findings") if isinstance(error.get("details"), dict) else None
            if findings:
                message += "".join(f"\n  - {f.get('member') + ': ' if f.get('member') else ''}{f['message']}"
                                   for f in findings if f.get("severity") != "info")
            raise CliError(message, 1)
        return body


def _progress_printer() -> Any:
    if not sys.stderr.isatty():
        return None
    last = [0.0]

    def show(sent: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] > 0.2 or sent == total:
            last[0] = now
            sys.stderr.write(f"\ruploading {sent * 100 // total:3d}% ({sent // 2**20} of {total // 2**20} MB)")
            if sent == total:
                sys.stderr.write("\n")
    return show


def cmd_upload(client: Client, args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise CliError(f"{path} is not a file", 2)
    fields = {k: v for k, v in {"metrics": args.metrics, "description": args.description,
                                "git_commit": args.git_commit, "source": args.source,
                                "mlflow_run_id": args.mlflow_run_id}.items() if v}
    files = {"file": path}
    if args.reference:
        files["reference_data"] = Path(args.reference)
    body = MultipartStream(fields, files, progress=_progress_printer())
    version = client.call("POST", f"/api/v1/models/{args.model}/versions/", data=body,
                          headers={"Content-Type": body.content_type}, timeout=None)
    print(f"{args.model} v{version['number']}: {version['status']} sha256={version['sha256']}")
    if not args.wait:
        return 0
    deadline = time.monotonic() + args.wait_seconds
    while version["status"] == "scanning" and version["scan"]["trust_state"] != "pending":
        if time.monotonic() > deadline:
            raise CliError(f"still scanning after {args.wait_seconds} s", 1)
        time.sleep(1)
        version = client.call("GET", f"/api/v1/models/{args.model}/versions/{version['number']}/")
    print(f"{args.model} v{version['number']}: {version['status']} - {version['status_detail']}")
    return 0 if version["status"] in ("ready", "scanning") else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="portal", description="Talk to the MLOps portal's API.")
    parser.add_argument("--url", default=os.environ.get("PORTAL_URL", "http://127.0.0.1:8000"),
                        help="the portal's address (default: $PORTAL_URL)")
    parser.add_argument("--token", default=os.environ.get("PORTAL_TOKEN"), help="API token (default: $PORTAL_TOKEN)")
    sub = parser.add_subparsers(dest="command", required=True)
    upload = sub.add_parser("upload", help="upload a model file as a new version")
    upload.add_argument("model")
    upload.add_argument("file")
    upload.add_argument("--reference", help="reference data, CSV or Parquet")
    upload.add_argument("--metrics", help='JSON object, e.g. \'{"auc": 0.91}\'')
    upload.add_argument("--description")
    upload.add_argument("--git-commit")
    upload.add_argument("--source")
    upload.add_argument("--mlflow-run-id")
    upload.add_argument("--wait", action="store_true", help="wait until the version is ready or rejected")
    upload.add_argument("--wait-seconds", type=int, default=600)
    upload.set_defaults(handler=cmd_upload)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.token:
        parser.error("no API token: pass --token or set PORTAL_TOKEN (create one on your Account page)")
    try:
        return int(args.handler(Client(args.url, args.token), args))
    except CliError as exc:
        print(f"portal: {exc}", file=sys.stderr)
        return exc.code


if __name__ == "__main__":
    sys.exit(main())
