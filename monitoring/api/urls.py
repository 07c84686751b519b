from __future__ import annotations

from django.urls import path

from monitoring.api import views

app_name = "monitoring_api"

urlpatterns = [
    path("serve/<str:name>/<str:env>/feedback", views.FeedbackApi.as_view(), name="feedback"),
    path("gdpr/subjects/<str:subject_id>/export", views.SubjectExportApi.as_view(), name="gdpr-subject-export"),
    path("gdpr/erasure", views.ErasureApi.as_view(), name="gdpr-erasure"),
    path("models/<str:name>/environments/<str:env>/predictions", views.RecentPredictionsApi.as_view(),
         name="recent-predictions"),
]
