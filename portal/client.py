"""A Python client for the portal's REST API (``/api/v1/``), for pipelines and notebooks.

    from portal.client import Portal

    portal = Portal("https://portal.example.com", token="mlp_...")
    version = portal.upload("churn", "model.zip", reference="ref.csv", metrics={"auc": 0.91})
    version = portal.wait_version(version, timeout=600, progress=print)
    deployment = portal.wait_deployment(portal.deploy("churn", version.number, env="dev"))

Results are dataclasses (the API's whole answer stays in ``.raw``); every refusal is a :class:`PortalError`
carrying the HTTP status and the API's error ``code``, ``message`` and ``details``. Requests answered 429 or 503
are retried with exponential backoff, honouring ``Retry-After``; uploads are streamed from disk in 1 MiB chunks, so
a multi-gigabyte file needs no more memory than a small one. The ``wait_*`` methods poll until the work reaches an
end state, call ``progress`` with each new state, and raise :class:`WaitTimeout` (the work goes on) at the deadline.
Only the standard library and ``requests``.
"""

from __future__ import annotations

import email.utils
import json
import mimetypes
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

CHUNK = 1024 * 1024
RETRY_STATUSES = frozenset({429, 503})
VERSION_END = ("ready", "rejected")
DEPLOYMENT_END = ("live", "failed", "retired")
PROMOTION_END = ("live", "rejected", "cancelled", "failed")
BATCH_END = ("done", "failed", "cancelled")
SNAPSHOT_END = ("ready", "failed")

Progress = Callable[[Any], None]


class PortalError(Exception):
    """The portal refused a request, or could not be reached (``status`` 0, ``code`` ``"unreachable"``)."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "code": self.code, "message": self.message, "details": self.details}


class WaitTimeout(Exception):
    """A wait reached its deadline while the work goes on; ``last`` is the last state seen."""

    def __init__(self, message: str, last: Any) -> None:
        super().__init__(message)
        self.last = last


@dataclass
class Model:
    name: str
    team: str
    description: str
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_api(cls, raw: dict[str, Any]) -> Model:
        return cls(name=raw["name"], team=str(raw.get("team", "")), description=raw.get("description", ""), raw=raw)


@dataclass
class Version:
    model: str
    number: int
    status: str
    status_detail: str
    sha256: str
    format: str
    trust_state: str
    metrics: dict[str, Any]
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_api(cls, raw: dict[str, Any]) -> Version:
        return cls(model=raw["model"], number=int(raw["number"]), status=raw["status"],
                   status_detail=raw.get("status_detail", ""), sha256=raw.get("sha256", ""),
                   format=raw.get("format", ""), trust_state=(raw.get("scan") or {}).get("trust_state", ""),
                   metrics=raw.get("metrics") or {}, raw=raw)

    @property
    def held_for_trust(self) -> bool:
        """Scanning waits for an approver's decision to trust the types or code the upload brings."""
        return self.status == "scanning" and self.trust_state == "pending"


@dataclass
class Deployment:
    id: str
    model: str
    version: int
    environment: str
    status: str
    progress: int
    error: str
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_api(cls, raw: dict[str, Any]) -> Deployment:
        return cls(id=str(raw["id"]), model=str(raw.get("model", "")), version=int(raw.get("version") or 0),
                   environment=str(raw.get("environment", "")), status=raw["status"],
                   progress=int(raw.get("progress") or 0), error=raw.get("error") or "", raw=raw)


@dataclass
class Promotion:
    id: str
    model: str
    version: int
    target: str
    status: str
    approvals_required: int
    approvals: list[dict[str, Any]]
    gates: list[dict[str, Any]]
    deployment: Deployment | None
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_api(cls, raw: dict[str, Any]) -> Promotion:
        dep = raw.get("deployment")
        return cls(id=str(raw["id"]), model=raw["model"], version=int(raw["version"]), target=raw["target"],
                   status=raw["status"], approvals_required=int(raw.get("approvals_required") or 0),
                   approvals=list(raw.get("approvals") or []), gates=list(raw.get("gates") or []),
                   deployment=Deployment.from_api(dep) if dep else None, raw=raw)

    @property
    def blocking_gates(self) -> list[dict[str, Any]]:
        return [g for g in self.gates if g.get("blocks")]

    @property
    def approvals_given(self) -> int:
        return sum(1 for a in self.approvals if a.get("decision") == "approve")


@dataclass
class BatchJob:
    id: str
    status: str
    rows_done: int
    rows_total: int
    rows_failed: int
    error: str
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_api(cls, raw: dict[str, Any]) -> BatchJob:
        return cls(id=str(raw["id"]), status=raw["status"], rows_done=int(raw.get("rows_done") or 0),
                   rows_total=int(raw.get("rows_total") or 0), rows_failed=int(raw.get("rows_failed") or 0),
                   error=raw.get("error") or "", raw=raw)


@dataclass
class Experiment:
    id: str
    model: str
    environment: str
    status: str  # running | ended
    verdict: str  # running, challenger_wins, champion_holds, no_difference, guardrail, invalid, stopped
    sentence: str
    promotion: str | None
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_api(cls, raw: dict[str, Any]) -> Experiment:
        return cls(id=str(raw["id"]), model=raw["model"], environment=raw["environment"], status=raw["status"],
                   verdict=raw["verdict"], sentence=raw.get("sentence") or "", promotion=raw.get("promotion"),
                   raw=raw)


class MultipartStream:
    """A multipart/form-data body generated on the fly from fields and files on disk, with a known length, so
    requests sends a Content-Length and reads each file in chunks instead of loading it."""

    def __init__(self, fields: dict[str, str], files: dict[str, Path],
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.boundary = uuid.uuid4().hex
        self.parts: list[tuple[bytes, Path | None]] = []
        for name, value in fields.items():
            head = (f"--{self.boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n"
                    f"{value}\r\n").encode()
            self.parts.append((head, None))
        for name, path in files.items():
            ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            filename = path.name.replace('"', "_").replace("\r", "_").replace("\n", "_")
            head = (f"--{self.boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; "
                    f"filename=\"{filename}\"\r\nContent-Type: {ctype}\r\n\r\n").encode()
            self.parts.append((head, path))
        self.tail = f"--{self.boundary}--\r\n".encode()
        self.length = sum(len(h) + ((p.stat().st_size + 2) if p else 0) for h, p in self.parts) + len(self.tail)
        self.progress = progress

    def __len__(self) -> int:
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


def _retry_after(response: requests.Response, fallback: float) -> float:
    value = response.headers.get("Retry-After", "")
    if value.strip().isdigit():
        return float(value)
    if value:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        if parsed is not None:
            return max(0.0, parsed.timestamp() - time.time())
    return fallback


def _q(segment: str | int) -> str:
    return quote(str(segment), safe="")


class Portal:
    """One portal, one token. ``timeout`` bounds each request (connect and read); ``retries`` is how many times a
    429 or 503 answer, or a connection that could not be made, is retried, waiting ``backoff`` × 2ⁿ seconds (or the
    answer's ``Retry-After``, at most ``max_wait`` seconds) between tries."""

    def __init__(self, url: str, token: str, *, timeout: float = 60, retries: int = 4, backoff: float = 0.5,
                 max_wait: float = 60, poll_interval: float = 1.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_wait = max_wait
        self.poll_interval = poll_interval
        self.session = requests.Session()
        self.session.headers.update({"Authorization": f"Bearer {token}", "Accept": "application/json",
                                     "User-Agent": "portal-client/1"})

    # --- transport ---------------------------------------------------------------------------------------------

    def _send(self, method: str, path: str, *, what: str = "", stream: bool = False,
              body_factory: Callable[[], Any] | None = None, **kwargs: Any) -> requests.Response:
        """Send with retries; ``body_factory`` rebuilds a streamed body for each try (a generator is spent)."""
        url = self.url + path
        attempt = 0
        while True:
            if body_factory is not None:
                body = body_factory()
                kwargs["data"] = body
                kwargs.setdefault("headers", {})["Content-Type"] = body.content_type
            try:
                response = self.session.request(method, url, timeout=kwargs.pop("timeout", self.timeout),
                                                stream=stream, **kwargs)
            except requests.ConnectionError as exc:
                if attempt < self.retries:
                    time.sleep(min(self.max_wait, self.backoff * 2 ** attempt))
                    attempt += 1
                    continue
                raise PortalError(0, "unreachable", f"cannot reach the portal at {self.url}: {exc}") from None
            except requests.Timeout:
                raise PortalError(0, "timeout", f"the portal at {self.url} did not answer {method} {path} within "
                                  f"{self.timeout:g} s") from None
            except requests.RequestException as exc:
                raise PortalError(0, "request_failed", f"{method} {path} failed: {exc}") from None
            if response.status_code in RETRY_STATUSES and attempt < self.retries:
                wait = min(self.max_wait, _retry_after(response, self.backoff * 2 ** attempt))
                response.close()
                time.sleep(wait)
                attempt += 1
                continue
            if response.status_code >= 400:
                raise self._error(response, what)
            return response

    @staticmethod
    def _error(response: requests.Response, what: str) -> PortalError:
        try:
            body = response.json()
        except ValueError:
            body = None
        error: dict[str, Any] = {}
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            error = body["error"]
        code = str(error.get("code") or f"http_{response.status_code}")
        message = str(error.get("message") or f"HTTP {response.status_code} {response.reason}")
        if response.status_code == 404 and what and message.rstrip(".").lower() == "not found":
            message = f"Not found: {what} (it does not exist, or your teams cannot see it)."
        return PortalError(response.status_code, code, message, error.get("details"))

    def request(self, method: str, path: str, *, what: str = "", **kwargs: Any) -> Any:
        """One API call; the decoded JSON answer (``None`` for an empty one)."""
        response = self._send(method, path, what=what, **kwargs)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise PortalError(response.status_code, "not_json",
                              f"{method} {path} answered {response.headers.get('Content-Type', 'no type')}, "
                              "not JSON: is the URL the portal's?") from None

    def download(self, path: str, dest: str | Path, *, what: str = "") -> Path:
        """Stream a file to ``dest`` (written as ``dest.part`` and renamed when complete)."""
        dest = Path(dest)
        response = self._send("GET", path, what=what, stream=True, timeout=(self.timeout, self.timeout))
        tmp = dest.with_name(dest.name + ".part")
        try:
            with response, open(tmp, "wb") as out:
                for chunk in response.iter_content(CHUNK):
                    out.write(chunk)
            tmp.replace(dest)
        except requests.RequestException as exc:
            tmp.unlink(missing_ok=True)
            raise PortalError(0, "download_failed", f"downloading {what or path} failed: {exc}") from None
        return dest

    def _paginate(self, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        number = 1
        while True:
            page = self.request("GET", path, params={**params, "page": str(number), "page_size": "500"})
            items.extend(page.get("results", []))
            if not page.get("next"):
                return items
            number += 1

    def _poll(self, fetch: Callable[[], Any], done: Callable[[Any], bool], *, timeout: float,
              progress: Progress | None, describe: Callable[[Any], str]) -> Any:
        deadline = time.monotonic() + timeout
        state = fetch()
        shown: str | None = None
        while True:
            line = describe(state)
            if progress is not None and line != shown:
                progress(state)
                shown = line
            if done(state):
                return state
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"{line} after {timeout:g} s", state)
            time.sleep(min(self.poll_interval, max(0.0, deadline - time.monotonic())) or 0.05)
            state = fetch()

    # --- models and versions -----------------------------------------------------------------------------------

    def models(self, *, search: str = "", team: str = "") -> list[Model]:
        params = {k: v for k, v in {"search": search, "team": team}.items() if v}
        return [Model.from_api(m) for m in self._paginate("/api/v1/models/", params)]

    def model(self, name: str) -> dict[str, Any]:
        """One model with its versions and what each environment serves (the API's answer as is)."""
        return dict(self.request("GET", f"/api/v1/models/{_q(name)}/", what=f"model {name!r}"))

    def register(self, name: str, *, team: str, description: str = "", tags: list[str] | None = None) -> Model:
        body: dict[str, Any] = {"name": name, "team": team, "description": description}
        if tags:
            body["tags"] = tags
        return Model.from_api(self.request("POST", "/api/v1/models/", json=body, what=f"team {team!r}"))

    def version(self, model: str, number: int) -> Version:
        return Version.from_api(self.request("GET", f"/api/v1/models/{_q(model)}/versions/{int(number)}/",
                                             what=f"version {number} of model {model!r}"))

    def upload(self, model: str, file: str | Path, *, reference: str | Path | None = None,
               metrics: dict[str, float] | None = None, sensitive_columns: dict[str, str] | None = None,
               description: str = "", git_commit: str = "", source: str = "", mlflow_run_id: str = "",
               trained_on: list[str] | None = None,
               progress: Callable[[int, int], None] | None = None) -> Version:
        """Upload a model file as a new version, streamed from disk. Raises ``FileNotFoundError`` for a file that
        is not there (before anything is sent)."""
        files = {"file": Path(file)}
        if reference is not None:
            files["reference_data"] = Path(reference)
        for name, path in files.items():
            if not path.is_file():
                raise FileNotFoundError(f"{name.replace('_', ' ')}: {path} is not a file")
        fields = {k: v for k, v in {
            "metrics": json.dumps(metrics) if metrics is not None else "",
            "sensitive_columns": json.dumps(sensitive_columns) if sensitive_columns is not None else "",
            "description": description, "git_commit": git_commit, "source": source,
            "mlflow_run_id": mlflow_run_id, "trained_on": ",".join(trained_on or [])}.items() if v}
        raw = self.request("POST", f"/api/v1/models/{_q(model)}/versions/", what=f"model {model!r}",
                           body_factory=lambda: MultipartStream(fields, files, progress=progress),
                           timeout=(self.timeout, None))
        return Version.from_api(raw)

    def mlflow_connect(self, tracking_uri: str, *, team: str, write_back: bool = True,
                       portal_url: str = "") -> dict[str, Any]:
        """Connect ``team`` to an MLflow tracking server: the portal registers its webhook there, so every new
        version of the server's registered models is imported; with ``write_back`` the versions live in dev, stage
        and prod get those aliases in MLflow. Team managers only."""
        body: dict[str, Any] = {"tracking_uri": tracking_uri, "team": team, "write_back": write_back}
        if portal_url:
            body["portal_url"] = portal_url
        return dict(self.request("POST", "/api/v1/integrations/mlflow/connections", json=body,
                                 what=f"team {team!r}"))

    def import_mlflow(self, model: str, uri: str) -> Version:
        """Import ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``models:/NAME/latest``, ``models:/m-…`` or
        ``runs:/RUN_ID/PATH`` from the portal's MLflow tracking server. An artifact already in the model answers
        its existing version (``raw["duplicate_of_existing"]`` is true)."""
        return Version.from_api(self.request("POST", f"/api/v1/models/{_q(model)}/versions/import",
                                             json={"uri": uri}, what=f"model {model!r}",
                                             timeout=(self.timeout, None)))

    def wait_version(self, version: Version, *, timeout: float = 600, progress: Progress | None = None) -> Version:
        """Until the version is ready or rejected, or held for an approver's trust decision (``held_for_trust``)."""
        return self._poll(lambda: self.version(version.model, version.number),
                          lambda v: v.status in VERSION_END or v.held_for_trust, timeout=timeout, progress=progress,
                          describe=lambda v: f"{v.model} v{v.number} {v.status}"
                          + (" (held for trust)" if v.held_for_trust else ""))

    def download_artifact(self, model: str, number: int, dest: str | Path) -> Path:
        return self.download(f"/api/v1/models/{_q(model)}/versions/{int(number)}/artifact", dest,
                             what=f"version {number} of model {model!r}")

    # --- deployments, promotions, rollback ---------------------------------------------------------------------

    def deploy(self, model: str, number: int, *, env: str = "dev", strategy: str = "replace",
               traffic_percent: int | None = None) -> Deployment:
        body: dict[str, Any] = {"environment": env, "strategy": strategy}
        if traffic_percent is not None:
            body["traffic_percent"] = traffic_percent
        return Deployment.from_api(self.request("POST", f"/api/v1/models/{_q(model)}/versions/{int(number)}/deploy",
                                                json=body, what=f"version {number} of model {model!r}"))

    def deployment(self, deployment_id: str) -> Deployment:
        return Deployment.from_api(self.request("GET", f"/api/v1/deployments/{_q(deployment_id)}/",
                                                what=f"deployment {deployment_id}"))

    def wait_deployment(self, deployment: Deployment, *, timeout: float = 600,
                        progress: Progress | None = None) -> Deployment:
        return self._poll(lambda: self.deployment(deployment.id), lambda d: d.status in DEPLOYMENT_END,
                          timeout=timeout, progress=progress,
                          describe=lambda d: f"deployment {d.id} {d.status} {d.progress}%")

    def promote(self, model: str, number: int, *, target: str, reason: str, override_reason: str = "") -> Promotion:
        body = {"target": target, "reason": reason}
        if override_reason:
            body["override_reason"] = override_reason
        return Promotion.from_api(self.request("POST", f"/api/v1/models/{_q(model)}/versions/{int(number)}/promote",
                                               json=body, what=f"version {number} of model {model!r}"))

    # --- A/B experiments -------------------------------------------------------------------------------------------

    def start_experiment(self, model: str, env: str, *, metric: str, mde: float, alpha: float = 0.05,
                         traffic_percent: int | None = None, guardrails: dict[str, Any] | None = None,
                         name: str = "", segment_column: str = "") -> Experiment:
        body: dict[str, Any] = {"model": model, "environment": env, "metric": metric, "mde": mde, "alpha": alpha,
                                "name": name}
        if segment_column:
            body["segment_column"] = segment_column
        if traffic_percent is not None:
            body["traffic_percent"] = traffic_percent
        if guardrails is not None:
            body["guardrails"] = guardrails
        return Experiment.from_api(self.request("POST", "/api/v1/experiments/", json=body,
                                                what=f"model {model!r} in {env}"))

    def experiment(self, experiment_id: str) -> Experiment:
        return Experiment.from_api(self.request("GET", f"/api/v1/experiments/{_q(experiment_id)}/",
                                                what=f"experiment {experiment_id}"))

    def experiment_traffic(self, experiment_id: str, traffic_percent: int) -> Experiment:
        return Experiment.from_api(self.request("PATCH", f"/api/v1/experiments/{_q(experiment_id)}/",
                                                json={"traffic_percent": traffic_percent},
                                                what=f"experiment {experiment_id}"))

    def stop_experiment(self, experiment_id: str, *, reason: str = "", stop_traffic: bool = False) -> Experiment:
        return Experiment.from_api(self.request("POST", f"/api/v1/experiments/{_q(experiment_id)}/stop",
                                                json={"reason": reason, "stop_traffic": stop_traffic},
                                                what=f"experiment {experiment_id}"))

    def wait_experiment(self, experiment: Experiment, *, timeout: float = 600,
                        progress: Progress | None = None) -> Experiment:
        """Until the experiment ends (a verdict, or stopped)."""
        return self._poll(lambda: self.experiment(experiment.id), lambda e: e.status != "running",
                          timeout=timeout, progress=progress, describe=lambda e: f"{e.verdict}: {e.sentence}")

    def promotion(self, promotion_id: str) -> Promotion:
        return Promotion.from_api(self.request("GET", f"/api/v1/promotions/{_q(promotion_id)}/",
                                               what=f"promotion request {promotion_id}"))

    def promotions(self, *, status: str = "", model: str = "") -> list[Promotion]:
        params = {k: v for k, v in {"status": status, "model": model}.items() if v}
        return [Promotion.from_api(p) for p in self._paginate("/api/v1/promotions/", params)]

    def decide(self, promotion_id: str, *, approve: bool, comment: str = "", password: str = "") -> Promotion:
        body = {"comment": comment}
        if password:
            body["password"] = password
        action = "approve" if approve else "reject"
        return Promotion.from_api(self.request("POST", f"/api/v1/promotions/{_q(promotion_id)}/{action}", json=body,
                                               what=f"promotion request {promotion_id}"))

    def wait_promotion(self, promotion: Promotion, *, timeout: float = 600,
                       progress: Progress | None = None) -> Promotion:
        """Until the request is live, rejected, cancelled or failed."""
        return self._poll(lambda: self.promotion(promotion.id), lambda p: p.status in PROMOTION_END,
                          timeout=timeout, progress=progress,
                          describe=lambda p: f"promotion {p.id} {p.status} ({p.approvals_given}/"
                          f"{p.approvals_required} approvals)")

    def rollback(self, model: str, env: str, *, reason: str, to_version: int | None = None) -> Deployment:
        body: dict[str, Any] = {"reason": reason}
        if to_version is not None:
            body["to_version"] = to_version
        return Deployment.from_api(self.request("POST", f"/api/v1/models/{_q(model)}/environments/{_q(env)}/rollback",
                                                json=body, what=f"model {model!r}"))

    # --- scoring -------------------------------------------------------------------------------------------------

    def predict(self, model: str, env: str, body: bytes | dict[str, Any], *,
                content_type: str = "application/json") -> dict[str, Any]:
        """Score in real time with MLflow's scoring protocol (a dict is sent as JSON)."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        return dict(self.request("POST", f"/api/v1/serve/{_q(model)}/{_q(env)}/invocations", data=data,
                                 headers={"Content-Type": content_type}, what=f"model {model!r} in {env}"))

    def batch(self, model: str, env: str, file: str | Path, *, id_column: str = "", subject_column: str = "",
              max_error_share: float | None = None,
              progress: Callable[[int, int], None] | None = None) -> BatchJob:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is not a file")
        fields = {"model": model, "env": env}
        if id_column:
            fields["id_column"] = id_column
        if subject_column:
            fields["subject_column"] = subject_column
        if max_error_share is not None:
            fields["max_error_share"] = str(max_error_share)
        return BatchJob.from_api(self.request("POST", "/api/v1/batch-jobs/", what=f"model {model!r} in {env}",
                                              body_factory=lambda: MultipartStream(fields, {"file": path},
                                                                                   progress=progress),
                                              timeout=(self.timeout, None)))

    def batch_job(self, job_id: str) -> BatchJob:
        return BatchJob.from_api(self.request("GET", f"/api/v1/batch-jobs/{_q(job_id)}/",
                                              what=f"batch job {job_id}"))

    def wait_batch(self, job: BatchJob, *, timeout: float = 3600, progress: Progress | None = None) -> BatchJob:
        return self._poll(lambda: self.batch_job(job.id), lambda j: j.status in BATCH_END, timeout=timeout,
                          progress=progress, describe=lambda j: f"batch job {j.id} {j.status}: {j.rows_done} of "
                          f"{j.rows_total} rows")

    def download_batch_result(self, job_id: str, dest: str | Path) -> Path:
        return self.download(f"/api/v1/batch-jobs/{_q(job_id)}/result", dest, what=f"batch job {job_id}'s result")

    def download_batch_errors(self, job_id: str, dest: str | Path) -> Path:
        return self.download(f"/api/v1/batch-jobs/{_q(job_id)}/errors", dest, what=f"batch job {job_id}'s errors")

    # --- dataset snapshots ---------------------------------------------------------------------------------------

    def dataset_create(self, model: str, env: str, *, start: str, end: str, version: int | None = None,
                       labelled_only: bool = True, sensitive: dict[str, str] | None = None) -> dict[str, Any]:
        """Ask for a snapshot of ``model`` in ``env`` over [start, end) (ISO times with a zone); a worker writes it."""
        body: dict[str, Any] = {"model": model, "environment": env, "from": start, "to": end,
                                "labelled_only": labelled_only}
        if version is not None:
            body["version"] = version
        if sensitive:
            body["sensitive"] = sensitive
        return dict(self.request("POST", "/api/v1/datasets/", json=body, what=f"model {model!r}"))

    def dataset(self, snapshot_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/api/v1/datasets/{_q(snapshot_id)}/", what=f"snapshot {snapshot_id}"))

    def wait_dataset(self, snapshot: dict[str, Any], *, timeout: float = 3600,
                     progress: Progress | None = None) -> dict[str, Any]:
        return dict(self._poll(lambda: self.dataset(snapshot["id"]), lambda s: s["status"] in SNAPSHOT_END,
                               timeout=timeout, progress=progress,
                               describe=lambda s: f"snapshot {s['id']} {s['status']}: {s['rows_done']} of "
                                                  f"{s['rows_expected']} rows"))

    def download_dataset(self, snapshot_id: str, dest: str | Path) -> Path:
        return self.download(f"/api/v1/datasets/{_q(snapshot_id)}/download", dest, what=f"snapshot {snapshot_id}")
