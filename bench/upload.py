"""Upload benchmark: a 1 GB model file through the API, and the web process's peak memory while it streams.

    .venv/bin/python bench/upload.py [--size-mb 1024]

Starts the portal's own gunicorn (one sync worker) on embedded defaults in a temporary folder, creates a joblib
file of SIZE MB (a scikit-learn model plus a large array, written from a sparse memory map), uploads it with the
`portal` CLI's streaming multipart encoder, and reads the worker's peak resident memory (VmHWM) from /proc.
For scale, it also posts the same file to a bare WSGI app that only drains the body (the floor for this transport).
Prints a table: seconds, MB/s and peak RSS for each.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from portal.client import MultipartStream  # noqa: E402

DRAIN_APP = '''
def application(environ, start_response):
    stream, left = environ["wsgi.input"], int(environ.get("CONTENT_LENGTH") or 0)
    while left > 0:
        chunk = stream.read(min(left, 1 << 20))
        if not chunk:
            break
        left -= len(chunk)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_model_file(path: Path, size_mb: int) -> None:
    import joblib
    import numpy as np
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression

    X, y = load_breast_cancer(return_X_y=True)
    model = LogisticRegression(max_iter=2000).fit(X, y)
    backing = path.with_suffix(".raw")
    n = size_mb * 1024 * 1024 // 8
    weights = np.memmap(backing, dtype="float64", mode="w+", shape=(n,))
    joblib.dump({"model": model, "weights": weights}, path)
    del weights
    backing.unlink()


def worker_pids(master: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(master)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_up(url: str, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not come up")


def post(url: str, path: Path, token: str | None) -> tuple[float, int, str]:
    body = MultipartStream({"description": "bench"}, {"file": path})
    headers = {"Content-Type": body.content_type}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    started = time.perf_counter()
    response = requests.post(url, data=body, headers=headers, timeout=3600)
    return time.perf_counter() - started, response.status_code, response.text[:300]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-upload-") as tmp:
        tmpdir = Path(tmp)
        model_file = tmpdir / "big.joblib"
        make_model_file(model_file, args.size_mb)
        size_mb = model_file.stat().st_size / 2**20
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PORTAL_", "DATABASE_URL", "CELERY_"))}
        env.update(PORTAL_DEBUG="1", PORTAL_VAR_DIR=str(tmpdir / "var"), PORTAL_MAX_UPLOAD_MB="4096")
        py = str(ROOT / ".venv" / "bin" / "python")
        subprocess.run([py, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
        subprocess.run([py, "manage.py", "shell", "-c",
                        "from django.contrib.auth.models import User, Group; from portal.roles import sync_roles; "
                        "from portal.models import Team, Membership; from registry.versions import services; sync_roles(); "
                        "u = User.objects.create_user('bench', password='x'); u.groups.add(Group.objects.get(name='data_scientist')); "
                        "t = Team.objects.create(slug='bench', name='Bench'); Membership.objects.create(team=t, user=u); "
                        "services.model_register(name='big', team=t, actor=u)"], cwd=ROOT, env=env, check=True)
        token = subprocess.run([py, "manage.py", "create_token", "bench"], cwd=ROOT, env=env, check=True,
                               capture_output=True, text=True).stdout.strip()
        results = []
        for label, app in (("bare WSGI drain (floor)", "drain"), ("portal upload API", "portal")):
            port = free_port()
            if app == "drain":
                (tmpdir / "drain_app.py").write_text(DRAIN_APP)
                cmd = [py, "-m", "gunicorn", "--chdir", str(tmpdir), "drain_app:application", "-w", "1",
                       "-b", f"127.0.0.1:{port}", "--timeout", "3600"]
                url, check = f"http://127.0.0.1:{port}/", f"http://127.0.0.1:{port}/"
            else:
                cmd = [py, "-m", "gunicorn", "config.wsgi:application", "-w", "1", "-b", f"127.0.0.1:{port}",
                       "--timeout", "3600"]
                url, check = f"http://127.0.0.1:{port}/api/v1/models/big/versions/", f"http://127.0.0.1:{port}/healthz"
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
            try:
                wait_up(check, proc)
                seconds, status, text = post(url, model_file, token if app == "portal" else None)
                pids = worker_pids(proc.pid)
                rss = max(peak_rss_mb(p) for p in pids)
                results.append((label, status, seconds, size_mb / seconds, rss, text if status >= 300 else ""))
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
        print(f"\nfile: {size_mb:.0f} MB joblib (scikit-learn model + array)\n")
        print(f"{'server':<26}{'status':>7}{'seconds':>10}{'MB/s':>9}{'peak RSS MB':>13}")
        for label, status, seconds, mbs, rss, text in results:
            print(f"{label:<26}{status:>7}{seconds:>10.2f}{mbs:>9.0f}{rss:>13.0f}  {text}")
        floor, portal = results[0], results[1]
        print(f"\nportal time / floor time: {portal[2] / floor[2]:.2f}x; portal peak RSS: {portal[4]:.0f} MB "
              f"(target < 200 MB)")


if __name__ == "__main__":
    main()
