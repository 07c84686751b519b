from __future__ import annotations

from django.urls import path

from portal.api import views, webhooks

app_name = "portal_api"

urlpatterns = [
    path("me", views.MeApi.as_view(), name="me"),
    path("tokens/", views.TokenListCreateApi.as_view(), name="tokens"),
    path("tokens/<uuid:uid>/", views.TokenRevokeApi.as_view(), name="token-revoke"),
    path("audit/events", views.AuditEventListApi.as_view(), name="audit-events"),
    path("audit/verify", views.AuditVerifyApi.as_view(), name="audit-verify"),
    path("audit/export", views.AuditExportApi.as_view(), name="audit-export"),
    path("audit/public-key", views.AuditPublicKeyApi.as_view(), name="audit-public-key"),
    path("teams/<slug:slug>/webhooks/", webhooks.WebhookListApi.as_view(), name="webhooks"),
    path("teams/<slug:slug>/webhooks/<int:pk>/deliveries", webhooks.WebhookDeliveriesApi.as_view(),
         name="webhook-deliveries"),
]
