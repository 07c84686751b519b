"""``portal`` in a CI pipeline, against a running portal with a real worker: every command's ``--json`` is one JSON
object on stdout, every exit code (0 done, 1 refused or failed, 2 usage, 3 waiting on a person, 4 timed out while
the work goes on) is reached, no traceback, and ``examples/ci.sh`` runs end to end."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from portal import services as portal_services
from portal.cli import main
from registry.models import ModelVersion
from tests.conftest import ROOT, clean_env
from tests.registry import files

pytestmark = pytest.mark.slow


class Cli:
    """Runs ``portal`` in this process (``main(argv)``, as the console script does) against the live server; with
    ``process=True`` as its own process, as a pipeline starts it."""

    def __init__(self, url: str, tmp_path: Path) -> None:
        self.url = url
        self.tmp_path = tmp_path
        self.calls: set[str] = set()

    def run(self, token: str, *args: str, expect: int, json_out: bool = True, process: bool = False) -> Any:
        argv = ["--url", self.url, "--token", token, *(["--json"] if json_out else []), *args]
        if process:
            result = subprocess.run([sys.executable, "-m", "portal.cli", *argv], cwd=self.tmp_path, env=clean_env(),
                                    capture_output=True, text=True, timeout=300)
            code, stdout, stderr = result.returncode, result.stdout, result.stderr
        else:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(argv)
            stdout, stderr = out.getvalue(), err.getvalue()
        assert "Traceback" not in stderr, stderr
        assert code == expect, (args, code, stdout, stderr)
        if not json_out:
            return subprocess.CompletedProcess(argv, code, stdout, stderr)
        body = json.loads(stdout)  # exactly one JSON object, nothing else
        assert isinstance(body, dict) and body["exit_code"] == expect and body["ok"] is (expect == 0), body
        if expect:
            assert body["error"]["message"], body
        self.calls.add(args[0])
        return body


def test_every_command_and_exit_code(live_server: Any, worker_factory: Any, personas: dict[str, Any],
                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    worker_factory()
    tokens = {who: portal_services.token_create(user=personas[who], name="ci", actor=personas[who])[1]
              for who in ("ds", "approver1")}
    ds, approver = tokens["ds"], tokens["approver1"]
    cli = Cli(live_server.url, tmp_path)

    # 2: usage, with --json too, and never a traceback.
    assert cli.run(ds, "promote", "churn", "1", "--reason", "x", expect=2, process=True)["outcome"] == "usage"
    model_file = files.joblib_file(tmp_path / "model.joblib")
    missing = cli.run(ds, "upload", "churn", str(model_file), "--reference", "nope.csv", expect=2)
    assert "--reference file 'nope.csv' is not a file" in missing["error"]["message"]
    assert cli.run(ds, "batch", "churn", "dev", str(model_file), "--output", "out.csv", expect=2)["error"][
        "message"].startswith("portal batch: --output needs --wait")
    assert cli.run("", "list", expect=2)["error"]["message"].startswith("no API token")

    # register, list; 1 for a refusal, carrying the API's code.
    assert cli.run(ds, "register", "churn", "--team", "acme", "--description", "d", expect=0)["model"]["name"] == "churn"
    again = cli.run(ds, "register", "churn", "--team", "acme", expect=1)
    assert again["error"]["status"] == 400 and "already exists" in again["error"]["message"]
    assert [m["name"] for m in cli.run(ds, "list", expect=0)["models"]] == ["churn"]
    not_found = cli.run(ds, "status", "nosuch", "3", expect=1)
    assert not_found["error"]["status"] == 404 and "version 3 of model 'nosuch'" in not_found["error"]["message"]
    assert cli.run("mlp_nope", "list", expect=1)["error"]["status"] == 401
    assert cli.run(ds, "import", "churn", "models:/churn/1", expect=1)["error"]["code"] == "invalid"

    # upload --wait: 0 ready; 3 held for an approver's trust decision; 1 refused with its findings on stderr.
    reference = files.reference_csv(tmp_path / "ref.csv")
    v1 = cli.run(ds, "upload", "churn", str(model_file), "--reference", str(reference), "--metrics", '{"auc": 0.9}',
                 "--wait", expect=0, process=True)["version"]
    assert v1["status"] == "ready" and v1["number"] == 1 and v1["metrics"] == {"auc": 0.9}
    held = cli.run(ds, "upload", "churn", str(files.forest_skops_file(tmp_path / "forest.skops")), "--wait", expect=3)
    assert held["outcome"] == "held_for_trust" and held["version"]["scan"]["trust_state"] == "pending"
    assert cli.run(ds, "status", "churn", "2", expect=3)["outcome"] == "held_for_trust"
    evil = tmp_path / "model.pkl"
    evil.write_bytes(files.pickle_builtins_eval())
    refused = cli.run(ds, "upload", "churn", str(evil), expect=1, json_out=False, process=True)
    assert "builtins.eval" in refused.stderr and refused.stdout == ""
    assert cli.run(ds, "upload", "churn", str(evil), expect=1)["error"]["code"] == "upload_rejected"
    assert cli.run(ds, "list", "churn", expect=0)["versions"][0]["number"] == 2

    # download: the artifact's bytes are the version's SHA-256.
    got = cli.run(ds, "download", "churn", "1", "--output", "v1.joblib", expect=0)
    assert got["sha256"] == v1["sha256"] == hashlib.sha256((tmp_path / "v1.joblib").read_bytes()).hexdigest()

    # deploy --wait 0; predict; batch --wait with a bad row downloads the errors file next to the output.
    assert cli.run(ds, "deploy", "churn", "1", "--wait", expect=0)["deployment"]["status"] == "live"
    X, _y = files._data()
    frame = X.head(40).astype(object)
    frame.iloc[5, 0] = "n/a"
    source = tmp_path / "customers.csv"
    frame.to_csv(source, index=False)
    X.head(3).to_csv(tmp_path / "three.csv", index=False)
    predicted = cli.run(ds, "predict", "churn", "dev", "three.csv", expect=0)
    assert predicted["predictions"] == files.logistic_regression().predict(X.head(3)).tolist()
    scored = cli.run(ds, "batch", "churn", "dev", str(source), "--max-error-share", "0.5", "--output", "scored.csv",
                     "--wait", expect=0)
    assert scored["batch_job"]["rows_failed"] == 1 and scored["output"] == "scored.csv"
    assert len(list(csv.DictReader((tmp_path / "scored.csv").open()))) == 40
    assert (tmp_path / scored["errors_file"]).read_text().startswith("row,column,reason")
    assert cli.run(ds, "batch", "churn", "prod", str(source), expect=1)["error"]["status"] == 400

    # promote: 0 requested; --wait ends 3 while approvals are awaited; approve --wait 0 live; a blocking gate 3.
    requested = cli.run(ds, "promote", "churn", "1", "--to", "stage", "--reason", "first", expect=0)["promotion"]
    waiting = cli.run(ds, "status", "--promotion", requested["id"], expect=3)
    assert waiting["outcome"] == "awaiting_approval"
    assert cli.run(ds, "approve", requested["id"], expect=1)["error"]["status"] == 403
    live = cli.run(approver, "approve", requested["id"], "--comment", "ok", "--wait", expect=0)["promotion"]
    assert live["status"] == "live"
    worse = files.joblib_file(tmp_path / "worse.joblib", obj=files.logistic_regression())
    v3 = cli.run(ds, "upload", "churn", str(worse), "--metrics", '{"auc": 0.5}', "--wait", expect=0)["version"]
    blocked = cli.run(ds, "promote", "churn", str(v3["number"]), "--to", "stage", "--reason", "worse", expect=3)
    assert blocked["outcome"] == "gate_blocks" and any(g["blocks"] for g in blocked["promotion"]["gates"])

    # 4: the wait ends while the deployment goes on; rollback --wait brings v1 back.
    timed_out = cli.run(ds, "deploy", "churn", str(v3["number"]), "--wait", "--wait-seconds", "0", expect=4)
    assert timed_out["outcome"] == "timed_out" and timed_out["deployment"]["status"] in ("pending", "running")
    from registry.models import Deployment
    from tests.conftest import wait_for

    wait_for(lambda: Deployment.objects.filter(uid=timed_out["deployment"]["id"], status="live").exists(),
             timeout=120, what="the deployment the wait left behind going live")
    assert cli.run(ds, "status", "--deployment", timed_out["deployment"]["id"], expect=0)["outcome"] == "live"
    assert cli.run(ds, "status", "churn", expect=0)["model"]["environments"]["dev"]["champion"] == v3["number"]
    back = cli.run(ds, "rollback", "churn", "dev", "--reason", "v3 is worse", "--wait", expect=0)
    assert back["deployment"]["version"] == 1
    assert cli.calls >= {"register", "list", "status", "download", "upload", "import", "promote", "approve",
                         "rollback", "deploy", "predict", "batch"}

    # The worked example: train, upload, wait, deploy dev, smoke test, promote, wait for approval (a person: 3).
    env = clean_env(PORTAL_URL=live_server.url, PORTAL_TOKEN=ds, MODEL="ci-demo", TEAM="acme",
                    APPROVAL_WAIT_SECONDS="2", WORK_DIR=str(tmp_path / "ci"),
                    PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    example = subprocess.run(["bash", str(ROOT / "examples" / "ci.sh")], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
    assert example.returncode == 3, (example.stdout, example.stderr)
    assert "waiting for an approver" in example.stderr and "Traceback" not in example.stderr
    version = ModelVersion.objects.get(model__name="ci-demo")
    assert version.status == "ready" and version.promotions.get().status == "pending"

