from __future__ import annotations

from django.urls import path

from monitoring.api import views

app_name = "monitoring_api"

urlpatterns = [
    path("serve/<str:name>/<str:env>/feedback", views.FeedbackApi.as_view(), name="feedback"),
]
