"""``portal``: the portal's API for CI pipelines and terminals, built on :mod:`portal.client`.

    export PORTAL_URL=https://portal.example.com PORTAL_TOKEN=mlp_...
    portal upload churn model.zip --reference ref.csv --metrics '{"auc": 0.91}' --wait --json

Every command takes ``--json``: stdout then carries exactly one JSON object (``ok``, ``exit_code``, ``outcome``,
the command's result, and ``error`` when refused) and nothing else; messages and progress go to stderr.

Exit status (the same with and without ``--json``):
  0  done
  1  refused or failed (the API's refusal, a rejected version, a failed deployment or batch job, no connection)
  2  usage (bad arguments, a file that is not there, no token)
  3  waiting on a person: a version held for an approver's trust decision, a promotion whose gate blocks or that
     waits for approvals
  4  timed out while the work goes on (``--wait-seconds`` reached; ask again with ``portal status``)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from portal import demo_env
from portal.client import (
    CHUNK,
    BatchJob,
    Deployment,
    Experiment,
    Portal,
    PortalError,
    Promotion,
    Version,
    WaitTimeout,
)
from portal.environments import ENVIRONMENTS

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_WAITING, EXIT_TIMEOUT = 0, 1, 2, 3, 4
COMMANDS = ("register", "list", "status", "download", "upload", "import", "promote", "approve", "rollback",
            "deploy", "predict", "batch", "experiment", "dataset")
# What an experiment's verdict means for a pipeline: done (0), failed (1: a guardrail stopped the challenger, or the
# experiment is invalid), or still going on (4, as other work's status).
EXPERIMENT_EXIT = {"challenger_wins": EXIT_OK, "champion_holds": EXIT_OK, "no_difference": EXIT_OK,
                   "stopped": EXIT_OK, "guardrail": EXIT_FAILED, "invalid": EXIT_FAILED, "running": EXIT_TIMEOUT}


class UsageError(Exception):
    pass


@dataclass
class Outcome:
    """What a command ends with: its exit code, a word for it, what stdout shows a person, and the JSON result."""

    exit_code: int
    outcome: str
    lines: list[str] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    message: str = ""  # to stderr for a person when not done


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


# --- presentation -------------------------------------------------------------------------------------------------

def _version_line(v: Version) -> str:
    held = " (held for an approver's trust decision)" if v.held_for_trust else ""
    return f"{v.model} v{v.number}: {v.status}{held} sha256={v.sha256}" + (
        f" - {v.status_detail}" if v.status_detail and v.status != "scanning" else "")


def _promotion_lines(p: Promotion) -> list[str]:
    lines = [f"promotion {p.id}: {p.model} v{p.version} to {p.target} {p.status} "
             f"({p.approvals_given}/{p.approvals_required} approvals)"]
    for gate in p.gates:
        mark = "pass" if gate.get("ok") else ("overridden" if gate.get("overridden") else "BLOCKS")
        lines.append(f"  {mark:10} {gate.get('label')}: {gate.get('detail')}")
    return lines


def _deployment_line(d: Deployment) -> str:
    return f"deployment {d.id}: {d.model} v{d.version} to {d.environment} {d.status}" + (
        f" - {d.error}" if d.error else "")


def _batch_line(j: BatchJob) -> str:
    return f"batch job {j.id}: {j.status}, {j.rows_done:,} of {j.rows_total:,} rows, {j.rows_failed:,} bad" + (
        f" - {j.error}" if j.error else "")


def _stderr_progress(describe: Callable[[Any], str]) -> Callable[[Any], None]:
    def show(state: Any) -> None:
        print(describe(state), file=sys.stderr, flush=True)
    return show


def _upload_progress() -> Callable[[int, int], None] | None:
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


def _existing_file(value: str | None, what: str) -> Path | None:
    if value is None:
        return None
    path = Path(value)
    if not path.is_file():
        raise UsageError(f"{what} {value!r} is not a file" + (" (no such path)" if not path.exists() else ""))
    return path


def _json_object(value: str | None, what: str) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} is not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(parsed, dict):
        raise UsageError(f'{what} must be a JSON object such as {{"auc": 0.91}}')
    return parsed


# --- outcomes of the things a command waits for ---------------------------------------------------------------------

def _version_outcome(v: Version) -> Outcome:
    result = {"version": v.raw}
    if v.status == "ready":
        return Outcome(EXIT_OK, "ready", [_version_line(v)], result)
    if v.status == "rejected":
        return Outcome(EXIT_FAILED, "rejected", [_version_line(v)], result,
                       f"{v.model} v{v.number} was rejected: {v.status_detail}")
    if v.held_for_trust:
        return Outcome(EXIT_WAITING, "held_for_trust", [_version_line(v)], result,
                       f"{v.model} v{v.number} waits for an approver to decide on trust: {v.status_detail}")
    return Outcome(EXIT_OK, v.status, [_version_line(v)], result)


def _deployment_outcome(d: Deployment) -> Outcome:
    return _work_outcome("deployment", d.id, d.status, d.error, _deployment_line(d), {"deployment": d.raw},
                         failed=("failed", "retired"))


def _work_outcome(kind: str, ident: Any, status: str, error: str, line: str, result: dict[str, Any], *,
                  failed: tuple[str, ...]) -> Outcome:
    """A deployment's or a batch job's state as an outcome: 1 in a failed state (saying why), else 0 and its state."""
    if status in failed:
        return Outcome(EXIT_FAILED, status, [line], result, f"{kind} {ident} {status}" + (f": {error}" if error else ""))
    return Outcome(EXIT_OK, status, [line], result)


def _promotion_outcome(p: Promotion, *, waited: bool) -> Outcome:
    result = {"promotion": p.raw}
    lines = _promotion_lines(p)
    if p.status == "live":
        return Outcome(EXIT_OK, "live", lines, result)
    if p.status in ("rejected", "cancelled", "failed"):
        return Outcome(EXIT_FAILED, p.status, lines, result, f"promotion {p.id} {p.status}")
    if p.blocking_gates:
        return Outcome(EXIT_WAITING, "gate_blocks", lines, result,
                       f"promotion {p.id}: {', '.join(g.get('label', '?') for g in p.blocking_gates)} blocks; "
                       "a person has to act before it can go ahead")
    if p.status == "pending" and waited:
        return Outcome(EXIT_WAITING, "awaiting_approval", lines, result,
                       f"promotion {p.id} waits for approvals ({p.approvals_given}/{p.approvals_required})")
    return Outcome(EXIT_OK, p.status, lines, result)


def _timed_out(exc: WaitTimeout, outcome: Outcome) -> Outcome:
    """A wait's deadline: a person is still needed (3), or the work goes on by itself (4)."""
    if outcome.exit_code in (EXIT_WAITING, EXIT_FAILED):
        return outcome
    outcome.exit_code, outcome.outcome = EXIT_TIMEOUT, "timed_out"
    outcome.message = f"timed out: {exc}; the work goes on (follow it with `portal status`)"
    return outcome


# --- commands ---------------------------------------------------------------------------------------------------

def cmd_register(portal: Portal, args: argparse.Namespace) -> Outcome:
    model = portal.register(args.name, team=args.team, description=args.description or "", tags=args.tag)
    return Outcome(EXIT_OK, "registered", [f"registered {model.name} for team {model.team}"], {"model": model.raw})


def cmd_list(portal: Portal, args: argparse.Namespace) -> Outcome:
    if args.model:
        detail = portal.model(args.model)
        versions = detail.get("versions", [])
        lines = [f"v{v['number']:<4} {v.get('status', ''):9} {v.get('format', ''):8} {v.get('created_at', '')}"
                 for v in versions]
        return Outcome(EXIT_OK, "listed", lines or [f"{args.model} has no versions yet"],
                       {"model": args.model, "versions": versions})
    models = portal.models(search=args.search or "", team=args.team or "")
    lines = [f"{m.name:30} {m.team:15} {m.description[:60]}" for m in models]
    return Outcome(EXIT_OK, "listed", lines or ["no models"], {"models": [m.raw for m in models]})


def cmd_status(portal: Portal, args: argparse.Namespace) -> Outcome:
    if args.promotion:
        outcome = _promotion_outcome(portal.promotion(args.promotion), waited=True)
        return _running(outcome) if outcome.outcome in ("approved", "deploying") else outcome
    if args.deployment:
        outcome = _deployment_outcome(portal.deployment(args.deployment))
        return outcome if outcome.outcome not in ("pending", "running") else _running(outcome)
    if args.batch_job:
        job = portal.batch_job(args.batch_job)
        outcome = _batch_outcome(job)
        return outcome if job.status in ("done", "failed", "cancelled") else _running(outcome)
    if not args.model:
        raise UsageError("portal status: name a MODEL [VERSION], or --promotion, --deployment or --batch-job ID")
    if args.version is not None:
        outcome = _version_outcome(portal.version(args.model, args.version))
        return _running(outcome) if outcome.outcome == "scanning" else outcome
    detail = portal.model(args.model)
    lines = [f"{args.model} (team {detail.get('team')})"]
    for env, state in (detail.get("environments") or {}).items():
        champion = state.get("champion")
        lines.append(f"  {env:5} " + (f"v{champion}" if champion is not None else "nothing served")
                     + (f", challenger v{state['challenger']} ({state.get('mode')}, {state.get('challenger_percent')}%)"
                        if state.get("challenger") else ""))
    versions = detail.get("versions") or []
    if versions:
        lines.append(f"  latest v{versions[0]['number']}: {versions[0].get('status')}")
    return Outcome(EXIT_OK, "status", lines, {"model": detail})


def _running(outcome: Outcome) -> Outcome:
    """``status`` of work still going on exits 4, as a wait that ends before the work does."""
    outcome.exit_code, outcome.message = EXIT_TIMEOUT, f"still {outcome.outcome}; the work goes on"
    return outcome


def cmd_download(portal: Portal, args: argparse.Namespace) -> Outcome:
    if args.batch_job:
        which = "errors" if args.errors else "result"
        dest = Path(args.output or f"batch-{args.batch_job}-{which}")
        getter = portal.download_batch_errors if args.errors else portal.download_batch_result
        path = getter(args.batch_job, dest)
    else:
        if not args.model or args.version is None:
            raise UsageError("portal download: name MODEL VERSION, or --batch-job ID")
        path = portal.download_artifact(args.model, args.version, Path(args.output or f"{args.model}-v{args.version}"))
    return Outcome(EXIT_OK, "downloaded", [f"wrote {path}"],
                   {"path": str(path), "bytes": path.stat().st_size, "sha256": _sha256_of(path)})


def _wait_version(portal: Portal, v: Version, args: argparse.Namespace) -> Outcome:
    outcome = _version_outcome(v)
    if not args.wait or outcome.exit_code != EXIT_OK or v.status != "scanning":
        return outcome
    try:
        v = portal.wait_version(v, timeout=args.wait_seconds,
                                progress=_stderr_progress(lambda s: f"{s.model} v{s.number}: {s.status}"))
    except WaitTimeout as exc:
        return _timed_out(exc, _version_outcome(exc.last))
    final = _version_outcome(v)
    final.lines = [*outcome.lines, *final.lines]
    return final


def cmd_upload(portal: Portal, args: argparse.Namespace) -> Outcome:
    path = _existing_file(args.file, "model file")
    reference = _existing_file(args.reference, "--reference file")
    assert path is not None
    v = portal.upload(args.model, path, reference=reference, metrics=_json_object(args.metrics, "--metrics"),
                      sensitive_columns=_json_object(args.sensitive_columns, "--sensitive-columns"),
                      description=args.description or "", git_commit=args.git_commit or "",
                      source=args.source or "", mlflow_run_id=args.mlflow_run_id or "",
                      trained_on=args.trained_on or [], progress=_upload_progress())
    return _wait_version(portal, v, args)


def cmd_import(portal: Portal, args: argparse.Namespace) -> Outcome:
    v = portal.import_mlflow(args.model, args.uri)
    outcome = _wait_version(portal, v, args)
    if v.raw.get("duplicate_of_existing"):
        print(f"{args.uri} is already in the registry as {v.model} v{v.number}; no new version was made",
              file=sys.stderr)
        outcome.result["duplicate_of_existing"] = True
    return outcome


def _dataset_outcome(snapshot: dict[str, Any]) -> Outcome:
    line = (f"snapshot {snapshot['id']} of {snapshot['model']} {snapshot['environment']}: {snapshot['status']}, "
            f"{snapshot['rows_done']} of {snapshot['rows_expected']} rows"
            + (f", sha256 {snapshot['sha256']}" if snapshot.get("sha256") else ""))
    return _work_outcome("snapshot", snapshot["id"], snapshot["status"], snapshot.get("error") or "", line,
                         {"snapshot": snapshot}, failed=("failed",))


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def cmd_dataset(portal: Portal, args: argparse.Namespace) -> Outcome:
    """``dataset create MODEL --env E --from T --to T``, ``dataset status ID``, ``dataset download ID``."""
    if args.action == "create":
        if not (args.env and args.start and args.end):
            raise UsageError("portal dataset create MODEL --env ENV --from ISO-TIME --to ISO-TIME")
        sensitive: dict[str, str] = {}
        for item in args.sensitive or []:
            column, _, how = item.partition("=")
            if how not in ("dropped", "masked", "encrypted"):
                raise UsageError(f"--sensitive {item!r}: say COLUMN=dropped, COLUMN=masked or COLUMN=encrypted")
            sensitive[column] = how
        snapshot = portal.dataset_create(args.target, args.env, start=args.start, end=args.end, version=args.version,
                                         labelled_only=not args.all_rows, sensitive=sensitive)
        if not args.wait:
            print(f"snapshot {snapshot['id']} asked for; follow it with `portal dataset status {snapshot['id']}`",
                  file=sys.stderr)
            return _dataset_outcome(snapshot)
        try:
            snapshot = portal.wait_dataset(snapshot, timeout=args.wait_seconds, progress=_stderr_progress(
                lambda s: f"snapshot {s['id']}: {s['status']}, {s['rows_done']:,} of {s['rows_expected']:,} rows"))
        except WaitTimeout as exc:
            return _timed_out(exc, _dataset_outcome(exc.last))
        return _dataset_outcome(snapshot)
    if args.action == "status":
        outcome = _dataset_outcome(portal.dataset(args.target))
        return _running(outcome) if outcome.outcome in ("pending", "running") else outcome
    snapshot = portal.dataset(args.target)
    if snapshot["status"] != "ready":
        return _dataset_outcome(snapshot) if snapshot["status"] == "failed" else _running(_dataset_outcome(snapshot))
    path = portal.download_dataset(args.target, Path(args.output or f"{snapshot['model']}-{snapshot['environment']}-"
                                                                   f"{snapshot['sha256'][:12]}.parquet"))
    digest = _sha256_of(path)
    if digest != snapshot["sha256"]:
        return Outcome(EXIT_FAILED, "failed", [], {"path": str(path), "sha256": digest},
                       f"the downloaded file's SHA-256 {digest} is not the snapshot's {snapshot['sha256']}")
    return Outcome(EXIT_OK, "downloaded", [f"wrote {path}"], {"path": str(path), "bytes": path.stat().st_size,
                                                              "sha256": digest, "snapshot": snapshot})


def cmd_mlflow(portal: Portal, args: argparse.Namespace) -> Outcome:
    connection = portal.mlflow_connect(args.tracking_uri, team=args.team, write_back=not args.no_write_back,
                                       portal_url=args.portal_url or "")
    lines = [f"connected team {connection['team']} to {connection['tracking_uri']} (MLflow webhook "
             f"{connection['webhook_id']}); new versions there are imported"
             + ("; versions live in dev, stage and prod get those aliases there" if connection["write_back"] else "")]
    return Outcome(EXIT_OK, "connected", lines, {"connection": connection})


def _wait_deployment(portal: Portal, d: Deployment, args: argparse.Namespace) -> Outcome:
    outcome = _deployment_outcome(d)
    if not args.wait or d.status not in ("pending", "running"):
        return outcome
    try:
        d = portal.wait_deployment(d, timeout=args.wait_seconds,
                                   progress=_stderr_progress(lambda s: f"deployment {s.id}: {s.status} {s.progress}%"))
    except WaitTimeout as exc:
        return _timed_out(exc, _deployment_outcome(exc.last))
    return _deployment_outcome(d)


def cmd_deploy(portal: Portal, args: argparse.Namespace) -> Outcome:
    d = portal.deploy(args.model, args.version, env=args.env, strategy=args.strategy,
                      traffic_percent=args.traffic_percent)
    return _wait_deployment(portal, d, args)


def cmd_rollback(portal: Portal, args: argparse.Namespace) -> Outcome:
    d = portal.rollback(args.model, args.env, reason=args.reason, to_version=args.to_version)
    print(f"rolling {args.model} {args.env} back to v{d.version}: deployment {d.id}", file=sys.stderr)
    return _wait_deployment(portal, d, args)


def _wait_promotion(portal: Portal, p: Promotion, args: argparse.Namespace) -> Outcome:
    if not args.wait:
        return _promotion_outcome(p, waited=False)
    try:
        p = portal.wait_promotion(p, timeout=args.wait_seconds, progress=_stderr_progress(
            lambda s: f"promotion {s.id}: {s.status} ({s.approvals_given}/{s.approvals_required} approvals)"))
    except WaitTimeout as exc:
        return _timed_out(exc, _promotion_outcome(exc.last, waited=True))
    return _promotion_outcome(p, waited=True)


def cmd_promote(portal: Portal, args: argparse.Namespace) -> Outcome:
    p = portal.promote(args.model, args.version, target=args.to, reason=args.reason,
                       override_reason=args.override_reason or "")
    return _wait_promotion(portal, p, args)


def cmd_approve(portal: Portal, args: argparse.Namespace) -> Outcome:
    password = ""
    if not args.reject and portal.promotion(args.promotion).target == "prod":
        password = os.environ.get("PORTAL_PASSWORD", "")
        if not password:
            if not sys.stdin.isatty():
                raise UsageError("approving a promotion to prod needs your password: set PORTAL_PASSWORD")
            import getpass

            password = getpass.getpass("Your portal password (prod approvals re-authenticate): ")
    p = portal.decide(args.promotion, approve=not args.reject, comment=args.comment or "", password=password)
    return _wait_promotion(portal, p, args)


def cmd_predict(portal: Portal, args: argparse.Namespace) -> Outcome:
    path = _existing_file(args.file, "input file")
    assert path is not None
    kind = "text/csv" if path.suffix.lower() == ".csv" else "application/json"
    answer = portal.predict(args.model, args.env, path.read_bytes(), content_type=kind)
    return Outcome(EXIT_OK, "scored", [json.dumps(answer)], answer)


def _batch_outcome(job: BatchJob) -> Outcome:
    return _work_outcome("batch job", job.id, job.status, job.error, _batch_line(job), {"batch_job": job.raw},
                         failed=("failed", "cancelled"))


def cmd_batch(portal: Portal, args: argparse.Namespace) -> Outcome:
    if args.output and not args.wait:
        raise UsageError("portal batch: --output needs --wait (without it nothing is downloaded; fetch the file "
                         "later with `portal download --batch-job ID --output FILE`)")
    path = _existing_file(args.file, "input file")
    assert path is not None
    job = portal.batch(args.model, args.env, path, id_column=args.id_column or "",
                       subject_column=args.subject_column or "", max_error_share=args.max_error_share,
                       progress=_upload_progress())
    if not args.wait:
        print(f"batch job {job.id} queued; follow it with `portal status --batch-job {job.id}`", file=sys.stderr)
        return _batch_outcome(job)
    try:
        job = portal.wait_batch(job, timeout=args.wait_seconds, progress=_stderr_progress(
            lambda s: f"batch job {s.id}: {s.status}, {s.rows_done:,} of {s.rows_total:,} rows"))
    except WaitTimeout as exc:
        return _timed_out(exc, _batch_outcome(exc.last))
    outcome = _batch_outcome(job)
    if job.status != "done":
        return outcome
    output = Path(args.output or path.with_name(f"{path.stem}-scored{path.suffix}"))
    portal.download_batch_result(job.id, output)
    outcome.result["output"] = str(output)
    outcome.lines.append(f"scored file: {output}")
    if job.rows_failed:
        errors = output.with_name(f"{output.stem}-errors.csv")
        portal.download_batch_errors(job.id, errors)
        outcome.result["errors_file"] = str(errors)
        outcome.lines.append(f"errors file: {errors}")
        print(f"{job.rows_failed:,} rows could not be scored: see {errors}", file=sys.stderr)
    return outcome


def _experiment_outcome(e: Experiment) -> Outcome:
    line = f"experiment {e.id} ({e.model} {e.environment}): {e.verdict}. {e.sentence}"
    lines = [line] + ([f"promotion request {e.promotion} opened"] if e.promotion else [])
    segments = (e.raw.get("analysis") or {}).get("segments")
    if segments:
        lines.append(f"per segment of {segments['column']}: {segments['caveat']}")
        lines.extend(f"  {row['label']}: {row['champion']['outcomes']:,} and {row['challenger']['outcomes']:,} "
                     f"outcomes; {row['sentence']}" for row in segments["rows"])
    code = EXPERIMENT_EXIT.get(e.verdict, EXIT_OK)
    message = {EXIT_FAILED: e.sentence, EXIT_TIMEOUT: "still running; ask again with portal experiment status"}.get(
        code, "")
    return Outcome(code, e.verdict, lines, {"experiment": e.raw}, message)


def cmd_experiment(portal: Portal, args: argparse.Namespace) -> Outcome:
    if args.action == "start":
        if not args.model or not args.env or args.metric is None or args.mde is None:
            raise UsageError("portal experiment start MODEL ENV --metric M --mde X [--alpha A] [--traffic-percent P] "
                             "[--segment COLUMN]")
        e = portal.start_experiment(args.model, args.env, metric=args.metric, mde=args.mde, alpha=args.alpha,
                                    traffic_percent=args.traffic_percent,
                                    guardrails=_json_object(args.guardrails, "--guardrails"), name=args.name or "",
                                    segment_column=args.segment or "")
        outcome = _experiment_outcome(e)
        outcome.exit_code, outcome.outcome, outcome.message = EXIT_OK, "started", ""
        outcome.lines = [f"started experiment {e.id}: {e.raw.get('planned_sample')} outcomes per side planned",
                         *outcome.lines[1:]]
        return outcome
    if not args.model:
        raise UsageError(f"portal experiment {args.action} ID")
    if args.action == "traffic":
        if args.traffic_percent is None:
            raise UsageError("portal experiment traffic ID --traffic-percent P")
        e = portal.experiment_traffic(args.model, args.traffic_percent)
        outcome = _experiment_outcome(e)
        outcome.exit_code, outcome.outcome, outcome.message = EXIT_OK, "traffic_changed", ""
        outcome.lines = [f"experiment {e.id}: the challenger now gets {e.raw.get('traffic_percent')} % of traffic",
                         *outcome.lines]
        return outcome
    if args.action == "stop":
        e = portal.stop_experiment(args.model, reason=args.reason or "", stop_traffic=args.stop_traffic)
        outcome = _experiment_outcome(e)
        outcome.exit_code, outcome.message = EXIT_OK, ""
        return outcome
    e = portal.experiment(args.model)
    if args.wait and e.status == "running":
        try:
            e = portal.wait_experiment(e, timeout=args.wait_seconds, progress=_stderr_progress(
                lambda x: f"{x.verdict}: {x.sentence}"))
        except WaitTimeout as exc:
            return _timed_out(exc, _experiment_outcome(exc.last))
    return _experiment_outcome(e)


# --- the parser ---------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print exactly one JSON object on stdout (messages stay on stderr)")
    parser = Parser(prog="portal", description="Talk to the MLOps portal's API.", parents=[common],
                    epilog="Exit status: 0 done, 1 refused or failed, 2 usage, 3 waiting on a person (held for "
                           "trust, a blocking gate, approvals), 4 timed out while the work goes on.")
    parser.add_argument("--url", default=os.environ.get("PORTAL_URL") or demo_env.cli_value("PORTAL_URL")
                        or "http://127.0.0.1:8000",
                        help="the portal's address (default: $PORTAL_URL, else the address `make run` wrote to "
                             "var/demo.env, else http://127.0.0.1:8000)")
    parser.add_argument("--token", default=os.environ.get("PORTAL_TOKEN"), help="API token (default: $PORTAL_TOKEN)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds each request may take (default 60)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def command(name: str, handler: Callable[[Portal, argparse.Namespace], Outcome], help: str,
                wait_seconds: int | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, parents=[common])
        p.set_defaults(handler=handler)
        if wait_seconds is not None:
            p.add_argument("--wait", action="store_true", help="follow the work to its end")
            p.add_argument("--wait-seconds", type=int, default=wait_seconds,
                           help=f"give up waiting after this long, exit 4 (default {wait_seconds})")
        return p

    register = command("register", cmd_register, "register a new model")
    register.add_argument("name")
    register.add_argument("--team", required=True, help="the team's slug")
    register.add_argument("--description")
    register.add_argument("--tag", action="append", help="a tag (repeatable)")
    listing = command("list", cmd_list, "list your teams' models, or one model's versions")
    listing.add_argument("model", nargs="?")
    listing.add_argument("--search")
    listing.add_argument("--team")
    status = command("status", cmd_status, "a model, a version, a promotion, a deployment or a batch job now "
                     "(exit 3 waiting on a person, 4 still going on)")
    status.add_argument("model", nargs="?")
    status.add_argument("version", nargs="?", type=int)
    status.add_argument("--promotion")
    status.add_argument("--deployment")
    status.add_argument("--batch-job")
    download = command("download", cmd_download, "download a version's artifact, or a batch job's result or errors")
    download.add_argument("model", nargs="?")
    download.add_argument("version", nargs="?", type=int)
    download.add_argument("--batch-job")
    download.add_argument("--errors", action="store_true", help="the batch job's errors file, not its result")
    download.add_argument("--output", "-o", help="where to write it")
    upload = command("upload", cmd_upload, "upload a model file as a new version", 600)
    upload.add_argument("model")
    upload.add_argument("file")
    upload.add_argument("--reference", help="reference data, CSV or Parquet")
    upload.add_argument("--metrics", help='JSON object, e.g. \'{"auc": 0.91}\'')
    upload.add_argument("--sensitive-columns", help='JSON object, e.g. \'{"age": "personal"}\'')
    upload.add_argument("--description")
    upload.add_argument("--git-commit")
    upload.add_argument("--source")
    upload.add_argument("--mlflow-run-id")
    upload.add_argument("--trained-on", action="append", metavar="SNAPSHOT",
                        help="a dataset snapshot (id or SHA-256) the version was trained on (repeatable)")
    imported = command("import", cmd_import, "import a version from the portal's MLflow tracking server", 600)
    imported.add_argument("model")
    imported.add_argument("uri", help="models:/NAME/VERSION, models:/NAME@ALIAS, models:/NAME/latest, "
                          "models:/m-… (an MLflow 3 logged model) or runs:/RUN_ID/PATH")
    mlflow = command("mlflow", cmd_mlflow, "connect a team to an MLflow tracking server: `portal mlflow connect "
                     "TRACKING_URI --team T` registers the portal's webhook there (team managers)")
    mlflow.add_argument("action", choices=["connect"])
    mlflow.add_argument("tracking_uri", help="the tracking server, e.g. http://mlflow:5000")
    mlflow.add_argument("--team", required=True, help="the team's slug")
    mlflow.add_argument("--no-write-back", action="store_true",
                        help="do not set dev/stage/prod aliases and approval tags in MLflow")
    mlflow.add_argument("--portal-url", help="the portal's address as the tracking server reaches it "
                                             "(default: the portal's PORTAL_BASE_URL)")
    promote = command("promote", cmd_promote, "request a promotion to stage or prod (--wait: until live)", 600)
    promote.add_argument("model")
    promote.add_argument("version", type=int)
    promote.add_argument("--to", required=True, choices=["stage", "prod"])
    promote.add_argument("--reason", required=True)
    promote.add_argument("--override-reason", help="why an incompatible signature may go ahead (audited)")
    approve = command("approve", cmd_approve, "approve (or --reject) a promotion request; prod asks your password "
                      "($PORTAL_PASSWORD or a prompt)", 600)
    approve.add_argument("promotion", help="the request's id")
    approve.add_argument("--comment")
    approve.add_argument("--reject", action="store_true")
    rollback = command("rollback", cmd_rollback, "roll an environment back to the previously live version", 600)
    rollback.add_argument("model")
    rollback.add_argument("env", choices=ENVIRONMENTS)
    rollback.add_argument("--to-version", type=int)
    rollback.add_argument("--reason", required=True)
    deploy = command("deploy", cmd_deploy, "deploy a ready version (dev; stage and prod go through promote)", 600)
    deploy.add_argument("model")
    deploy.add_argument("version", type=int)
    deploy.add_argument("--env", default="dev", choices=ENVIRONMENTS)
    deploy.add_argument("--strategy", default="replace", choices=["replace", "canary", "shadow"])
    deploy.add_argument("--traffic-percent", type=int)
    predict = command("predict", cmd_predict, "score a JSON body (MLflow's protocol) or a CSV file in real time")
    predict.add_argument("model")
    predict.add_argument("env", choices=ENVIRONMENTS)
    predict.add_argument("file", help="a .json body or a .csv file with a header")
    batch = command("batch", cmd_batch, "score a CSV or Parquet file as a batch job (--wait: download the scored "
                    "file, and the errors file when rows failed)", 3600)
    batch.add_argument("model")
    batch.add_argument("env", choices=ENVIRONMENTS)
    batch.add_argument("file")
    batch.add_argument("--id-column")
    batch.add_argument("--subject-column")
    batch.add_argument("--max-error-share", type=float)
    batch.add_argument("--output", help="where --wait writes the scored file (default: FILE-scored.EXT)")
    experiment = command("experiment", cmd_experiment, "A/B experiments: start MODEL ENV, status ID (--wait: until "
                         "a verdict; exit 0 a verdict, 1 stopped by a guardrail or invalid, 4 still running), "
                         "traffic ID --traffic-percent P (the challenger's new share), stop ID",
                         7 * 24 * 3600)
    experiment.add_argument("action", choices=["start", "status", "traffic", "stop"])
    experiment.add_argument("model", nargs="?", help="start: the model; status and stop: the experiment's id")
    experiment.add_argument("env", nargs="?", choices=ENVIRONMENTS)
    experiment.add_argument("--metric", choices=["accuracy", "log_loss", "mae", "outcome"])
    experiment.add_argument("--mde", type=float, help="minimum detectable effect in the metric's units")
    experiment.add_argument("--alpha", type=float, default=0.05)
    experiment.add_argument("--traffic-percent", type=int, help="the challenger's share, 1-99 (start, traffic)")
    experiment.add_argument("--segment", help="start: a categorical input column to analyse per segment")
    experiment.add_argument("--guardrails", help='JSON object, e.g. \'{"error_rate_max": 0.02}\'')
    experiment.add_argument("--name")
    experiment.add_argument("--reason", help="stop: why")
    experiment.add_argument("--stop-traffic", action="store_true", help="stop: send all traffic back to the champion")
    dataset = command("dataset", cmd_dataset, "cut a training set from production (create), follow it (status), "
                      "fetch it (download, SHA-256 checked)", 3600)
    dataset.add_argument("action", choices=["create", "status", "download"])
    dataset.add_argument("target", help="create: the MODEL; status, download: the snapshot's id")
    dataset.add_argument("--env", choices=ENVIRONMENTS)
    dataset.add_argument("--version", type=int, help="one version (default: every version in the window)")
    dataset.add_argument("--from", dest="start", help="window start, ISO 8601 with a zone")
    dataset.add_argument("--to", dest="end", help="window end (exclusive)")
    dataset.add_argument("--all-rows", action="store_true", help="also predictions without ground truth")
    dataset.add_argument("--sensitive", action="append", metavar="COLUMN=HOW",
                         help="dropped, masked or encrypted for a sensitive column (repeatable)")
    dataset.add_argument("--output", "-o", help="download: where to write it")
    return parser


def _emit(as_json: bool, command: str, outcome: Outcome, error: dict[str, Any] | None = None) -> int:
    if as_json:
        body = {"ok": outcome.exit_code == EXIT_OK, "exit_code": outcome.exit_code, "outcome": outcome.outcome,
                "command": command, **outcome.result}
        if error is not None or outcome.message:
            body["error"] = error or {"status": None, "code": outcome.outcome, "message": outcome.message,
                                      "details": None}
        sys.stdout.write(json.dumps(body, default=str) + "\n")
    else:
        # A refusal or failure is a message for a person: stderr; stdout keeps what a script may read.
        for line in outcome.lines:
            print(line, file=sys.stderr if outcome.exit_code == EXIT_FAILED else sys.stdout)
    if outcome.message:
        print(f"portal: {outcome.message}", file=sys.stderr)
    return outcome.exit_code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    parser = build_parser()
    command = next((a for a in argv if a in COMMANDS), "")
    try:
        args = parser.parse_args(argv)
        command = args.command
        if not args.token:
            raise UsageError("no API token: pass --token or set PORTAL_TOKEN (create one on your Account page)")
        portal = Portal(args.url, args.token, timeout=args.timeout)
        return _emit(as_json, command, args.handler(portal, args))
    except UsageError as exc:
        if not as_json:
            parser.print_usage(sys.stderr)
        return _emit(as_json, command, Outcome(EXIT_USAGE, "usage", message=str(exc)))
    except PortalError as exc:
        return _emit(as_json, command, Outcome(EXIT_FAILED, "refused" if exc.status else "unreachable",
                                               message=_refusal(exc)), exc.as_dict())
    except OSError as exc:
        return _emit(as_json, command, Outcome(EXIT_FAILED, "failed", message=f"{exc.strerror or exc}: "
                                               f"{exc.filename or ''}".rstrip(": ")))


def _refusal(exc: PortalError) -> str:
    message = exc.message
    findings = exc.details.get("findings") if isinstance(exc.details, dict) else None
    if findings:
        message += "".join(f"\n  - {f.get('member') + ': ' if f.get('member') else ''}{f.get('message')}"
                           for f in findings if f.get("severity") != "info")
    return message


if __name__ == "__main__":
    sys.exit(main())
