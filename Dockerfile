# syntax=docker/dockerfile:1
# Build stage: compile wheels for the portal and its dependencies.
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY config ./config
COPY portal ./portal
COPY registry ./registry
COPY monitoring ./monitoring
RUN pip wheel --wheel-dir /wheels .

# Runtime stage: the wheels, the project files, and an unprivileged user.
FROM python:3.11-slim-bookworm AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    DJANGO_SETTINGS_MODULE=config.settings PORTAL_VAR_DIR=/var/lib/portal
# bubblewrap: the sandbox uploaded models are loaded in. It needs user namespaces, which Docker's default seccomp
# profile refuses: see the README's "Model isolation" for which container runs it and how.
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 portal \
 && useradd --system --uid 10001 --gid portal --home-dir /app --shell /usr/sbin/nologin portal \
 && mkdir -p /var/lib/portal && chown portal:portal /var/lib/portal
COPY --from=build /wheels /wheels
RUN pip install --no-index --find-links=/wheels /wheels/*.whl && rm -rf /wheels
WORKDIR /app
COPY --chown=portal:portal manage.py ./
COPY --chown=portal:portal config ./config
COPY --chown=portal:portal portal ./portal
COPY --chown=portal:portal registry ./registry
COPY --chown=portal:portal monitoring ./monitoring
COPY --chown=portal:portal templates ./templates
COPY --chown=portal:portal static ./static
# The audit page offers the offline export verifier as a download.
COPY --chown=portal:portal scripts/verify_export.py ./scripts/verify_export.py
# collectstatic needs settings that import; the key is a throwaway used only for this build step.
RUN PORTAL_SECRET_KEY=build-only-key-build-only-key-build-only-key-build-only-key-0123456789 \
    python manage.py collectstatic --noinput -v 0 && chown -R portal:portal /var/lib/portal
USER portal
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"
CMD ["gunicorn", "config.wsgi:application", "--bind", "0.0.0.0:8000", "--workers", "2", "--worker-class", "portal.webworker.LingeringThreadWorker", "--threads", "16", "--access-logfile", "-"]
