from __future__ import annotations

from django.urls import path

from registry.batch import api as batch
from registry.deployments import api as deployments
from registry.edge import api as edge
from registry.endpoints import api as endpoints
from registry.mlflow_sync import api as mlflow_sync
from registry.promotions import api as promotions
from registry.versions import api as versions

app_name = "registry_api"

urlpatterns = [
    path("integrations/mlflow/connections", mlflow_sync.MlflowConnectionsApi.as_view(), name="mlflow-connections"),
    path("integrations/mlflow/webhook", mlflow_sync.MlflowWebhookApi.as_view(), name="mlflow-webhook"),
    path("models/", versions.ModelListCreateApi.as_view(), name="models"),
    path("models/<str:name>/", versions.ModelDetailApi.as_view(), name="model"),
    path("models/<str:name>/versions/", versions.VersionUploadApi.as_view(), name="version-upload"),
    path("models/<str:name>/versions/import", versions.VersionImportApi.as_view(), name="version-import"),
    path("models/<str:name>/versions/<int:number>/", versions.VersionDetailApi.as_view(), name="version"),
    path("models/<str:name>/tags", versions.ModelTagsApi.as_view(), name="model-tags"),
    path("models/<str:name>/aliases", versions.ModelAliasesApi.as_view(), name="model-aliases"),
    path("models/<str:name>/aliases/<str:alias>", versions.ModelAliasApi.as_view(), name="model-alias"),
    path("models/<str:name>/versions/<int:number>/tags", versions.VersionTagsApi.as_view(), name="version-tags"),
    path("models/<str:name>/versions/<int:number>/deploy", deployments.VersionDeployApi.as_view(), name="version-deploy"),
    path("deployments/<uuid:uid>/", deployments.DeploymentDetailApi.as_view(), name="deployment"),
    path("models/<str:name>/versions/<int:number>/trust", versions.VersionTrustApi.as_view(), name="version-trust"),
    path("models/<str:name>/versions/<int:number>/artifact", versions.VersionArtifactApi.as_view(),
         name="version-artifact"),
    path("models/<str:name>/versions/<int:number>/reference", versions.VersionReferenceApi.as_view(),
         name="version-reference"),
    path("models/<str:name>/versions/<int:number>/promote", promotions.PromoteApi.as_view(), name="version-promote"),
    path("promotions/", promotions.PromotionListApi.as_view(), name="promotions"),
    path("promotions/<uuid:uid>/", promotions.PromotionDetailApi.as_view(), name="promotion"),
    path("promotions/<uuid:uid>/evidence", promotions.PromotionEvidenceApi.as_view(), name="promotion-evidence"),
    path("promotions/<uuid:uid>/approve", promotions.PromotionApproveApi.as_view(), name="promotion-approve"),
    path("promotions/<uuid:uid>/reject", promotions.PromotionRejectApi.as_view(), name="promotion-reject"),
    path("promotions/<uuid:uid>/cancel", promotions.PromotionCancelApi.as_view(), name="promotion-cancel"),
    path("models/<str:name>/environments/<str:env>/rollback", promotions.RollbackApi.as_view(), name="rollback"),
    path("models/<str:name>/environments/<str:env>/history", promotions.HistoryApi.as_view(), name="history"),
    path("endpoints/", endpoints.EndpointListApi.as_view(), name="endpoints"),
    path("endpoints/<str:endpoint_name>/<str:env>/", endpoints.EndpointDetailApi.as_view(), name="endpoint"),
    path("batch-jobs/", batch.BatchJobListApi.as_view(), name="batch-jobs"),
    path("batch-jobs/<uuid:uid>/", batch.BatchJobDetailApi.as_view(), name="batch-job"),
    path("batch-jobs/<uuid:uid>/result", batch.BatchJobResultApi.as_view(), name="batch-job-result"),
    path("batch-jobs/<uuid:uid>/errors", batch.BatchJobErrorsApi.as_view(), name="batch-job-errors"),
    path("batch-jobs/<uuid:uid>/cancel", batch.BatchJobCancelApi.as_view(), name="batch-job-cancel"),
    path("models/<str:name>/edge-packages/", edge.EdgePackageListApi.as_view(), name="edge-packages"),
    path("edge-packages/<uuid:uid>/", edge.EdgePackageDetailApi.as_view(), name="edge-package"),
    path("edge-packages/<uuid:uid>/download", edge.EdgePackageDownloadApi.as_view(), name="edge-package-download"),
    path("models/<str:name>/edge-tokens/", edge.EdgeTokenListApi.as_view(), name="edge-tokens"),
    path("edge-tokens/<uuid:uid>/revoke", edge.EdgeTokenRevokeApi.as_view(), name="edge-token-revoke"),
    path("edge/uploads", edge.EdgeUploadApi.as_view(), name="edge-uploads"),
    path("edge/public-key", edge.EdgePublicKeyApi.as_view(), name="edge-public-key"),
    path("models/<str:name>/batch-schedules/", batch.BatchScheduleListApi.as_view(), name="batch-schedules"),
    path("batch-schedules/<int:pk>/", batch.BatchScheduleDetailApi.as_view(), name="batch-schedule"),
]
