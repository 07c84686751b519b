"""Pages for signing in and out, the home page, the account page, the audit trail, and health probes."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import authenticate, login, logout
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.db import connection
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_protect
from django.views.decorators.debug import sensitive_post_parameters
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from portal import selectors, services
from portal.api.errors import json_error_response
from portal.audit.signing import public_key_pem
from portal.audit.verify import audit_chain_verify
from portal.checks import keys_not_set
from portal.forms import AuditFilterForm, LoginForm, TokenCreateForm
from portal.models import ApiToken, AuditEvent
from portal.permissions import has_capability, require_capability
from portal.roles import CAPABILITY_TEXT, ROLE_LABELS, roles_of

logger = logging.getLogger(__name__)



def error_text(exc: Exception) -> str:
    """A ValidationError's (or PermissionDenied's) messages as one line for a page message or a stored reason."""
    return " ".join(getattr(exc, "messages", None) or [str(exc)])


# --- Sign in / out ------------------------------------------------------------------------------------------------

def safe_next_url(request: HttpRequest) -> str:
    """The ``next`` of a form or query when it stays on this site, else ""."""
    next_url = request.POST.get("next") or request.GET.get("next") or ""
    if not url_has_allowed_host_and_scheme(next_url, allowed_hosts={request.get_host()},
                                           require_https=request.is_secure()):
        return ""
    return next_url


@sensitive_post_parameters("password")
@csrf_protect
@never_cache
@require_http_methods(["GET", "POST"])
def login_view(request: HttpRequest) -> HttpResponse:
    next_url = safe_next_url(request)
    if request.user.is_authenticated:
        return redirect(next_url or settings.LOGIN_REDIRECT_URL)
    expired = request.session.pop("portal_expired", False)
    form = LoginForm(request.POST if request.method == "POST" else None)
    status = 200
    if request.method == "POST":
        if form.is_valid():
            username = form.cleaned_data["username"]
            user = authenticate(request, username=username, password=form.cleaned_data["password"])
            if user is not None:
                login(request, user)
                services.session_login(request=request, user=user)
                return redirect(next_url or settings.LOGIN_REDIRECT_URL)
            if getattr(request, "axes_locked_out", False):
                services.session_locked_out(username=username)
                return lockout_response(request)
            services.session_login_failed(username=username)
            form.add_error(None, "Wrong username or password.")
        status = 400 if form.errors and not form.non_field_errors() else 200
    return render(request, "registration/login.html", {"form": form, "next": next_url, "expired": expired},
                  status=status)


def lockout_response(request: HttpRequest, original_response: HttpResponse | None = None,
                     credentials: dict[str, Any] | None = None) -> HttpResponse:
    """What a locked-out browser sees (django-axes calls this too)."""
    minutes = int(settings.AXES_COOLOFF_TIME.total_seconds() // 60)
    message = (f"Too many failed sign-ins. This account is locked from your address for {minutes} minutes; "
               "ask an administrator if you need it sooner.")
    if request.path.startswith("/api/"):
        return json_error_response(request, 429, "locked_out", message)
    return render(request, "registration/login.html",
                  {"form": LoginForm(), "locked_out": True, "lockout_message": message}, status=429)


@require_POST
def logout_view(request: HttpRequest) -> HttpResponse:
    if request.user.is_authenticated:
        services.session_logout(request=request, user=request.user)
    logout(request)
    messages.info(request, "You are signed out.")
    return redirect(settings.LOGOUT_REDIRECT_URL)


# --- Home and account ---------------------------------------------------------------------------------------------

# Where a capability is exercised in the browser, the home page links to it.
CAPABILITY_PAGES: dict[str, tuple[tuple[str, str], ...]] = {
    "view_audit": (("Audit trail", "portal:audit"),),
    "manage_subjects": (("Subject access", "portal:subject-access"), ("Erasure", "portal:subject-erasure")),
    "view_monitoring": (("Monitoring", "monitoring:portfolio"),),
}


@login_required
@require_GET
def home(request: HttpRequest) -> HttpResponse:
    user: Any = request.user
    roles = roles_of(user)
    caps = [code for code in CAPABILITY_TEXT if has_capability(user, code)]
    teams = selectors.team_list(user=user).prefetch_related("members")
    return render(request, "portal/home.html", {
        "roles": [ROLE_LABELS.get(r, r) for r in roles],
        "capabilities": [{"text": CAPABILITY_TEXT[c], "links": [(label, reverse(name)) for label, name in
                                                               CAPABILITY_PAGES.get(c, ())]} for c in caps],
        "teams": teams,
        "all_teams": has_capability(user, "view_all_teams"),
        "recent": selectors.audit_events_for_user(user=user, limit=10),
    })


@sensitive_post_parameters("password")
@login_required
@require_http_methods(["GET", "POST"])
def account(request: HttpRequest) -> HttpResponse:
    user: Any = request.user
    form = TokenCreateForm(request.POST if request.method == "POST" else None)
    new_token = None
    status = 200
    if request.method == "POST":
        if form.is_valid():
            try:
                _token, new_token = services.token_create_for_person(
                    user=user, name=form.cleaned_data["name"],
                    expires_in_days=form.cleaned_data.get("expires_in_days"),
                    password=form.cleaned_data.get("password") or "", request=request)
                form = TokenCreateForm()
            except ValidationError as exc:
                for field, errs in exc.message_dict.items():
                    form.add_error(field if field in form.fields else None, errs)
                status = 400
            except services.ReauthenticationFailed as exc:
                form.add_error("password", str(exc))
                status = 403
        else:
            status = 400
    # The secret is rendered in this response only and never stored, so no redirect-after-post here.
    return render(request, "portal/account.html", {
        "form": form,
        "new_token": new_token,
        "needs_password": services.token_needs_reauthentication(user),
        "tokens": selectors.token_list(user=user),
        "roles": [ROLE_LABELS.get(r, r) for r in roles_of(user)],
        "teams": selectors.team_list(user=user),
        "recent": selectors.audit_events_for_user(user=user, limit=20),
    }, status=status)


@login_required
@require_POST
def token_revoke(request: HttpRequest, uid: str) -> HttpResponse:
    token = ApiToken.objects.filter(uid=uid, user_id=int(request.user.pk or 0)).first()
    if token is None:
        messages.error(request, "That token does not exist or is not yours.")
        return redirect("portal:account")
    services.token_revoke(token=token, actor=request.user)
    messages.success(request, f"Token “{token.name}” is revoked; calls with it now fail.")
    return redirect("portal:account")


# --- Audit trail --------------------------------------------------------------------------------------------------

@login_required
@require_GET
def audit(request: HttpRequest) -> HttpResponse:
    require_capability(request.user, "view_audit")
    form = AuditFilterForm(request.GET or None)
    events = selectors.audit_event_list()
    status = 200
    if request.GET:
        if form.is_valid():
            filters = {k: v for k, v in form.cleaned_data.items() if v not in ("", None)}
            events = selectors.audit_event_list(**filters)
        else:
            status = 400
            events = events.none()
    page = Paginator(events, 50).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    export_query = ""
    if has_capability(request.user, "export_audit") and status == 200:
        from urllib.parse import urlencode

        names = {"since": "from", "until": "to"}
        cleaned = form.cleaned_data if request.GET else {}
        export_query = urlencode({names.get(k, k): (v.isoformat() if hasattr(v, "isoformat") else v)
                                  for k, v in cleaned.items() if v not in ("", None)})
    activity = _activity_chart(events)
    return render(request, "portal/audit.html", {
        "form": form, "page": page, "query": query.urlencode(), "activity": activity, "audit_links": True,
        "can_export": has_capability(request.user, "export_audit"), "export_query": export_query,
        "can_subjects": has_capability(request.user, "manage_subjects"),
        "public_key": public_key_pem() if has_capability(request.user, "export_audit") else "",
    }, status=status)


VERIFIER = Path(settings.BASE_DIR) / "scripts" / "verify_export.py"


@login_required
@require_GET
def audit_verifier_download(request: HttpRequest) -> HttpResponse:
    """``scripts/verify_export.py``, the offline checker of audit exports, as the audit page's download."""
    require_capability(request.user, "view_audit")
    if not VERIFIER.is_file():
        raise Http404("The verifier script is not installed with this portal.")
    response = HttpResponse(VERIFIER.read_bytes(), content_type="text/x-python; charset=utf-8")
    response["Content-Disposition"] = 'attachment; filename="verify_export.py"'
    return response


def _activity_chart(events: Any) -> dict[str, Any]:
    """Events per day and domain (the action's prefix) over the filtered events' last 30 days, for Plotly."""
    from django.db.models import Count
    from django.db.models.functions import TruncDay

    since = timezone.now() - timedelta(days=30)
    counts = (events.filter(timestamp__gte=since).order_by().annotate(day=TruncDay("timestamp"))
              .values("day", "action").annotate(n=Count("seq")))
    series: dict[str, dict[str, int]] = {}
    for row in counts:
        domain = row["action"].split(".", 1)[0]
        day = row["day"].date().isoformat()
        series.setdefault(domain, {})
        series[domain][day] = series[domain].get(day, 0) + row["n"]
    if not series:
        return {"days": [], "series": {}}
    today = timezone.now().date()
    days = [(today - timedelta(days=n)).isoformat() for n in range(30, -1, -1)]  # every day, so the axis reads
    return {"days": days, "series": {k: [v.get(d, 0) for d in days] for k, v in sorted(series.items())}}


@login_required
@require_GET
def audit_event(request: HttpRequest, seq: int) -> HttpResponse:
    require_capability(request.user, "view_audit")
    event = AuditEvent.objects.filter(seq=seq).first()
    if event is None:
        raise Http404("No such event.")
    before = event.before if isinstance(event.before, dict) else ({} if event.before is None else {"value": event.before})
    after = event.after if isinstance(event.after, dict) else ({} if event.after is None else {"value": event.after})
    diff = [{"key": k, "before": before.get(k), "after": after.get(k), "changed": before.get(k) != after.get(k),
             "in_before": k in before, "in_after": k in after}
            for k in sorted(set(before) | set(after))]
    return render(request, "portal/audit_event.html", {"event": event, "diff": diff,
                                                       "metadata": json.dumps(event.metadata, indent=2,
                                                                              ensure_ascii=False, default=str)})


@login_required
@require_POST
def audit_verify(request: HttpRequest) -> HttpResponse:
    require_capability(request.user, "view_audit")
    verdict = audit_chain_verify(actor=request.user, source="page")
    newest = verdict.newest
    anchored = (f"; it agrees with checkpoint #{newest['number']} ({newest['time']}) and every one before it"
                if newest else "; no checkpoint has been written yet")
    if verdict.ok:
        messages.success(request, f"The chain holds: {verdict.events} events, head {verdict.head[:16]}…{anchored}")
    else:
        messages.error(request, f"The chain is broken at event #{verdict.first_bad}: {verdict.reason}.")
    return redirect("portal:audit")


# --- Probes -------------------------------------------------------------------------------------------------------

@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


def _check_database() -> str | None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:  # any failure means not ready
        return f"database: {type(exc).__name__}"
    return None


def _check_broker() -> str | None:
    url = str(settings.CELERY_BROKER_URL)
    try:
        if settings.BROKER_IS_FILESYSTEM:
            folder = Path(str(settings.CELERY_BROKER_TRANSPORT_OPTIONS["data_folder_in"]))
            if not folder.is_dir() or not (folder.stat().st_mode & 0o200):
                return "broker: queue folder missing or read-only"
        elif url.startswith(("redis://", "rediss://")):
            import redis

            redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping()
        else:
            from kombu import Connection

            with Connection(url, connect_timeout=1) as conn:
                conn.ensure_connection(max_retries=1)
    except Exception as exc:  # any failure means not ready
        return f"broker: {type(exc).__name__}"
    return None


# Why the model sandbox (bubblewrap, or the model-host service) cannot load models here, or None: without it no
# pickle, joblib, skops or MLflow model is loaded. The registry owns the sandbox and registers its check when it
# starts (RegistryConfig.ready); imports point registry -> portal only.
_sandbox_unavailable: Callable[[], str | None] | None = None


def register_sandbox_check(check: Callable[[], str | None]) -> None:
    global _sandbox_unavailable
    _sandbox_unavailable = check


# What the sandbox's process boundary has here beyond what always holds (its cgroups): a line for /readyz, or None.
_sandbox_detail: Callable[[], str | None] | None = None


def register_sandbox_detail(detail: Callable[[], str | None]) -> None:
    global _sandbox_detail
    _sandbox_detail = detail


def _check_sandbox() -> str | None:
    reason = _sandbox_unavailable() if _sandbox_unavailable is not None else None
    return f"sandbox: {reason}" if reason else None


def _check_keys() -> str | None:
    """Keys production must set explicitly (portal/checks.py): a pod without them takes no traffic."""
    missing = keys_not_set()
    return f"keys: not set: {', '.join(missing)}" if missing else None


@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    sandbox = _check_sandbox()
    keys = _check_keys()
    problems = [p for p in (_check_database(), _check_broker(), keys) if p]
    if sandbox and settings.PORTAL_SANDBOX_REQUIRED:
        problems.append(sandbox)
    body = {"status": "ok" if not problems else "unavailable", "checks": {
        "database": "ok" if not any(p.startswith("database") for p in problems) else "failing",
        "broker": "ok" if not any(p.startswith("broker") for p in problems) else "failing",
        "sandbox": "ok" if not sandbox else "failing" if settings.PORTAL_SANDBOX_REQUIRED else "unavailable",
        "keys": "ok" if not keys else "failing",
    }}
    if keys:
        body["keys"] = keys.removeprefix("keys: ")
    if sandbox:
        body["sandbox"] = sandbox.removeprefix("sandbox: ")
    detail = _sandbox_detail() if _sandbox_detail is not None and not sandbox else None
    if detail:
        body["sandbox_cgroups"] = detail  # informative: a sandbox without cgroups is still ready
    if problems:
        logger.warning("readiness check failed: %s", "; ".join(problems))
        return JsonResponse(body, status=503)
    return JsonResponse(body)


# --- Errors: JSON under /api/, pages elsewhere ----------------------------------------------------------------------

def _error(request: HttpRequest, status: int, code: str, message: str, template: str) -> HttpResponse:
    if request.path.startswith("/api/"):
        return json_error_response(request, status, code, message)
    return render(request, template, {"message": message, "status": status}, status=status)


def error_400(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    return _error(request, 400, "bad_request", "The request could not be understood.", "errors/error.html")


def error_403(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    message = str(exception) if exception and str(exception) else "You do not have permission to do this."
    return _error(request, 403, "permission_denied", message, "errors/error.html")


def error_404(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    return _error(request, 404, "not_found", "There is nothing at this address.", "errors/error.html")


def error_500(request: HttpRequest) -> HttpResponse:
    return _error(request, 500, "server_error", "The portal failed to handle this request; it has been logged.",
                  "errors/error.html")

