from __future__ import annotations

from django.urls import path

from registry.batch import views as batch_views
from registry.deployments import views as deployment_views
from registry.edge import views as edge_views
from registry.endpoints import views as endpoint_views
from registry.mlflow_sync import views as mlflow_views
from registry.promotions import views as promotion_views
from registry.versions import views as version_views

app_name = "registry"

urlpatterns = [
    path("models/", version_views.model_list, name="models"),
    path("models/new", version_views.model_register, name="register"),
    path("models/<str:name>/", version_views.model_detail, name="model"),
    path("models/<str:name>/upload", version_views.upload_page, name="upload"),
    path("models/<str:name>/tags", version_views.model_tags, name="model-tags"),
    path("models/<str:name>/aliases", version_views.model_alias_set, name="model-alias-set"),
    path("models/<str:name>/aliases/<str:alias>/delete", version_views.model_alias_delete,
         name="model-alias-delete"),
    path("models/<str:name>/compare", version_views.version_compare, name="compare"),
    path("models/<str:name>/versions/<int:number>/tags", version_views.version_tags, name="version-tags"),
    path("models/<str:name>/import", version_views.version_import, name="import"),
    path("models/<str:name>/versions/<int:number>/", version_views.version_detail, name="version"),
    path("models/<str:name>/versions/<int:number>/trust", version_views.version_trust, name="version-trust"),
    path("models/<str:name>/versions/<int:number>/deploy", deployment_views.version_deploy, name="version-deploy"),
    path("deployments/<uuid:uid>/", deployment_views.deployment_detail, name="deployment"),
    path("models/<str:name>/versions/<int:number>/promote", promotion_views.version_promote, name="version-promote"),
    path("models/<str:name>/environments/<str:env>/", promotion_views.environment_page, name="environment"),
    path("models/<str:name>/environments/<str:env>/rollback", promotion_views.environment_rollback,
         name="rollback"),
    path("models/<str:name>/batch/", batch_views.batch_page, name="batch"),
    path("models/<str:name>/batch/schedules", batch_views.schedule_create, name="batch-schedule-create"),
    path("batch/<uuid:uid>/", batch_views.batch_job_page, name="batch-job"),
    path("batch/<uuid:uid>/cancel", batch_views.batch_job_cancel, name="batch-job-cancel"),
    path("batch-schedules/<int:pk>/toggle", batch_views.schedule_toggle, name="batch-schedule-toggle"),
    path("batch-schedules/<int:pk>/delete", batch_views.schedule_delete, name="batch-schedule-delete"),
    path("models/<str:name>/edge/", edge_views.edge_page, name="edge"),
    path("models/<str:name>/edge/packages", edge_views.package_create, name="edge-package-create"),
    path("models/<str:name>/edge/tokens", edge_views.token_create, name="edge-token-create"),
    path("edge/<uuid:uid>/", edge_views.package_page, name="edge-package"),
    path("edge-tokens/<uuid:uid>/revoke", edge_views.token_revoke, name="edge-token-revoke"),
    path("promotions/", promotion_views.promotion_queue, name="promotions"),
    path("promotions/<uuid:uid>/", promotion_views.promotion_detail, name="promotion"),
    path("promotions/<uuid:uid>/decide", promotion_views.promotion_decide, name="promotion-decide"),
    path("promotions/<uuid:uid>/cancel", promotion_views.promotion_cancel, name="promotion-cancel"),
    path("endpoints/", endpoint_views.endpoint_list_page, name="endpoints"),
    path("endpoints/new", endpoint_views.endpoint_create_page, name="endpoint-create"),
    path("endpoints/<str:endpoint_name>/<str:env>/", endpoint_views.endpoint_page, name="endpoint"),
    path("endpoints/<str:endpoint_name>/<str:env>/rules", endpoint_views.endpoint_rules_page, name="endpoint-rules"),
    path("endpoints/<str:endpoint_name>/<str:env>/delete", endpoint_views.endpoint_delete_page,
         name="endpoint-delete"),
    path("integrations/mlflow/", mlflow_views.connections_page, name="mlflow-connections"),
    path("integrations/mlflow/connect", mlflow_views.connection_create, name="mlflow-connect"),
    path("integrations/mlflow/<uuid:uid>/disable", mlflow_views.connection_disable, name="mlflow-disable"),
    path("integrations/mlflow/jobs/<uuid:uid>/retry", mlflow_views.sync_job_retry, name="mlflow-job-retry"),
]
