"""Import a version from an MLflow tracking server.

URIs: ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``models:/NAME/latest``, ``models:/m-…`` (an MLflow 3
logged model, what ``log_model`` returns) and ``runs:/RUN_ID/PATH``. The files are downloaded from the configured
tracking server (our own service, never a public hub), zipped reproducibly (sorted names, fixed timestamps, so
the same files always make the same SHA-256), and go through exactly the same inspection as a browser upload.
The run's parameters, finite last metric values, tags, experiment, run name, whole metric history and the tracking
server's address are kept (:class:`registry.models.MlflowSource`). An artifact the model already holds is not
stored again: the import answers the existing version and audits that it did.

The tracking server is asked with a short connect and read timeout and few retries: a server that does not answer
is :class:`TrackingServerUnavailable` (the API's 503) within seconds, never a request hanging for minutes.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction

from portal.audit.actions import AuditAction
from portal.audit.record import audit_record
from portal.permissions import require_capability
from registry.models import ModelVersion, RegisteredModel, VersionStatus
from registry.storage import sha256_of_file
from registry.versions import services
from registry.versions.localfiles import LocalUpload

_NAME = r"(?P<name>[A-Za-z0-9._-]{1,256})"
MODELS_VERSION_URI = re.compile(rf"^models:/{_NAME}/(?P<version>\d{{1,9}})$")
MODELS_LATEST_URI = re.compile(rf"^models:/{_NAME}/latest$")
MODELS_ALIAS_URI = re.compile(rf"^models:/{_NAME}@(?P<alias>[A-Za-z0-9_-]{{1,255}})$")
LOGGED_MODEL_URI = re.compile(r"^models:/(?P<model_id>m-[0-9a-f]{32})$")
RUNS_URI = re.compile(r"^runs:/(?P<run>[0-9a-f]{32})/(?P<path>[A-Za-z0-9._-]{1,100}(?:/[A-Za-z0-9._-]{1,100}){0,5})$")
URI_HELP = ("Use models:/NAME/VERSION, models:/NAME@ALIAS, models:/NAME/latest, models:/m-<32 hex> (an MLflow 3 "
            "logged model) or runs:/RUN_ID/PATH (a 32-character run id).")

# Seconds to connect to the tracking server and to wait for each answer; MLflow's own defaults (120 s, 7 retries
# with backoff) held a request past gunicorn's worker timeout. An operator may set MLflow's variables instead.
CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 20
MAX_RETRIES = 1
METRIC_HISTORY_KEYS = 100
METRIC_HISTORY_POINTS = 1000


class TrackingServerUnavailable(Exception):
    """The tracking server did not answer (refused, unreachable or too slow): the API's 503."""

    def __init__(self, tracking_uri: str, why: str) -> None:
        super().__init__(f"The MLflow tracking server at {tracking_uri} did not answer ({why}). Check that it runs "
                         "and that PORTAL_MLFLOW_TRACKING_URI names it; nothing was imported.")
        self.tracking_uri = tracking_uri


@dataclass
class ImportResult:
    version: ModelVersion
    created: bool  # False: the artifact was already a version of this model, which is answered instead


def public_tracking_uri(uri: str) -> str:
    """The tracking server's address without credentials (user:password@ or a token in the query)."""
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https") and parts.hostname:
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    return uri.split("?", 1)[0]


def _tracking_uri() -> str:
    uri = settings.PORTAL_MLFLOW_TRACKING_URI
    if not uri:
        raise ValidationError({"uri": "Importing from MLflow is not configured: set PORTAL_MLFLOW_TRACKING_URI."})
    return str(uri)


def _bound_mlflow_requests() -> None:
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(READ_TIMEOUT))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(MAX_RETRIES))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def _probe(uri: str) -> None:
    """Ask an HTTP tracking server's health endpoint with a short timeout before MLflow's client is used."""
    if urlsplit(uri).scheme not in ("http", "https"):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=(CONNECT_TIMEOUT, CONNECT_TIMEOUT + 2),
                     allow_redirects=False).close()
    except requests.Timeout:
        raise TrackingServerUnavailable(public_tracking_uri(uri), "no answer within "
                                        f"{CONNECT_TIMEOUT + 2:g} s") from None
    except requests.RequestException as exc:
        why = "connection refused" if "refused" in str(exc).lower() else type(exc).__name__
        raise TrackingServerUnavailable(public_tracking_uri(uri), why) from None


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _reproducible_zip(root: Path, dest: Path) -> Path:
    """The same files always give the same bytes: sorted names, a fixed timestamp and mode, no directory entries."""
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
            info = zipfile.ZipInfo(path.relative_to(root).as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with open(path, "rb") as src, archive.open(info, "w") as out:
                while chunk := src.read(1024 * 1024):
                    out.write(chunk)
    return dest


@dataclass
class _Resolved:
    artifact_uri: str
    run_id: str = ""
    registered_model: str = ""
    registered_version: str = ""
    logged_model_id: str = ""


def _resolve(client: Any, uri: str) -> _Resolved:
    if match := MODELS_VERSION_URI.match(uri):
        mv = client.get_model_version(match["name"], match["version"])
    elif match := MODELS_ALIAS_URI.match(uri):
        mv = client.get_model_version_by_alias(match["name"], match["alias"])
    elif match := MODELS_LATEST_URI.match(uri):
        found = client.search_model_versions(f"name = '{match['name']}'", max_results=1,
                                             order_by=["version_number DESC"])
        if not found:
            raise ValidationError({"uri": f"The MLflow model {match['name']!r} has no versions."})
        mv = found[0]
    elif match := LOGGED_MODEL_URI.match(uri):
        logged = client.get_logged_model(match["model_id"])
        return _Resolved(artifact_uri=str(logged.artifact_location), run_id=logged.source_run_id or "",
                         logged_model_id=logged.model_id)
    elif match := RUNS_URI.match(uri):
        return _run_model(client, match["run"], match["path"])
    else:
        raise ValidationError({"uri": URI_HELP})
    artifact_uri = str(client.get_model_version_download_uri(mv.name, mv.version))
    # MLflow 3 registers a logged model: its id is in the version's model_id, source or download URI.
    logged = re.search(r"\bm-[0-9a-f]{32}\b", " ".join(str(x or "") for x in (
        getattr(mv, "model_id", None), getattr(mv, "source", None), artifact_uri)))
    return _Resolved(artifact_uri=artifact_uri, run_id=mv.run_id or "", registered_model=mv.name,
                     registered_version=str(mv.version), logged_model_id=logged.group(0) if logged else "")


def _run_model(client: Any, run_id: str, path: str) -> _Resolved:
    """MLflow 3 keeps models logged in a run as "logged models" outside the run's artifacts; find the one named
    ``path``, falling back to the run's own artifact folder (MLflow 2 layout)."""
    run = client.get_run(run_id)
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}' AND name = '{path}'",
                                         max_results=2)
    if len(logged) == 1:
        return _Resolved(artifact_uri=str(logged[0].artifact_location), run_id=run_id,
                         logged_model_id=logged[0].model_id)
    return _Resolved(artifact_uri=f"runs:/{run_id}/{path}", run_id=run_id)


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _run_lineage(client: Any, run_id: str) -> dict[str, Any]:
    """What the run says about the model: params, finite metrics, NaN ones named, tags, experiment, history."""
    if not run_id:
        return {"params": {}, "metrics": {}, "missing": [], "tags": {}, "run_name": "", "experiment_id": "",
                "experiment_name": "", "history": {}}
    run = client.get_run(run_id)
    metrics: dict[str, float] = {}
    missing: list[str] = []
    for key, value in sorted(run.data.metrics.items()):
        number = _finite(value)
        if number is None:
            missing.append(key)
        else:
            metrics[key] = number
    history: dict[str, list[list[Any]]] = {}
    for key in sorted(run.data.metrics)[:METRIC_HISTORY_KEYS]:
        points = client.get_metric_history(run_id, key)
        history[key] = [[int(p.step), int(p.timestamp), _finite(p.value)]
                        for p in sorted(points, key=lambda p: (p.step, p.timestamp))[-METRIC_HISTORY_POINTS:]]
    experiment_name = ""
    try:
        experiment_name = client.get_experiment(run.info.experiment_id).name
    except Exception:  # a deleted experiment leaves its id, which is kept
        experiment_name = ""
    tags = {str(k)[:250]: str(v)[:5000] for k, v in run.data.tags.items() if not k.startswith("mlflow.log-model")}
    return {"params": dict(run.data.params), "metrics": metrics, "missing": missing, "tags": tags,
            "run_name": run.info.run_name or "", "experiment_id": str(run.info.experiment_id or ""),
            "experiment_name": experiment_name or "", "history": history}


def _existing_version(model: RegisteredModel, sha256: str) -> ModelVersion | None:
    return (ModelVersion.objects.filter(model=model, artifact_sha256=sha256)
            .exclude(status=VersionStatus.REJECTED).order_by("number").first())


def _record_duplicate(*, version: ModelVersion, uri: str, tracking_uri: str, sha256: str, actor: Any) -> None:
    with transaction.atomic():
        audit_record(AuditAction.VERSION_IMPORT_DUPLICATE, actor=actor, target=services.version_target(version),
                     metadata={"uri": uri, "tracking_uri": tracking_uri, "sha256": sha256,
                               "existing_version": version.number})


def _unavailable(exc: Exception) -> bool:
    text = str(exc).lower()
    return any(w in text for w in ("max retries exceeded", "timed out", "connection refused", "connectionerror",
                                   "read timeout", "failed to establish"))


def mlflow_import(*, model: RegisteredModel, uri: str, actor: Any, tracking_uri: str | None = None,
                  description: str = "") -> ImportResult:
    """Import ``uri`` from the configured tracking server (or ``tracking_uri``: a team's MLflow connection) as a
    new version of ``model``, or answer the version that already holds the same artifact."""
    uri = (uri or "").strip()
    if ".." in uri or not any(p.match(uri) for p in (MODELS_VERSION_URI, MODELS_LATEST_URI, MODELS_ALIAS_URI,
                                                      LOGGED_MODEL_URI, RUNS_URI)):
        raise ValidationError({"uri": URI_HELP})
    tracking = tracking_uri or _tracking_uri()
    shown = public_tracking_uri(tracking)
    require_capability(actor, "register_model")
    _bound_mlflow_requests()
    _probe(tracking)
    client = _client(tracking)
    import mlflow.artifacts
    import requests
    from mlflow.exceptions import MlflowException

    try:
        resolved = _resolve(client, uri)
        lineage = _run_lineage(client, resolved.run_id)
        tmp_root = Path(settings.VAR_DIR) / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="mlflow-import-", dir=tmp_root) as tmp:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=resolved.artifact_uri,
                                                             dst_path=str(Path(tmp) / "dl"), tracking_uri=tracking))
            if not (local / "MLmodel").is_file():
                raise ValidationError({"uri": f"{uri} is not an MLflow model (no MLmodel file there)."})
            archive = _reproducible_zip(local, Path(tmp) / "model.zip")
            sha256 = sha256_of_file(str(archive))[0]
            existing = _existing_version(model, sha256)
            if existing is not None:
                _record_duplicate(version=existing, uri=uri, tracking_uri=shown, sha256=sha256, actor=actor)
                return ImportResult(existing, created=False)
            commit = lineage["tags"].get("mlflow.source.git.commit", "")
            meta = services.UploadMetadata(
                description=description or f"Imported from {uri}", metrics=services.validate_metrics(lineage["metrics"]),
                params={str(k)[:250]: str(v)[:6000] for k, v in lineage["params"].items()},
                mlflow_run_id=resolved.run_id, source=uri,
                git_commit=commit if re.fullmatch(r"[0-9a-fA-F]{7,64}", commit or "") else "",
                trained_on=services.split_references(lineage["tags"].get(services.TRAINED_ON_TAG, "")),
                mlflow_source={
                    "uri": uri, "tracking_uri": shown, "artifact_uri": resolved.artifact_uri[:1000],
                    "registered_model": resolved.registered_model[:256],
                    "registered_version": resolved.registered_version[:32],
                    "logged_model_id": resolved.logged_model_id[:64], "run_id": resolved.run_id,
                    "run_name": lineage["run_name"][:256], "experiment_id": lineage["experiment_id"][:64],
                    "experiment_name": lineage["experiment_name"][:500], "tags": lineage["tags"],
                    "metric_history": lineage["history"], "missing_metrics": lineage["missing"],
                },
            )
            upload = LocalUpload(archive, f"{model.name}-mlflow.zip")
            try:
                return ImportResult(services.version_upload(model=model, upload=upload, meta=meta, actor=actor),
                                    created=True)
            finally:
                upload.close()
    except MlflowException as exc:
        if _unavailable(exc):
            raise TrackingServerUnavailable(shown, "it stopped answering during the import") from None
        raise ValidationError({"uri": f"MLflow at {shown} could not provide {uri}: {exc.message[:300]}"}) from None
    except requests.RequestException as exc:  # an artifact download that lost the server (an OSError too)
        raise TrackingServerUnavailable(shown, type(exc).__name__) from None
    except OSError as exc:
        raise ValidationError({"uri": f"Downloading {uri} from {shown} failed: {exc.strerror or exc}"}) from None
