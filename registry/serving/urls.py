"""The scoring handler's URL configuration (``portal.wsgi.LeanHandler``): the one route it serves, so resolving a
scoring request tries one pattern instead of walking the portal's whole tree (a sixth of the request's time)."""

from __future__ import annotations

from django.urls import path

from registry.serving import views as serving_views

urlpatterns = [
    path("api/v1/serve/<str:name>/<str:env>/invocations", serving_views.invocations, name="serve-invocations"),
]

handler400 = "portal.views.error_400"
handler403 = "portal.views.error_403"
handler404 = "portal.views.error_404"
handler500 = "portal.views.error_500"
