"""The web server's command line, shared by ``manage.py runstack`` and the benchmarks that measure it (a leaf:
imports nothing of Django's, so a benchmark can use it before any settings exist)."""

from __future__ import annotations

from portal.env import env_int


def web_command(python: str, bind: str) -> list[str]:
    """The web server as ``make run`` starts it (and ``bench/isolation.py`` and ``bench/serving.py`` measure it):
    gunicorn with ``PORTAL_WEB_WORKERS`` processes of ``PORTAL_WEB_THREADS`` threads each (gthread, whose threads
    answer a kept-alive connection's next request themselves: ``portal.webworker``), so a request waiting on a slow
    model host holds one thread, not a whole worker, while pages and other models are served.
    The Dockerfile, docker-compose.yml and deploy/k8s/base/web.yaml start the same (2 workers, 16 threads)."""
    workers = env_int("PORTAL_WEB_WORKERS", 2, minimum=1, maximum=64)
    threads = env_int("PORTAL_WEB_THREADS", 16, minimum=1, maximum=256)
    return [python, "-m", "gunicorn", "config.wsgi:application", "--bind", bind, "--workers", str(workers),
            "--worker-class", "portal.webworker.LingeringThreadWorker", "--threads", str(threads), "--access-logfile", "-",
            "--graceful-timeout", "10", "--timeout", "120"]
