"""Import a version from an MLflow tracking server: ``models:/NAME/VERSION`` or ``runs:/RUN_ID/PATH``.

The files are downloaded from the configured tracking server (our own service, never a public hub), zipped, and go
through exactly the same inspection as a browser upload; the run's id, parameters, metrics and git commit become
the version's lineage.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError

from registry import services
from registry.localfiles import LocalUpload
from registry.models import ModelVersion, RegisteredModel

MODELS_URI = re.compile(r"^models:/(?P<name>[A-Za-z0-9._-]{1,256})/(?P<version>\d{1,9})$")
RUNS_URI = re.compile(r"^runs:/(?P<run>[0-9a-f]{32})/(?P<path>[A-Za-z0-9._-]{1,100}(?:/[A-Za-z0-9._-]{1,100}){0,5})$")


class ImportFailed(Exception):
    pass


def _client() -> Any:
    from mlflow import MlflowClient

    uri = settings.PORTAL_MLFLOW_TRACKING_URI
    if not uri:
        raise ValidationError({"uri": "Importing from MLflow is not configured: set PORTAL_MLFLOW_TRACKING_URI."})
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _run_model_uri(client: Any, run_id: str, path: str) -> str:
    """MLflow 3 keeps models logged in a run as "logged models" outside the run's artifacts; find the one named
    ``path``, falling back to the run's own artifact folder (MLflow 2 layout)."""
    run = client.get_run(run_id)
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}' AND name = '{path}'",
                                         max_results=2)
    if len(logged) == 1:
        return str(logged[0].artifact_location)
    return f"runs:/{run_id}/{path}"


def version_import_from_mlflow(*, model: RegisteredModel, uri: str, actor: Any) -> ModelVersion:
    uri = (uri or "").strip()
    models_match, runs_match = MODELS_URI.match(uri), RUNS_URI.match(uri)
    if not (models_match or runs_match) or ".." in uri:
        raise ValidationError({"uri": "Use models:/NAME/VERSION or runs:/RUN_ID/PATH (a 32-character run id)."})
    client = _client()
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        if models_match:
            mv = client.get_model_version(models_match["name"], models_match["version"])
            run_id = mv.run_id or ""
            artifact_uri = client.get_model_version_download_uri(models_match["name"], models_match["version"])
        else:
            assert runs_match is not None
            run_id = runs_match["run"]
            artifact_uri = _run_model_uri(client, run_id, runs_match["path"])
        run = client.get_run(run_id) if run_id else None
        tmp_root = Path(settings.VAR_DIR) / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="mlflow-import-", dir=tmp_root) as tmp:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(Path(tmp) / "dl"),
                                                             tracking_uri=settings.PORTAL_MLFLOW_TRACKING_URI))
            if not (local / "MLmodel").is_file():
                raise ValidationError({"uri": f"{uri} is not an MLflow model (no MLmodel file there)."})
            archive = Path(shutil.make_archive(str(Path(tmp) / "model"), "zip", root_dir=local))
            params = dict(run.data.params) if run else {}
            metrics = {k: float(v) for k, v in (run.data.metrics if run else {}).items()}
            tags = run.data.tags if run else {}
            commit = tags.get("mlflow.source.git.commit", "")
            meta = services.UploadMetadata(
                description=f"Imported from {uri}", metrics=services.validate_metrics(metrics), params=params,
                mlflow_run_id=run_id, source=uri,
                git_commit=commit if re.fullmatch(r"[0-9a-fA-F]{7,64}", commit or "") else "",
            )
            upload = LocalUpload(archive, f"{model.name}-mlflow.zip")
            try:
                return services.version_upload(model=model, upload=upload, meta=meta, actor=actor)
            finally:
                upload.close()
    except MlflowException as exc:
        raise ValidationError({"uri": f"MLflow could not provide {uri}: {exc.message[:300]}"}) from None
    except OSError as exc:
        raise ValidationError({"uri": f"Downloading {uri} failed: {exc.strerror or exc}"}) from None
