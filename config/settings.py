"""The portal's only settings module: everything that varies between machines comes from the environment.

See the README's table of variables. Nonsense values stop the process at import with ImproperlyConfigured.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from portal.env import env_bool, env_choice, env_float, env_int, env_list, env_optional, env_str, env_url
from portal import demo_env

BASE_DIR = Path(__file__).resolve().parent.parent

# MLflow and friends must never phone home, whatever imports them later in this process.
for _quiet in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "DISABLE_TELEMETRY", "HF_HUB_OFFLINE"):
    os.environ.setdefault(_quiet, "1")
os.environ.setdefault("MLFLOW_TRACKING_URI", "")

VAR_DIR = Path(env_str("PORTAL_VAR_DIR", str(BASE_DIR / "var"))).resolve()
VAR_DIR.mkdir(parents=True, exist_ok=True)
# A var folder where `make run` set up the demo holds demo.env (its secrets, PORTAL_DEBUG=1, its URLs): loaded before
# anything else is read, so manage.py works from any terminal. Explicit variables win; PORTAL_DEBUG=0 ignores it.
DEMO_ENV_LOADED = demo_env.load(VAR_DIR)

# PORTAL_DEBUG is the demo mode: generated secrets, relaxed transport security, demo seeding. Django's own DEBUG
# (its debug pages listing every route, settings and local variables) only with PORTAL_DEBUG_PAGES on top; the demo
# shows the production 404 and 500 pages otherwise.
PORTAL_DEBUG = env_bool("PORTAL_DEBUG", False)
_debug_pages = env_bool("PORTAL_DEBUG_PAGES", False)
if _debug_pages and not PORTAL_DEBUG:
    raise ImproperlyConfigured("PORTAL_DEBUG_PAGES shows Django's debug pages (routes, settings, local variables): "
                               "only with PORTAL_DEBUG=1, never in production.")
DEBUG = PORTAL_DEBUG and _debug_pages


# Management commands that only read the code and migrations (CI's "models match migrations" check): they sign and
# encrypt nothing, so they run without the production secret.
OFFLINE_COMMANDS = frozenset({"makemigrations", "showmigrations", "sqlmigrate", "help", "version"})


def _offline_command() -> bool:
    import sys

    argv = sys.argv
    return len(argv) > 1 and os.path.basename(argv[0]) in ("manage.py", "django-admin") and argv[1] in OFFLINE_COMMANDS


def _secret_key() -> str:
    configured = env_optional("PORTAL_SECRET_KEY")
    if configured:
        if len(configured) < 50 or len(set(configured)) < 5:
            raise ImproperlyConfigured("PORTAL_SECRET_KEY must be at least 50 characters with 5 distinct ones.")
        return configured
    if not PORTAL_DEBUG:
        if _offline_command():
            return secrets.token_urlsafe(64)  # nothing signed or encrypted outlives this process
        raise ImproperlyConfigured("PORTAL_SECRET_KEY (or PORTAL_SECRET_KEY_FILE) must be set when PORTAL_DEBUG is off "
                                   f"(the demo's `make run` keeps it in {VAR_DIR / demo_env.FILE_NAME}, which this var "
                                   "folder does not have).")
    # Development without `make run` (PORTAL_DEBUG=1 by hand): one random key per checkout, kept under var/.
    key_file = VAR_DIR / "secret_key"
    if not key_file.exists():
        key_file.write_text(secrets.token_urlsafe(64), encoding="utf-8")
        key_file.chmod(0o600)
    return key_file.read_text(encoding="utf-8").strip()


SECRET_KEY = _secret_key()
ALLOWED_HOSTS = env_list("PORTAL_ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("PORTAL_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_beat",
    "axes",
    "django_otp",
    "django_otp.plugins.otp_totp",
    "django_otp.plugins.otp_static",
    "portal.apps.PortalConfig",
    "registry.apps.RegistryConfig",
    "monitoring.apps.MonitoringConfig",
]

MIDDLEWARE = [
    "portal.middleware.RequestContextMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "portal.middleware.SecurityHeadersMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django_otp.middleware.OTPMiddleware",
    "portal.middleware.IdleSessionTimeoutMiddleware",
    "portal.twofactor.TwoFactorMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "portal.context_processors.navigation",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------------------------
_database_url = env_url(
    "DATABASE_URL",
    f"sqlite:///{VAR_DIR / 'portal.sqlite3'}",
    schemes={"postgres", "postgresql", "pgsql", "sqlite"},
)
assert _database_url is not None
DATABASES = {
    "default": dj_database_url.parse(
        _database_url,
        conn_max_age=env_int("PORTAL_DB_CONN_MAX_AGE", 60, minimum=0),
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Embedded mode: web, worker and beat share one file. WAL lets readers run beside the writer, and IMMEDIATE
    # transactions take the write lock up front instead of failing with "database is locked" on upgrade.
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;",
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Celery ---------------------------------------------------------------------------------------------------
CELERY_BROKER_URL = env_url(
    "CELERY_BROKER_URL", "filesystem://", schemes={"filesystem", "redis", "rediss", "amqp", "amqps"}
)
assert CELERY_BROKER_URL is not None
BROKER_IS_FILESYSTEM = CELERY_BROKER_URL.startswith("filesystem://")
if BROKER_IS_FILESYSTEM:
    _queue_dir = VAR_DIR / "celery" / "queue"
    _processed_dir = VAR_DIR / "celery" / "processed"
    _control_dir = VAR_DIR / "celery" / "control"
    for _d in (_queue_dir, _processed_dir, _control_dir):
        _d.mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_queue_dir),
        "data_folder_out": str(_queue_dir),
        "processed_folder": str(_processed_dir),
        "store_processed": False,
        # Broadcasts (remote control, revoke) keep their exchange tables here, not in the working directory.
        "control_folder": str(_control_dir),
    }
else:
    _visibility = env_int("PORTAL_CELERY_VISIBILITY_TIMEOUT", 3600, minimum=5)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        # A task not acknowledged within this window is handed to another worker (acks_late below). Workers look
        # for such tasks every few seconds (kombu's default sweep is every 100 s, whatever the window).
        "visibility_timeout": _visibility,
        "unacked_restore_interval": max(1, min(10, _visibility // 2)),
        "unacked_restore_throttle": 1,
    }
# Queues, so that each kind of work can run on its own hosts (`celery worker -Q score`); a worker started without
# -Q takes from all of them. `scan`: the sandboxed check of uploads; `deploy`: deployments; `score`: batch jobs;
# `monitor`: the prediction flusher, rollups and alerts; `celery`: the rest (webhooks, email, audit checks, MLflow sync).
# PORTAL_CELERY_QUEUE sends every task to that one queue instead (a private worker, as the tests start).
PORTAL_CELERY_QUEUES = ("celery", "scan", "deploy", "score", "monitor")
_single_queue = env_str("PORTAL_CELERY_QUEUE", "")
CELERY_TASK_DEFAULT_QUEUE = _single_queue or "celery"
if not _single_queue:
    from kombu import Queue

    CELERY_TASK_QUEUES = [Queue(name) for name in PORTAL_CELERY_QUEUES]
    CELERY_TASK_ROUTES = {
        "registry.tasks.version_scan": {"queue": "scan"},
        "registry.tasks.version_explain": {"queue": "scan"},
        "registry.tasks.deployment*": {"queue": "deploy"},
        "registry.tasks.batch_*": {"queue": "score"},
        # An edge package converts and proves the version in the sandbox, as a deployment does
        "registry.tasks.edge_package_build": {"queue": "deploy"},
        # A snapshot cut runs for minutes: with the batch work, never holding up the prediction-log flushers.
        "monitoring.tasks.snapshot_cut": {"queue": "score"},
        # A subject access report runs each decision's version in a sandboxed host for seconds: the same.
        "monitoring.tasks.subject_report": {"queue": "score"},
        "monitoring.tasks.*": {"queue": "monitor"},
    }
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ALWAYS_EAGER = False
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Sending a task while the broker restarts waits for it (about 20 s at most) instead of failing at once: a batch
# chunk's follow-up or a deployment queued on commit is not dropped by a Redis restart. Past that, the reapers
# (beat, every minute) hand out again what is left pending.
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 20, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_TIMEZONE = "UTC"
# Live predictions a candidate must have answered in the environment below the target (dev for stage, stage for prod)
# before its promotion may be approved, and (where the model's accuracy is judged) enough of them with ground truth;
# 0 turns both requirements off.
PORTAL_PROMOTION_MIN_PREDICTIONS = env_int("PORTAL_PROMOTION_MIN_PREDICTIONS", 100, minimum=0)
PORTAL_DEPLOYMENT_STALE_SECONDS = env_int("PORTAL_DEPLOYMENT_STALE_SECONDS", 600, minimum=30)
CELERY_BEAT_SCHEDULE = {
    "reap-stale-deployments": {"task": "registry.tasks.deployments_reap", "schedule": timedelta(seconds=60)},
    "reap-stale-batch-jobs": {"task": "registry.tasks.batch_reap", "schedule": timedelta(seconds=60)},
    # Blocked promotion requests whose gates cleared (traffic, ground truth, a trust decision): approvers are asked
    "promotions-recheck": {"task": "registry.tasks.promotions_recheck",
                           "schedule": timedelta(seconds=env_int("PORTAL_PROMOTION_RECHECK_SECONDS", 60, minimum=10))},
    # MLflow connections: versions whose webhook never arrived, and sync jobs whose retry is overdue
    "mlflow-reconcile": {"task": "registry.tasks.mlflow_reconcile",
                         "schedule": timedelta(seconds=env_int("PORTAL_MLFLOW_RECONCILE_SECONDS", 60, minimum=10))},
    "flush-predictions": {
        "task": "monitoring.tasks.flush_predictions",
        "schedule": timedelta(seconds=env_int("PORTAL_FLUSH_SECONDS", 2, minimum=1)),
    },
    "purge-old-payloads": {
        "task": "monitoring.tasks.purge_payloads",
        "schedule": timedelta(hours=env_int("PORTAL_RETENTION_CHECK_HOURS", 6, minimum=1)),
    },
    "monitoring-partitions": {"task": "monitoring.tasks.partitions_maintain", "schedule": timedelta(hours=1)},
    "monitoring-rollups": {
        "task": "monitoring.tasks.rollup",
        "schedule": timedelta(seconds=env_int("PORTAL_ROLLUP_SECONDS", 30, minimum=5)),
    },
    "datasets-retraining": {
        "task": "monitoring.tasks.retraining_evaluate",
        "schedule": timedelta(seconds=env_int("PORTAL_RETRAINING_SECONDS", 60, minimum=10)),
    },
    "datasets-reap": {"task": "monitoring.tasks.snapshots_reap", "schedule": timedelta(seconds=60)},
    "monitoring-alerts": {
        "task": "monitoring.tasks.evaluate_alerts",
        "schedule": timedelta(seconds=env_int("PORTAL_ALERT_SECONDS", 60, minimum=10)),
    },
    "monitoring-attribution-drift": {
        "task": "monitoring.tasks.attribution_drift",
        "schedule": timedelta(minutes=env_int("PORTAL_ATTRIBUTION_DRIFT_MINUTES", 60, minimum=5)),
    },
    "monitoring-experiments": {
        "task": "monitoring.tasks.experiments_check",
        "schedule": timedelta(seconds=env_int("PORTAL_EXPERIMENT_SECONDS", 60, minimum=10)),
    },
    "verify-audit-chain-daily": {
        "task": "portal.tasks.audit_chain_verify",
        "schedule": timedelta(hours=env_int("PORTAL_AUDIT_VERIFY_HOURS", 24, minimum=1)),
    },
    "audit-checkpoint": {
        "task": "portal.tasks.audit_checkpoint",
        "schedule": timedelta(minutes=env_int("PORTAL_AUDIT_CHECKPOINT_MINUTES", 60, minimum=1, maximum=24 * 60)),
    },
}

# --- Cache (lockout counters share it; per-token rate limits will too) ----------------------------------------
_cache_url = env_url("PORTAL_CACHE_URL", None, schemes={"redis", "rediss", "file", "locmem"})
if _cache_url is None:
    _cache_url = CELERY_BROKER_URL if CELERY_BROKER_URL.startswith(("redis://", "rediss://")) else "file://"
if _cache_url.startswith(("redis://", "rediss://")):
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": _cache_url}}
elif _cache_url.startswith("locmem"):
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
else:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": str(VAR_DIR / "cache"),
        }
    }

# --- Authentication, sessions, lockout ------------------------------------------------------------------------
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 12}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "portal:login"
LOGIN_REDIRECT_URL = "portal:home"
LOGOUT_REDIRECT_URL = "portal:login"

SESSION_IDLE_SECONDS = env_int("PORTAL_SESSION_IDLE_MINUTES", 30, minimum=1, maximum=24 * 60) * 60
SESSION_COOKIE_AGE = SESSION_IDLE_SECONDS
SESSION_EXPIRE_AT_BROWSER_CLOSE = True
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"

AXES_FAILURE_LIMIT = env_int("PORTAL_LOGIN_FAILURE_LIMIT", 5, minimum=1, maximum=100)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("PORTAL_LOCKOUT_MINUTES", 15, minimum=1))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_CALLABLE = "portal.views.lockout_response"
AXES_VERBOSE = False
AXES_ENABLE_ACCESS_FAILURE_LOG = False

# --- Transport security: on unless PORTAL_DEBUG ---------------------------------------------------------------
SECURE_SSL_REDIRECT = env_bool("PORTAL_SECURE_SSL_REDIRECT", not PORTAL_DEBUG)
SESSION_COOKIE_SECURE = env_bool("PORTAL_SECURE_COOKIES", not PORTAL_DEBUG)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_HSTS_SECONDS = env_int("PORTAL_HSTS_SECONDS", 0 if PORTAL_DEBUG else 31_536_000, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("PORTAL_HSTS_INCLUDE_SUBDOMAINS", SECURE_HSTS_SECONDS > 0)
SECURE_HSTS_PRELOAD = env_bool("PORTAL_HSTS_PRELOAD", SECURE_HSTS_SECONDS > 0)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
if env_bool("PORTAL_BEHIND_TLS_PROXY", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$"]
# How many reverse proxies in front of the portal append to X-Forwarded-For (0: trust only REMOTE_ADDR).
PORTAL_TRUSTED_PROXY_COUNT = env_int("PORTAL_TRUSTED_PROXY_COUNT", 0, minimum=0, maximum=5)
AXES_IPWARE_PROXY_COUNT = PORTAL_TRUSTED_PROXY_COUNT or None

# --- Static files ---------------------------------------------------------------------------------------------
STATIC_URL = "/static/"
STATIC_ROOT = VAR_DIR / "staticfiles"
STATIC_ROOT.mkdir(exist_ok=True)
STATICFILES_DIRS = [BASE_DIR / "static"]
ARTIFACT_STORAGE = env_choice("PORTAL_ARTIFACT_STORAGE", "file", choices={"file", "s3"})
if ARTIFACT_STORAGE == "s3":
    _artifacts: dict[str, object] = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": env_str("PORTAL_S3_BUCKET", required=True),
            "endpoint_url": env_optional("PORTAL_S3_ENDPOINT_URL"),
            "region_name": env_optional("PORTAL_S3_REGION"),
            "access_key": env_optional("PORTAL_S3_ACCESS_KEY_ID"),
            "secret_key": env_optional("PORTAL_S3_SECRET_ACCESS_KEY"),
            "file_overwrite": False,
            "default_acl": None,
            "querystring_auth": True,
        },
    }
else:
    _artifacts = {"BACKEND": "django.core.files.storage.FileSystemStorage",
                  "OPTIONS": {"location": VAR_DIR / "artifacts", "file_permissions_mode": 0o640}}
# Signed audit checkpoints (portal/audit/checkpoints.py): under checkpoints/ of the artifact store, or on S3 in a
# bucket of their own that can have Object Lock (PORTAL_S3_CHECKPOINT_BUCKET); never only in the database.
_checkpoints: dict[str, object] = _artifacts
if ARTIFACT_STORAGE == "s3" and env_optional("PORTAL_S3_CHECKPOINT_BUCKET"):
    _checkpoints = {**_artifacts, "OPTIONS": {**_artifacts["OPTIONS"],  # type: ignore[dict-item]
                                             "bucket_name": env_str("PORTAL_S3_CHECKPOINT_BUCKET")}}
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": VAR_DIR / "media"}},
    "artifacts": _artifacts,
    "audit_checkpoints": _checkpoints,
    # Hashed, compressed and cached for a year in the DEBUG demo too (portal/staticfiles.py).
    "staticfiles": {"BACKEND": "portal.staticfiles.StaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = PORTAL_DEBUG  # a fresh checkout's runserver, before any collectstatic
WHITENOISE_AUTOREFRESH = False  # files are indexed once at start: the collected, compressed copies are the ones served

LANGUAGE_CODE = "en-gb"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

# --- REST API -------------------------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "portal.authentication.BearerTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": [
        "rest_framework.parsers.JSONParser",
        "rest_framework.parsers.MultiPartParser",
        "rest_framework.parsers.FormParser",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "portal.api.pagination.PortalPagination",
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "portal.api.errors.exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "MLOps portal API",
    "DESCRIPTION": "Registry, promotion, serving, monitoring and audit. Authenticate with `Authorization: Bearer <token>`.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    # One name for the dev/stage/prod choice set, wherever a serializer uses it.
    "ENUM_NAME_OVERRIDES": {"EnvironmentEnum": "registry.models.Environment"},
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums", "portal.api.errors.document_errors"],
}

# --- Logging: one line per record, with the request id ---------------------------------------------------------
LOG_LEVEL = env_choice("PORTAL_LOG_LEVEL", "INFO", choices={"DEBUG", "INFO", "WARNING", "ERROR"})
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_context": {"()": "portal.context.RequestContextLogFilter"}},
    "formatters": {
        "line": {"format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "line", "filters": ["request_context"]},
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        "axes": {"level": "WARNING"},
    },
}

# --- Uploads: streamed to disk, never held in memory --------------------------------------------------------
FILE_UPLOAD_TEMP_DIR = VAR_DIR / "uploads"
FILE_UPLOAD_TEMP_DIR.mkdir(exist_ok=True)
FILE_UPLOAD_MAX_MEMORY_SIZE = 0
FILE_UPLOAD_HANDLERS = ["registry.versions.uploads.HashingUploadHandler"]
DATA_UPLOAD_MAX_MEMORY_SIZE = 10 * 1024 * 1024  # form fields other than files
PORTAL_MAX_UPLOAD_BYTES = env_int("PORTAL_MAX_UPLOAD_MB", 8192, minimum=1) * 1024 * 1024
PORTAL_MAX_UNPACKED_BYTES = env_int("PORTAL_MAX_UNPACKED_MB", 16384, minimum=1) * 1024 * 1024
PORTAL_MAX_ARCHIVE_MEMBERS = env_int("PORTAL_MAX_ARCHIVE_MEMBERS", 10000, minimum=1)
PORTAL_MAX_COMPRESSION_RATIO = env_int("PORTAL_MAX_COMPRESSION_RATIO", 200, minimum=2)
PORTAL_SANDBOX_TIMEOUT_SECONDS = env_int("PORTAL_SANDBOX_TIMEOUT_SECONDS", 120, minimum=5)
PORTAL_MLFLOW_TRACKING_URI = env_url("PORTAL_MLFLOW_TRACKING_URI", None,
                                     schemes={"http", "https", "sqlite", "postgresql", "file"})
PORTAL_SERVE_RATE_LIMIT = env_int("PORTAL_SERVE_RATE_LIMIT", 5000, minimum=0)  # requests/second/token; 0: off
PORTAL_PREDICTION_BUFFER_URL = env_url(
    "PORTAL_PREDICTION_BUFFER_URL",
    CELERY_BROKER_URL if CELERY_BROKER_URL.startswith(("redis://", "rediss://")) else None,
    schemes={"redis", "rediss"},
)
# Prediction-log ingestion (Redis Streams, monitoring/flush.py): the stream keys records are spread over (a Redis
# Cluster places each on its own slot), the records all keys together may hold before XADD trims the oldest unflushed
# ones, the share of that bound at which the flushers raise the alarm, and how long a record read by a flusher may
# stay unacknowledged before another flusher takes it over (a flusher that died mid-batch).
PORTAL_PREDICTION_STREAMS = env_int("PORTAL_PREDICTION_STREAMS", 4, minimum=1, maximum=256)
PORTAL_PREDICTION_BUFFER_MAXLEN = env_int("PORTAL_PREDICTION_BUFFER_MAXLEN", 4_000_000, minimum=1000)
PORTAL_PREDICTION_BUFFER_ALARM = env_float("PORTAL_PREDICTION_BUFFER_ALARM", 0.5, minimum=0.01, maximum=1.0)
PORTAL_PREDICTION_CLAIM_SECONDS = env_float("PORTAL_PREDICTION_CLAIM_SECONDS", 30.0, minimum=0.1, maximum=86400.0)
PORTAL_SUBJECT_HASH_KEY = env_optional("PORTAL_SUBJECT_HASH_KEY") or hashlib.sha256(
    ("subject-hash:" + SECRET_KEY).encode()).hexdigest()
PORTAL_SANDBOX_MEMORY_MB = env_int("PORTAL_SANDBOX_MEMORY_MB", 4096, minimum=256)
# Without a working sandbox, /readyz fails unless this is off (hosts that serve only ONNX models).
PORTAL_SANDBOX_REQUIRED = env_bool("PORTAL_SANDBOX_REQUIRED", True)
PORTAL_SANDBOX_TMP_MB = env_int("PORTAL_SANDBOX_TMP_MB", 1024, minimum=16)  # the sandbox's private /tmp
# Model hosts (every process of their sandbox, and its session) run at this niceness (0-19), so that a model that
# computes or spins takes CPU from the web and worker processes only when they leave it idle (registry/sandbox/launch.py).
# One-shot checks keep the portal's priority: they have RLIMIT_CPU, and a starved check would time out as a bad model.
# 10 by default (a tenth of the portal's CPU weight when both want it): bench/isolation.py, quiet 2-core machine, two
# runs each, the benign model's p99 under attack against quiet: 3.39x at 0, 1.23x at 10, 1.37x at 19. At 19 on the
# shared VM saturated by other work (load 20-28), a host's warm-up did not answer in 120 s; 10 leaves it more.
PORTAL_MODEL_HOST_NICE = env_int("PORTAL_MODEL_HOST_NICE", 10, minimum=0, maximum=19)
# Containers that may not create namespaces (compose, Kubernetes) load models in the model-host service instead
# (registry/sandbox/service.py: a container with no credential and no egress): tcp://HOST:PORT or unix:/PATH.
PORTAL_MODEL_HOST_URL = env_optional("PORTAL_MODEL_HOST_URL") or ""
if PORTAL_MODEL_HOST_URL and not PORTAL_MODEL_HOST_URL.startswith(("tcp://", "unix:")):
    raise ImproperlyConfigured(
        f"PORTAL_MODEL_HOST_URL must be tcp://HOST:PORT or unix:/PATH, not {PORTAL_MODEL_HOST_URL!r}")
# Model hosts: sandboxed processes that serve artifacts whose loaders run code (registry/sandbox/hosts.py).
PORTAL_MODEL_HOSTS_PER_PROCESS = env_int("PORTAL_MODEL_HOSTS_PER_PROCESS", 8, minimum=1)
PORTAL_MODEL_HOST_IDLE_SECONDS = env_int("PORTAL_MODEL_HOST_IDLE_SECONDS", 900, minimum=10)
PORTAL_MODEL_HOST_TIMEOUT_SECONDS = env_int("PORTAL_MODEL_HOST_TIMEOUT_SECONDS", 30, minimum=1)
# A host's CPU budget: seconds of CPU it may burn between requests (past that it is stopped, as for a crash), and
# the CPUs its cgroup may use at once (cpu.max, where this machine delegates a cgroup v2 to the portal).
PORTAL_MODEL_HOST_IDLE_CPU_SECONDS = env_float("PORTAL_MODEL_HOST_IDLE_CPU_SECONDS", 5.0, minimum=0.5, maximum=3600.0)
PORTAL_MODEL_HOST_CPU_SHARE = env_float("PORTAL_MODEL_HOST_CPU_SHARE", 1.0, minimum=0.1, maximum=256.0)
# Real-time scoring (issue 31): the longest a request waits for its model (a host's answer, or an in-process ONNX
# run, stopped by onnxruntime's terminate flag), plus a second per 1,000 rows; batch and warm-up keep the host timeout.
PORTAL_SCORING_TIMEOUT_SECONDS = env_int("PORTAL_SCORING_TIMEOUT_SECONDS", 5, minimum=1)
# Explanations (issue 37): the seconds a version's global SHAP importance may take at scan time (in the sandbox), and
# the budget of one explain request's model-agnostic explainer (a tree or linear explainer takes milliseconds); the
# host answering an explain request is given the budget plus PORTAL_EXPLAIN_TIMEOUT_SECONDS (its first explain
# imports shap) before it is killed.
PORTAL_EXPLAIN_GLOBAL_SECONDS = env_int("PORTAL_EXPLAIN_GLOBAL_SECONDS", 30, minimum=1)
PORTAL_EXPLAIN_BUDGET_SECONDS = env_float("PORTAL_EXPLAIN_BUDGET_SECONDS", 5.0, minimum=0.1, maximum=600.0)
PORTAL_EXPLAIN_TIMEOUT_SECONDS = env_int("PORTAL_EXPLAIN_TIMEOUT_SECONDS", 20, minimum=1)
# Explanations must not starve scoring: explain requests one served version may have in progress per web process
# (their own bulkhead and their own sandboxed host; the excess gets a 503 at once), and explain requests a minute
# per API token (the excess gets a 429 with Retry-After; 0: no limit).
PORTAL_EXPLAIN_IN_FLIGHT = env_int("PORTAL_EXPLAIN_IN_FLIGHT", 2, minimum=1, maximum=64)
PORTAL_EXPLAIN_RATE_LIMIT = env_int("PORTAL_EXPLAIN_RATE_LIMIT", 60, minimum=0)
# The bulkhead: scoring requests one served version may have in progress per web process; the excess gets a 503 at
# once. A host answers one request at a time: four in flight keep it busy through a burst (three queued behind one
# running), and two hung models still leave half of a worker's 16 threads to everything else.
PORTAL_SERVE_IN_FLIGHT_HOSTED = env_int("PORTAL_SERVE_IN_FLIGHT_HOSTED", 4, minimum=1)
PORTAL_SERVE_IN_FLIGHT_IN_PROCESS = env_int("PORTAL_SERVE_IN_FLIGHT_IN_PROCESS", 8, minimum=1)
# A request that finds every slot taken waits this long for one, but only while the version is making progress (one
# of its requests finished within the last second): a healthy model under a burst queues briefly, as any server's
# backlog would; a version whose slots are held by requests that do not finish (a hang) is refused at once.
PORTAL_SERVE_QUEUE_MS = env_int("PORTAL_SERVE_QUEUE_MS", 100, minimum=0, maximum=5000)
# Many models per worker: the serving forms one process keeps loaded (ONNX sessions' estimated memory plus their
# sandboxed hosts' resident memory), and how many at most; past either, the least recently used idle one is evicted
# and loads again on its next request (a cold load, shown on the deployment page, not counted as live latency).
PORTAL_SERVE_MEMORY_MB = env_int("PORTAL_SERVE_MEMORY_MB", 1024, minimum=16)
PORTAL_SERVE_MAX_LOADED = env_int("PORTAL_SERVE_MAX_LOADED", 1000, minimum=1)
# The in-process ONNX path's memory ceiling (onnxruntime's CPU arena per process) and input bound per run.
PORTAL_ONNX_MEMORY_MB = env_int("PORTAL_ONNX_MEMORY_MB", 256, minimum=64)
PORTAL_ONNX_MAX_ROWS_PER_RUN = env_int("PORTAL_ONNX_MAX_ROWS_PER_RUN", 1024, minimum=1)
# Batch scoring: chunk sizes (CSV by bytes, Parquet by rows), the share of bad rows a job tolerates, when a chunk
# whose worker went silent is handed out again, and whether batch predictions join the prediction log.
PORTAL_BATCH_CHUNK_BYTES = env_int("PORTAL_BATCH_CHUNK_MB", 16, minimum=1, maximum=1024) * 1024 * 1024
PORTAL_BATCH_CHUNK_ROWS = env_int("PORTAL_BATCH_CHUNK_ROWS", 100_000, minimum=100)
PORTAL_BATCH_MAX_ERROR_SHARE = env_float("PORTAL_BATCH_MAX_ERROR_SHARE", 0.01, minimum=0.0, maximum=1.0)
PORTAL_BATCH_STALE_SECONDS = env_int("PORTAL_BATCH_STALE_SECONDS", 300, minimum=5)
PORTAL_BATCH_LOG_PREDICTIONS = env_bool("PORTAL_BATCH_LOG_PREDICTIONS", True)

# --- Portal ---------------------------------------------------------------------------------------------------
PORTAL_DEMO_PASSWORD = env_str("PORTAL_DEMO_PASSWORD", "demo-pass-123")
PORTAL_TOKEN_TOUCH_SECONDS = 60  # how stale a token's "last used" may get before it is written again

# --- Notifications: email and outgoing webhooks ----------------------------------------------------------------
# Without PORTAL_EMAIL_HOST mail is written to files under var/mail (nothing leaves the machine).
EMAIL_HOST = env_str("PORTAL_EMAIL_HOST", "")
if EMAIL_HOST:
    EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    EMAIL_PORT = env_int("PORTAL_EMAIL_PORT", 587, minimum=1, maximum=65535)
    EMAIL_HOST_USER = env_str("PORTAL_EMAIL_USER", "")
    EMAIL_HOST_PASSWORD = env_str("PORTAL_EMAIL_PASSWORD", "")
    EMAIL_USE_TLS = env_bool("PORTAL_EMAIL_TLS", True)
    EMAIL_TIMEOUT = 10
else:
    EMAIL_BACKEND = "django.core.mail.backends.filebased.EmailBackend"
    EMAIL_FILE_PATH = str(VAR_DIR / "mail")
DEFAULT_FROM_EMAIL = env_str("PORTAL_EMAIL_FROM", "mlops-portal@localhost")
PORTAL_BASE_URL = (env_url("PORTAL_BASE_URL", None, schemes={"http", "https"}) or "http://127.0.0.1:8000").rstrip("/")
PORTAL_WEBHOOK_ALLOW_HTTP = env_bool("PORTAL_WEBHOOK_ALLOW_HTTP", False)

# --- Datasets cut from production (monitoring.datasets) -----------------------------------------------------------
# Rows per Parquet chunk a worker writes (the unit of progress and of resuming after a crash), how long a retraining
# call's read-only dataset token lives, and how each kind of sensitive column is treated in a snapshot by default
# (dropped, masked or kept encrypted under PORTAL_PAYLOAD_KEYS; a snapshot request may choose per column).
PORTAL_SNAPSHOT_CHUNK_ROWS = env_int("PORTAL_SNAPSHOT_CHUNK_ROWS", 20_000, minimum=100, maximum=1_000_000)
PORTAL_SNAPSHOT_STALE_SECONDS = env_int("PORTAL_SNAPSHOT_STALE_SECONDS", 300, minimum=10)
PORTAL_DATASET_TOKEN_MINUTES = env_int("PORTAL_DATASET_TOKEN_MINUTES", 60, minimum=1, maximum=7 * 24 * 60)
PORTAL_SNAPSHOT_SENSITIVE = {
    "personal": env_choice("PORTAL_SNAPSHOT_PERSONAL", "encrypted", choices={"dropped", "masked", "encrypted"}),
    "health": env_choice("PORTAL_SNAPSHOT_HEALTH", "dropped", choices={"dropped", "masked", "encrypted"}),
}
# The ports a webhook URL may name (an https URL without one is 443, an http one 80).
try:
    PORTAL_WEBHOOK_PORTS = tuple(sorted({int(p) for p in env_list("PORTAL_WEBHOOK_PORTS", ["443", "8443"])}))
except ValueError:
    raise ImproperlyConfigured("PORTAL_WEBHOOK_PORTS must be comma-separated port numbers, e.g. 443,8443") from None
if not PORTAL_WEBHOOK_PORTS or not all(1 <= p <= 65535 for p in PORTAL_WEBHOOK_PORTS):
    raise ImproperlyConfigured("PORTAL_WEBHOOK_PORTS must list ports between 1 and 65535, e.g. 443,8443")

# --- Monitoring -------------------------------------------------------------------------------------------------
# /metrics answers a bearer token (PORTAL_METRICS_TOKEN) or a client address inside PORTAL_METRICS_ALLOW (CIDRs).
PORTAL_METRICS_TOKEN = env_str("PORTAL_METRICS_TOKEN", "")
try:
    import ipaddress as _ipaddress

    PORTAL_METRICS_ALLOW = [_ipaddress.ip_network(n, strict=False)
                            for n in env_list("PORTAL_METRICS_ALLOW", ["127.0.0.1/32", "::1/128"])]
except ValueError as _exc:
    raise ImproperlyConfigured(f"PORTAL_METRICS_ALLOW: {_exc} (give comma-separated networks, e.g. "
                               "10.0.0.0/8,127.0.0.1/32)") from None

# --- Audit exports ----------------------------------------------------------------------------------------------
# Ed25519 private key (PEM, PKCS#8) that signs audit exports; without it one is generated once in var/.
PORTAL_AUDIT_SIGNING_KEY = env_str("PORTAL_AUDIT_SIGNING_KEY", "")
if PORTAL_AUDIT_SIGNING_KEY:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey as _Ed25519
    from cryptography.hazmat.primitives.serialization import load_pem_private_key as _load_pem

    try:
        _valid_key = isinstance(_load_pem(PORTAL_AUDIT_SIGNING_KEY.encode(), password=None), _Ed25519)
    except (ValueError, TypeError):
        _valid_key = False
    if not _valid_key:
        raise ImproperlyConfigured("PORTAL_AUDIT_SIGNING_KEY must be an unencrypted Ed25519 private key in PEM "
                                   "(openssl genpkey -algorithm ed25519)")

# --- Edge packages ------------------------------------------------------------------------------------------------
# Ed25519 private key (PEM, PKCS#8) that signs edge packages' manifests (its public key travels in each package and
# is at /api/v1/edge/public-key); without it one is generated once in var/ in the demo, and packages are refused
# when PORTAL_DEBUG is off. Keep it apart from the audit key: devices hold what it signs.
PORTAL_EDGE_SIGNING_KEY = env_str("PORTAL_EDGE_SIGNING_KEY", "")
if PORTAL_EDGE_SIGNING_KEY:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey as _Ed25519Edge
    from cryptography.hazmat.primitives.serialization import load_pem_private_key as _load_pem_edge

    try:
        _valid_edge_key = isinstance(_load_pem_edge(PORTAL_EDGE_SIGNING_KEY.encode(), password=None), _Ed25519Edge)
    except (ValueError, TypeError):
        _valid_edge_key = False
    if not _valid_edge_key:
        raise ImproperlyConfigured("PORTAL_EDGE_SIGNING_KEY must be an unencrypted Ed25519 private key in PEM "
                                   "(openssl genpkey -algorithm ed25519)")
# An int8 form is offered only when, on the reference rows, its accuracy is at most this far below the float form's
# (classifiers; or its share of answers that differ from the float form's, without true labels), or its mean
# absolute error at most this fraction above it (regressors).
PORTAL_EDGE_INT8_TOLERANCE = env_float("PORTAL_EDGE_INT8_TOLERANCE", 0.01, minimum=0.0, maximum=1.0)

# Checkpoints of the chain's head are also POSTed here (the compliance team's receiver), signed like every webhook
# with the secret when one is given.
PORTAL_AUDIT_CHECKPOINT_WEBHOOK_URL = env_url("PORTAL_AUDIT_CHECKPOINT_WEBHOOK_URL", None, schemes={"http", "https"})
PORTAL_AUDIT_CHECKPOINT_WEBHOOK_SECRET = env_str("PORTAL_AUDIT_CHECKPOINT_WEBHOOK_SECRET", "")

# --- Retention ---------------------------------------------------------------------------------------------------
# Prediction payloads (inputs, outputs, ground truth) older than this many days are purged per environment; the
# rows' non-personal facts stay for monitoring. Audit events are never purged by the application.
# Whole partitions of the prediction log (one a day) and of the rollups (one a month) older than this many days are
# dropped by beat (PostgreSQL). 0 keeps them for ever; payloads inside are purged earlier anyway (below).
PORTAL_PREDICTION_LOG_RETENTION_DAYS = env_int("PORTAL_PREDICTION_LOG_RETENTION_DAYS", 0, minimum=0, maximum=36500)
PORTAL_ROLLUP_RETENTION_DAYS = env_int("PORTAL_ROLLUP_RETENTION_DAYS", 0, minimum=0, maximum=36500)
PORTAL_PAYLOAD_RETENTION_DAYS = {
    env: env_int(f"PORTAL_RETENTION_DAYS_{env.upper()}", default, minimum=1, maximum=36500)
    for env, default in (("dev", 30), ("stage", 90), ("prod", 365))
}

# --- Two-factor sign-in -----------------------------------------------------------------------------------------
# On: approvers, compliance officers and administrators need a TOTP code (or a recovery code) after the password.
PORTAL_REQUIRE_2FA = env_bool("PORTAL_REQUIRE_2FA", False)
OTP_TOTP_ISSUER = "MLOps portal"

# --- Encryption of sensitive payloads at rest ---------------------------------------------------------------------
# Fernet keys, comma-separated: the first encrypts, all decrypt (rotate by putting a new key first). Without it a
# key is derived from the secret key; set it in production so the two can be rotated separately.
PORTAL_PAYLOAD_KEYS = env_list("PORTAL_PAYLOAD_KEYS", [])
if not PORTAL_PAYLOAD_KEYS:
    import base64 as _b64

    PORTAL_PAYLOAD_KEYS = [_b64.urlsafe_b64encode(hashlib.sha256(("payload-key:" + SECRET_KEY).encode()).digest())
                           .decode()]
for _k in PORTAL_PAYLOAD_KEYS:
    try:
        from cryptography.fernet import Fernet as _Fernet

        _Fernet(_k.encode())
    except (ValueError, TypeError):
        raise ImproperlyConfigured("PORTAL_PAYLOAD_KEYS holds a value that is not a Fernet key (32 url-safe "
                                   "base64 bytes; make one with cryptography.fernet.Fernet.generate_key())") from None

# Keys production must give explicitly, not derive from the secret key or generate on the host (portal/checks.py
# stops start-up and /readyz naming each one missing while PORTAL_DEBUG is off). The offline commands use none.
PORTAL_KEYS_NOT_SET = () if _offline_command() else tuple(
    name for name in ("PORTAL_PAYLOAD_KEYS", "PORTAL_SUBJECT_HASH_KEY", "PORTAL_AUDIT_SIGNING_KEY")
    if env_optional(name) is None)
