from __future__ import annotations

from django.urls import path

from monitoring import views
from monitoring.experiments import views as experiments

app_name = "monitoring"

urlpatterns = [
    path("monitoring/", views.portfolio, name="portfolio"),
    path("models/<str:name>/environments/<str:env>/monitoring", views.model_monitoring, name="model"),
    path("models/<str:name>/environments/<str:env>/predictions", views.environment_predictions, name="predictions"),
    path("models/<str:name>/environments/<str:env>/monitoring/settings", views.settings_change, name="settings"),
    path("alerts/<uuid:uid>/acknowledge", views.alert_acknowledge, name="alert-acknowledge"),
    path("alerts/<uuid:uid>/resolve", views.alert_resolve, name="alert-resolve"),
    path("models/<str:name>/environments/<str:env>/experiments", experiments.environment_experiments,
         name="experiments"),
    path("experiments/<uuid:uid>/", experiments.experiment_detail, name="experiment"),
    path("experiments/<uuid:uid>/stop", experiments.experiment_stop, name="experiment-stop"),
]
