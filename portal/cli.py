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

from portal import demo_env

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

    def download(self, path: str, dest: Path) -> None:
        _download(self.session, self.url + path, dest, self.timeout)


def _download(session: requests.Session, url: str, dest: Path, timeout: float) -> None:
    try:
        with session.get(url, stream=True, timeout=timeout) as response:
            if response.status_code >= 400:
                raise CliError(f"download failed: HTTP {response.status_code}", 1)
            tmp = dest.with_name(dest.name + ".part")
            with open(tmp, "wb") as out:
                for chunk in response.iter_content(CHUNK):
                    out.write(chunk)
            tmp.replace(dest)
    except requests.RequestException as exc:
        raise CliError(f"download failed: {exc}", 2) from None


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
    fields = {k: v for k, v in {"metrics": args.metrics, "sensitive_columns": args.sensitive_columns,
                                "description": args.description,
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


def _wait_deployment(client: Client, deployment: dict[str, Any], seconds: int) -> int:
    deadline = time.monotonic() + seconds
    while deployment["status"] in ("pending", "running"):
        if time.monotonic() > deadline:
            raise CliError(f"deployment still {deployment['status']} after {seconds} s", 1)
        time.sleep(1)
        deployment = client.call("GET", f"/api/v1/deployments/{deployment['id']}/")
    print(f"deployment {deployment['id']}: {deployment['status']}"
          + (f" - {deployment['error']}" if deployment.get("error") else ""))
    return 0 if deployment["status"] == "live" else 1


def _print_promotion(promotion: dict[str, Any]) -> None:
    approved = sum(1 for a in promotion["approvals"] if a["decision"] == "approve")
    print(f"promotion {promotion['id']}: {promotion['model']} v{promotion['version']} to {promotion['target']} "
          f"{promotion['status']} ({approved}/{promotion['approvals_required']} approvals)")
    for gate in promotion["gates"]:
        mark = "pass" if gate["ok"] else ("overridden" if gate["overridden"] else "BLOCKS")
        print(f"  {mark:10} {gate['label']}: {gate['detail']}")


def cmd_promote(client: Client, args: argparse.Namespace) -> int:
    body = {"target": args.to, "reason": args.reason}
    if args.override_reason:
        body["override_reason"] = args.override_reason
    promotion = client.call("POST", f"/api/v1/models/{args.model}/versions/{args.version}/promote", json=body)
    _print_promotion(promotion)
    return 0


def cmd_approve(client: Client, args: argparse.Namespace) -> int:
    promotion = client.call("GET", f"/api/v1/promotions/{args.promotion}/")
    body = {"comment": args.comment or ""}
    if promotion["target"] == "prod" and not args.reject:
        password = os.environ.get("PORTAL_PASSWORD")
        if not password:
            if not sys.stdin.isatty():
                raise CliError("approving a promotion to prod needs your password: set PORTAL_PASSWORD", 2)
            import getpass

            password = getpass.getpass("Your portal password (prod approvals re-authenticate): ")
        body["password"] = password
    action = "reject" if args.reject else "approve"
    promotion = client.call("POST", f"/api/v1/promotions/{args.promotion}/{action}", json=body)
    _print_promotion(promotion)
    if args.wait and promotion.get("deployment"):
        return _wait_deployment(client, promotion["deployment"], args.wait_seconds)
    return 0


def cmd_rollback(client: Client, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"reason": args.reason}
    if args.to_version:
        body["to_version"] = args.to_version
    deployment = client.call("POST", f"/api/v1/models/{args.model}/environments/{args.env}/rollback", json=body)
    print(f"rolling {args.model} {args.env} back to v{deployment['version']}: deployment {deployment['id']}")
    return _wait_deployment(client, deployment, args.wait_seconds) if args.wait else 0


def cmd_deploy(client: Client, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"environment": args.env, "strategy": args.strategy}
    if args.traffic_percent is not None:
        body["traffic_percent"] = args.traffic_percent
    deployment = client.call("POST", f"/api/v1/models/{args.model}/versions/{args.version}/deploy", json=body)
    print(f"deploying {args.model} v{args.version} to {args.env}: deployment {deployment['id']}")
    return _wait_deployment(client, deployment, args.wait_seconds) if args.wait else 0


def cmd_predict(client: Client, args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise CliError(f"{path} is not a file", 2)
    kind = "text/csv" if path.suffix.lower() == ".csv" else "application/json"
    result = client.call("POST", f"/api/v1/serve/{args.model}/{args.env}/invocations", data=path.read_bytes(),
                         headers={"Content-Type": kind})
    import json

    print(json.dumps(result))
    return 0


def cmd_batch(client: Client, args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise CliError(f"{path} is not a file", 2)
    fields = {"model": args.model, "env": args.env}
    for name in ("id_column", "subject_column", "max_error_share"):
        if getattr(args, name) is not None:
            fields[name] = str(getattr(args, name))
    body = MultipartStream(fields, {"file": path}, progress=_progress_printer())
    job = client.call("POST", "/api/v1/batch-jobs/", data=body, headers={"Content-Type": body.content_type},
                      timeout=None)
    print(f"batch job {job['id']}: {job['status']}")
    if not args.wait:
        return 0
    deadline = time.monotonic() + args.wait_seconds
    shown = ""
    while job["status"] in ("queued", "planning", "scoring", "assembling"):
        if time.monotonic() > deadline:
            raise CliError(f"batch job still {job['status']} after {args.wait_seconds} s", 1)
        line = f"{job['status']}: {job['rows_done']:,} of {job['rows_total'] or 0:,} rows"
        if line != shown and sys.stderr.isatty():
            sys.stderr.write(f"\r{line}   ")
            shown = line
        time.sleep(0.5)
        job = client.call("GET", f"/api/v1/batch-jobs/{job['id']}/")
    if shown and sys.stderr.isatty():
        sys.stderr.write("\n")
    print(f"batch job {job['id']}: {job['status']}, {job['rows_done']:,} rows, {job['rows_failed']:,} bad"
          + (f" - {job['error']}" if job.get("error") else ""))
    if job["status"] != "done":
        return 1
    output = Path(args.output or path.with_name(f"{path.stem}-scored{path.suffix}"))
    client.download(f"/api/v1/batch-jobs/{job['id']}/result", output)
    print(f"scored file: {output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="portal", description="Talk to the MLOps portal's API.")
    parser.add_argument("--url", default=os.environ.get("PORTAL_URL") or demo_env.cli_value("PORTAL_URL")
                        or "http://127.0.0.1:8000",
                        help="the portal's address (default: $PORTAL_URL, else the address `make run` wrote to "
                             "var/demo.env, else http://127.0.0.1:8000)")
    parser.add_argument("--token", default=os.environ.get("PORTAL_TOKEN"), help="API token (default: $PORTAL_TOKEN)")
    sub = parser.add_subparsers(dest="command", required=True)
    upload = sub.add_parser("upload", help="upload a model file as a new version")
    upload.add_argument("model")
    upload.add_argument("file")
    upload.add_argument("--reference", help="reference data, CSV or Parquet")
    upload.add_argument("--metrics", help='JSON object, e.g. \'{"auc": 0.91}\'')
    upload.add_argument("--sensitive-columns", help='JSON object, e.g. \'{"age": "personal"}\'')
    upload.add_argument("--description")
    upload.add_argument("--git-commit")
    upload.add_argument("--source")
    upload.add_argument("--mlflow-run-id")
    upload.add_argument("--wait", action="store_true", help="wait until the version is ready or rejected")
    upload.add_argument("--wait-seconds", type=int, default=600)
    upload.set_defaults(handler=cmd_upload)
    promote = sub.add_parser("promote", help="request a promotion to stage or prod")
    promote.add_argument("model")
    promote.add_argument("version", type=int)
    promote.add_argument("--to", required=True, choices=["stage", "prod"])
    promote.add_argument("--reason", required=True)
    promote.add_argument("--override-reason", help="why an incompatible signature may go ahead (audited)")
    promote.set_defaults(handler=cmd_promote)
    approve = sub.add_parser("approve", help="approve (or --reject) a promotion request; prod asks your password "
                             "($PORTAL_PASSWORD or a prompt)")
    approve.add_argument("promotion", help="the request's id")
    approve.add_argument("--comment")
    approve.add_argument("--reject", action="store_true")
    approve.add_argument("--wait", action="store_true", help="follow the deployment the approval starts")
    approve.add_argument("--wait-seconds", type=int, default=600)
    approve.set_defaults(handler=cmd_approve)
    rollback = sub.add_parser("rollback", help="roll an environment back to the previously live version")
    rollback.add_argument("model")
    rollback.add_argument("env", choices=["dev", "stage", "prod"])
    rollback.add_argument("--to-version", type=int)
    rollback.add_argument("--reason", required=True)
    rollback.add_argument("--wait", action="store_true")
    rollback.add_argument("--wait-seconds", type=int, default=600)
    rollback.set_defaults(handler=cmd_rollback)
    deploy = sub.add_parser("deploy", help="deploy a ready version (dev; stage and prod go through promote)")
    deploy.add_argument("model")
    deploy.add_argument("version", type=int)
    deploy.add_argument("--env", default="dev", choices=["dev", "stage", "prod"])
    deploy.add_argument("--strategy", default="replace", choices=["replace", "canary", "shadow"])
    deploy.add_argument("--traffic-percent", type=int)
    deploy.add_argument("--wait", action="store_true")
    deploy.add_argument("--wait-seconds", type=int, default=600)
    deploy.set_defaults(handler=cmd_deploy)
    predict = sub.add_parser("predict", help="score a JSON body (MLflow's protocol) or a CSV file in real time")
    predict.add_argument("model")
    predict.add_argument("env", choices=["dev", "stage", "prod"])
    predict.add_argument("file", help="a .json body or a .csv file with a header")
    predict.set_defaults(handler=cmd_predict)
    batch = sub.add_parser("batch", help="score a CSV or Parquet file as a batch job")
    batch.add_argument("model")
    batch.add_argument("env", choices=["dev", "stage", "prod"])
    batch.add_argument("file")
    batch.add_argument("--id-column")
    batch.add_argument("--subject-column")
    batch.add_argument("--max-error-share", type=float)
    batch.add_argument("--wait", action="store_true", help="follow the job and download the scored file")
    batch.add_argument("--output", help="where to write the scored file (default: FILE-scored.EXT)")
    batch.add_argument("--wait-seconds", type=int, default=3600)
    batch.set_defaults(handler=cmd_batch)
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
