from __future__ import annotations

from django.urls import path

from monitoring.datasets import api, views

app_name = "datasets"

urlpatterns = [
    path("models/<str:name>/datasets/", views.model_datasets, name="model"),
    path("models/<str:name>/datasets/create", views.snapshot_create, name="create"),
    path("models/<str:name>/environments/<str:env>/retraining-policy", views.policy_set, name="policy"),
    path("datasets/<uuid:uid>/", views.snapshot_page, name="snapshot"),
    path("datasets/<uuid:uid>/download", views.snapshot_download, name="download"),
    path("retraining/<uuid:uid>/close", views.request_close, name="request-close"),
    path("compliance/erased-data", views.erased_data, name="erased-data"),
    path("erased-data/<uuid:uid>/decide", views.erased_data_decide, name="erased-data-decide"),
]

api_patterns = ([
    path("datasets/", api.DatasetListApi.as_view(), name="datasets"),
    path("datasets/<uuid:uid>/", api.DatasetDetailApi.as_view(), name="dataset"),
    path("datasets/<uuid:uid>/download", api.DatasetDownloadApi.as_view(), name="dataset-download"),
    path("models/<str:name>/environments/<str:env>/retraining-policy", api.RetrainingPolicyApi.as_view(),
         name="retraining-policy"),
    path("models/<str:name>/retraining-requests", api.RetrainingRequestListApi.as_view(), name="retraining-requests"),
    path("retraining-requests/<uuid:uid>/close", api.RetrainingRequestCloseApi.as_view(), name="retraining-close"),
    path("models/<str:name>/versions/<int:number>/lineage", api.VersionLineageApi.as_view(), name="version-lineage"),
    path("erased-data-flags/", api.ErasedDataFlagListApi.as_view(), name="erased-data-flags"),
    path("erased-data-flags/<uuid:uid>/decide", api.ErasedDataDecideApi.as_view(), name="erased-data-decide"),
], "datasets_api")
