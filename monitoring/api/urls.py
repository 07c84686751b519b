from __future__ import annotations

from django.urls import path

from monitoring.api import monitoring, views
from monitoring.experiments import api as experiments

app_name = "monitoring_api"

urlpatterns = [
    path("serve/<str:name>/<str:env>/feedback", views.FeedbackApi.as_view(), name="feedback"),
    path("gdpr/subjects/<str:subject_id>/export", views.SubjectExportApi.as_view(), name="gdpr-subject-export"),
    path("gdpr/erasure", views.ErasureApi.as_view(), name="gdpr-erasure"),
    path("models/<str:name>/environments/<str:env>/predictions", views.RecentPredictionsApi.as_view(),
         name="recent-predictions"),
    path("models/<str:name>/environments/<str:env>/monitoring", monitoring.MonitoringApi.as_view(),
         name="monitoring"),
    path("models/<str:name>/monitoring-settings", monitoring.MonitoringSettingsApi.as_view(),
         name="monitoring-settings"),
    path("alerts/", monitoring.AlertListApi.as_view(), name="alerts"),
    path("alerts/<uuid:uid>/acknowledge", monitoring.AlertAcknowledgeApi.as_view(), name="alert-acknowledge"),
    path("alerts/<uuid:uid>/resolve", monitoring.AlertResolveApi.as_view(), name="alert-resolve"),
    path("experiments/", experiments.ExperimentListApi.as_view(), name="experiments"),
    path("experiments/plan", experiments.ExperimentPlanApi.as_view(), name="experiment-plan"),
    path("experiments/<uuid:uid>/", experiments.ExperimentDetailApi.as_view(), name="experiment-detail"),
    path("experiments/<uuid:uid>/stop", experiments.ExperimentStopApi.as_view(), name="experiment-stop"),
]
