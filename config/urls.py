from __future__ import annotations

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from monitoring import views as monitoring_views
from monitoring.datasets import urls as dataset_urls
from portal import twofactor, views
from registry.serving import endpoints as serving_endpoints
from registry.serving import views as serving_views

portal_patterns = (
    [
        path("", views.home, name="home"),
        path("login/", views.login_view, name="login"),
        path("logout/", views.logout_view, name="logout"),
        path("account/", views.account, name="account"),
        path("account/2fa/enroll", twofactor.enroll, name="2fa-enroll"),
        path("account/2fa/verify", twofactor.verify, name="2fa-verify"),
        path("account/tokens/<uuid:uid>/revoke", views.token_revoke, name="token-revoke"),
        path("audit/", views.audit, name="audit"),
        path("audit/verify", views.audit_verify, name="audit-verify"),
        path("audit/events/<int:seq>/", views.audit_event, name="audit-event"),
        path("compliance/processing", monitoring_views.records_of_processing, name="records-of-processing"),
        path("compliance/subjects/", monitoring_views.subject_access, name="subject-access"),
        path("compliance/subjects/reports/<uuid:uid>/", monitoring_views.subject_report, name="subject-report"),
        path("compliance/subjects/reports/<uuid:uid>/download", monitoring_views.subject_report_download,
             name="subject-report-download"),
        path("compliance/erasure/", monitoring_views.subject_erasure, name="subject-erasure"),
        path("audit/verify_export.py", views.audit_verifier_download, name="audit-verifier"),
    ],
    "portal",
)

urlpatterns = [
    path("", include(portal_patterns)),
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("api/v1/", include("portal.api.urls")),
    path("api/v1/", include("registry.api.urls")),
    path("api/v1/", include("monitoring.api.urls")),
    path("api/v1/", include(dataset_urls.api_patterns)),
    path("api/v1/serve/<str:name>/<str:env>/invocations", serving_views.invocations, name="serve-invocations"),
    path("api/v1/serve/endpoints/<str:endpoint_name>/<str:env>/invocations", serving_endpoints.invocations,
         name="serve-endpoint-invocations"),
    path("api/v1/serve/<str:name>/<str:env>/explain", serving_views.explain, name="serve-explain"),
    path("", include("registry.urls")),
    path("", include("monitoring.urls")),
    path("", include("monitoring.datasets.urls")),
    path("metrics", monitoring_views.prometheus_metrics, name="metrics"),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    # The split view serves Swagger UI's start-up script as a file, so the CSP can forbid inline scripts.
    path("api/docs/", SpectacularSwaggerSplitView.as_view(url_name="api-schema"), name="api-docs"),
    path("admin/", admin.site.urls),
]

handler400 = "portal.views.error_400"
handler403 = "portal.views.error_403"
handler404 = "portal.views.error_404"
handler500 = "portal.views.error_500"
