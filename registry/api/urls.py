from __future__ import annotations

from django.urls import path

from registry.api import views

app_name = "registry_api"

urlpatterns = [
    path("models/", views.ModelListCreateApi.as_view(), name="models"),
    path("models/<str:name>/", views.ModelDetailApi.as_view(), name="model"),
    path("models/<str:name>/versions/", views.VersionUploadApi.as_view(), name="version-upload"),
    path("models/<str:name>/versions/import", views.VersionImportApi.as_view(), name="version-import"),
    path("models/<str:name>/versions/<int:number>/", views.VersionDetailApi.as_view(), name="version"),
    path("models/<str:name>/versions/<int:number>/deploy", views.VersionDeployApi.as_view(), name="version-deploy"),
    path("deployments/<uuid:uid>/", views.DeploymentDetailApi.as_view(), name="deployment"),
    path("models/<str:name>/versions/<int:number>/trust", views.VersionTrustApi.as_view(), name="version-trust"),
    path("models/<str:name>/versions/<int:number>/artifact", views.VersionArtifactApi.as_view(),
         name="version-artifact"),
    path("models/<str:name>/versions/<int:number>/reference", views.VersionReferenceApi.as_view(),
         name="version-reference"),
]
