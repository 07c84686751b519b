"""Registering models and uploading versions over the API, through a real worker to `ready`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from portal.audit.verify import verify_chain
from portal.models import AuditEvent, Team
from registry.models import Blob, ModelVersion, RegisteredModel, TeamTrustedType
from registry.versions import services
from tests.conftest import assert_error_shape, wait_for
from tests.registry import files


def _upload(client: Any, path: Path, name: str | None = None, model: str = "churn", **fields: Any) -> Any:
    return client.post(f"/api/v1/models/{model}/versions/",
                       {"file": SimpleUploadedFile(name or path.name, path.read_bytes()), **fields}, format="multipart")


@pytest.fixture
def churn(personas: dict[str, Any]) -> RegisteredModel:
    return services.model_register(name="churn", team=Team.objects.get(slug="acme"), actor=personas["ds"])


@pytest.mark.django_db
class TestRegistering:
    def test_a_data_scientist_registers_a_model_for_their_team(self, personas: dict[str, Any], api_as: Any) -> None:
        response = api_as(personas["ds"]).post("/api/v1/models/", {"name": "fraud-score", "team": "acme",
                                                                  "description": "d", "tags": ["x"]}, format="json")
        assert response.status_code == 201 and response.json()["team"] == "acme"
        assert AuditEvent.objects.filter(action="model.register", target_id="fraud-score").exists()

    @pytest.mark.parametrize("payload,field", [({"name": "Bad Name", "team": "acme"}, "name"),
                                               ({"name": "-x", "team": "acme"}, "name"),
                                               ({"team": "acme"}, "name"),
                                               ({"name": "ok", "team": "acme", "tags": "x"}, "tags")])
    def test_bad_input_names_the_field(self, personas: dict[str, Any], api_as: Any, payload: dict[str, Any],
                                       field: str) -> None:
        body = assert_error_shape(api_as(personas["ds"]).post("/api/v1/models/", payload, format="json"), 400)
        assert field in body["error"]["details"]

    def test_names_are_unique(self, personas: dict[str, Any], api_as: Any, churn: RegisteredModel) -> None:
        body = assert_error_shape(api_as(personas["ds"]).post("/api/v1/models/", {"name": "churn", "team": "acme"},
                                                              format="json"), 400)
        assert "already exists" in body["error"]["message"]

    def test_nobody_registers_for_a_team_they_are_not_in(self, personas: dict[str, Any], api_as: Any) -> None:
        assert_error_shape(api_as(personas["outsider"]).post("/api/v1/models/", {"name": "x", "team": "acme"},
                                                             format="json"), 404)

    @pytest.mark.parametrize("persona", ["viewer", "approver1", "compliance"])
    def test_roles_without_the_capability_get_403(self, personas: dict[str, Any], api_as: Any, persona: str) -> None:
        assert_error_shape(api_as(personas[persona]).post("/api/v1/models/", {"name": "x", "team": "acme"},
                                                          format="json"), 403)

    def test_lists_are_scoped_to_teams_and_searchable(self, personas: dict[str, Any], api_as: Any,
                                                      churn: RegisteredModel) -> None:
        services.model_register(name="other-model", team=Team.objects.get(slug="other"), actor=personas["outsider"])
        assert [m["name"] for m in api_as(personas["ds"]).get("/api/v1/models/").json()["results"]] == ["churn"]
        assert [m["name"] for m in api_as(personas["outsider"]).get("/api/v1/models/").json()["results"]] == [
            "other-model"]
        everything = api_as(personas["compliance"]).get("/api/v1/models/").json()["results"]
        assert {m["name"] for m in everything} == {"churn", "other-model"}
        assert api_as(personas["compliance"]).get("/api/v1/models/", {"search": "chu"}).json()["count"] == 1
        assert_error_shape(api_as(personas["outsider"]).get("/api/v1/models/churn/"), 404)


@pytest.mark.django_db
class TestVersions:
    def test_the_same_bytes_are_stored_once_and_versions_are_immutable(self, personas: dict[str, Any], api_as: Any,
                                                                       churn: RegisteredModel, tmp_path: Path) -> None:
        path = files.skops_file(tmp_path / "m.skops")
        client = api_as(personas["ds"])
        first, second = _upload(client, path).json(), _upload(client, path).json()
        assert (first["number"], second["number"]) == (1, 2)
        assert first["sha256"] == second["sha256"] and Blob.objects.count() == 1
        blob = Blob.objects.get()
        assert blob.storage_name.endswith(blob.sha256) and "m.skops" not in blob.storage_name
        version = ModelVersion.objects.get(number=1)
        version.description = "rewritten history"
        with pytest.raises(ValueError, match="immutable"):
            version.save()
        with pytest.raises(ValueError, match="immutable"):
            version.save(update_fields=["description"])

    def test_a_stored_file_that_changed_is_never_served(self, personas: dict[str, Any], api_as: Any,
                                                        churn: RegisteredModel, tmp_path: Path) -> None:
        from registry.storage import artifact_storage

        _upload(api_as(personas["ds"]), files.skops_file(tmp_path / "m.skops"))
        blob = Blob.objects.get()
        stored = Path(artifact_storage().path(blob.storage_name))
        stored.write_bytes(stored.read_bytes() + b"tampered")
        body = assert_error_shape(api_as(personas["ds"]).get("/api/v1/models/churn/versions/1/artifact"), 500,
                                  "integrity_error")
        assert "no longer matches" in body["error"]["message"]

    def test_downloads_are_audited_and_permitted_by_role(self, personas: dict[str, Any], api_as: Any,
                                                         churn: RegisteredModel, tmp_path: Path) -> None:
        path = files.skops_file(tmp_path / "m.skops")
        _upload(api_as(personas["ds"]), path)
        response = api_as(personas["approver1"]).get("/api/v1/models/churn/versions/1/artifact")
        assert response.status_code == 200 and b"".join(response.streaming_content) == path.read_bytes()
        event = AuditEvent.objects.get(action="version.download")
        assert event.actor_username == "alex" and event.target_id == "churn/1"
        assert_error_shape(api_as(personas["viewer"]).get("/api/v1/models/churn/versions/1/artifact"), 403)
        assert_error_shape(api_as(personas["outsider"]).get("/api/v1/models/churn/versions/1/artifact"), 404)
        assert_error_shape(api_as(personas["ds"]).get("/api/v1/models/churn/versions/9/"), 404)

    @pytest.mark.parametrize("persona,status", [(None, 401), ("outsider", 404), ("viewer", 403), ("approver1", 403),
                                                ("compliance", 403), ("ds", 201), ("admin", 201)])
    def test_upload_per_role(self, personas: dict[str, Any], api_as: Any, churn: RegisteredModel, tmp_path: Path,
                             persona: str | None, status: int) -> None:
        response = _upload(api_as(personas[persona] if persona else None), files.skops_file(tmp_path / "m.skops"))
        assert response.status_code == status

    def test_bad_metadata_is_refused_before_anything_is_stored_and_burns_no_version_number(
            self, personas: dict[str, Any], api_as: Any, churn: RegisteredModel, tmp_path: Path) -> None:
        client = api_as(personas["ds"])
        model_file = files.joblib_file(tmp_path / "m.joblib")
        reference = files.reference_csv(tmp_path / "ref.csv")
        blobs = Blob.objects.count()
        both = assert_error_shape(_upload(client, model_file, metrics='{"auc": "high"}',
                                          sensitive_columns='{"age": "secret"}'), 400)
        assert set(both["error"]["details"]) == {"metrics", "sensitive_columns"}, "every problem at once"
        # A sensitive column that is not a column of the reference data (a joblib file declares no signature).
        body = assert_error_shape(_upload(client, model_file, metrics='{"auc": 0.9}',
                                          sensitive_columns='{"mean radius": "health", "postcode": "personal"}',
                                          reference_data=SimpleUploadedFile("ref.csv", reference.read_bytes())),
                                  400)
        message = body["error"]["details"]["sensitive_columns"][0]
        assert message.startswith("postcode is not among the columns of the reference data (mean radius,")
        assert Blob.objects.count() == blobs and not churn.versions.exists()
        ok = _upload(client, model_file, metrics='{"auc": 0.9}', sensitive_columns='{"mean radius": "health"}',
                     reference_data=SimpleUploadedFile("ref.csv", reference.read_bytes()))
        assert ok.status_code == 201 and ok.json()["number"] == 1, "the refused tries took no number"


@pytest.mark.slow
class TestScanningWithARealWorker:
    def test_an_upload_reaches_ready_with_signature_profile_and_one_request_id(
            self, celery_worker_process: str, personas: dict[str, Any], api_as: Any, churn: RegisteredModel,
            tmp_path: Path) -> None:
        client = api_as(personas["ds"])
        response = client.post("/api/v1/models/churn/versions/", {
            "file": SimpleUploadedFile("m.joblib", files.joblib_file(tmp_path / "m.joblib").read_bytes()),
            "reference_data": SimpleUploadedFile("ref.csv", files.reference_csv(tmp_path / "r.csv").read_bytes()),
            "metrics": '{"accuracy": 0.95}', "git_commit": "abc1234", "intended_use": "<script>x</script> triage",
        }, format="multipart", HTTP_X_REQUEST_ID="upload-click-000001")
        assert response.status_code == 201 and response.json()["status"] == "scanning"
        body = wait_for(lambda: (b := client.get("/api/v1/models/churn/versions/1/").json())["status"] != "scanning"
                        and b, what="the worker to finish the scan")
        assert body["status"] == "ready", body["status_detail"]
        assert len(body["signature"]["inputs"]) == 30 and body["signature"]["outputs"][0]["type"] == "long"
        assert body["scan"]["sandbox"]["isolated_network"] is True
        profile = body["reference_data"]["profile"]
        assert body["reference_data"]["rows"] == 200 and profile["features"]["mean radius"]["kind"] == "numeric"
        assert sum(profile["features"]["mean radius"]["counts"]) == 200
        verdict = AuditEvent.objects.get(action="version.scan_verdict")
        assert verdict.request_id == "upload-click-000001" and verdict.actor_username == ""
        assert verify_chain().ok

    def test_untrusted_types_wait_for_another_persons_decision(
            self, celery_worker_process: str, personas: dict[str, Any], api_as: Any, churn: RegisteredModel,
            tmp_path: Path) -> None:
        ds, approver = api_as(personas["ds"]), api_as(personas["approver1"])
        forest = files.forest_skops_file(tmp_path / "forest.skops")
        body = _upload(ds, forest).json()
        assert body["status"] == "scanning" and body["scan"]["trust_state"] == "pending"
        assert body["scan"]["untrusted_types"] == ["sklearn.tree._tree.Tree"]
        assert "Waiting for an approver" in body["status_detail"]
        decision = {"trust": True, "reason": "Our own forest, trained in the pipeline.", "remember_for_team": True}
        assert_error_shape(ds.post("/api/v1/models/churn/versions/1/trust", decision, format="json"), 403)
        assert_error_shape(approver.post("/api/v1/models/churn/versions/1/trust", {**decision, "reason": "ok"},
                                         format="json"), 400)
        decided = approver.post("/api/v1/models/churn/versions/1/trust", decision, format="json")
        assert decided.status_code == 200 and decided.json()["scan"]["trust_decided_by"] == "alex"
        assert_error_shape(approver.post("/api/v1/models/churn/versions/1/trust", decision, format="json"), 400)
        wait_for(lambda: ModelVersion.objects.get(number=1).status == "ready", what="v1 ready")
        assert TeamTrustedType.objects.filter(type_name="sklearn.tree._tree.Tree").exists()
        second = _upload(ds, forest).json()
        assert second["scan"]["trust_state"] == "trusted" and "Standing team decision" in second["scan"]["trust_reason"]
        wait_for(lambda: ModelVersion.objects.get(number=2).status == "ready", what="v2 ready")
        actions = list(AuditEvent.objects.order_by("seq").values_list("action", flat=True))
        assert actions.count("version.trust_decision") == 1 and "team.trusted_type_add" in actions

    def test_a_refused_version_is_rejected_and_its_file_removed(self, personas: dict[str, Any], api_as: Any,
                                                                churn: RegisteredModel, tmp_path: Path,
                                                                transactional_db: None) -> None:
        _upload(api_as(personas["ds"]), files.forest_skops_file(tmp_path / "forest.skops"))
        refused = api_as(personas["approver2"]).post("/api/v1/models/churn/versions/1/trust",
                                                     {"trust": False, "reason": "We cannot vouch for this file."},
                                                     format="json").json()
        assert refused["status"] == "rejected" and "refused to trust" in refused["status_detail"]
        assert not Blob.objects.exists()
        assert refused["sha256"], "the record keeps the hash for the audit trail"
