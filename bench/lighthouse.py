"""Lighthouse performance and accessibility of the journey pages, on a phone (Lighthouse's default: a Moto G
profile, 4x CPU slowdown, slow 4G) and a desktop (``--preset=desktop``), against a running portal.

    make run   # or any running portal with the demo seeded (seed_demo)
    npm i -E --prefix /tmp/lh lighthouse@12.2.3      # once; no network at run time, Chromium is /usr/bin/chromium
    .venv/bin/python bench/lighthouse.py --base http://127.0.0.1:8000 --lighthouse /tmp/lh/node_modules/.bin/lighthouse

Each page is fetched as the persona whose journey it belongs to (signed in through the login form; the session
cookie is handed to Lighthouse as a header). Runs are sequential and each is repeated ``--runs`` times (the median
score is printed), because other processes on the machine move the blocking-time figure; print ``uptime`` with it.
"""

from __future__ import annotations

import argparse
import http.cookiejar
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path


def sign_in(base: str, username: str, password: str) -> str:
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    page = opener.open(base + "/login/").read().decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
    if token is None:
        sys.exit("No CSRF token on the login page.")
    data = urllib.parse.urlencode({"username": username, "password": password,
                                   "csrfmiddlewaretoken": token.group(1)}).encode()
    request = urllib.request.Request(base + "/login/", data=data, headers={"Referer": base + "/login/"})
    opener.open(request).read()
    cookies = {c.name: c.value for c in jar}
    if "sessionid" not in cookies:
        sys.exit(f"Signing in as {username} failed.")
    return "; ".join(f"{k}={v}" for k, v in cookies.items())


def journeys(base: str, cookies: dict[str, str]) -> list[tuple[str, str]]:
    """(persona, path) for the nine journey pages of issue 33; the pending promotion is found on the queue."""
    request = urllib.request.Request(base + "/promotions/?status=all", headers={"Cookie": cookies["approver1"]})
    queue = urllib.request.urlopen(request).read().decode()
    found = re.search(r'href="(/promotions/[0-9a-f-]{36}/)"', queue)
    promotion = found.group(1) if found else "/promotions/"
    return [
        ("ds", "/models/"),
        ("ds", "/models/breast-cancer/"),
        ("ds", "/models/breast-cancer/versions/2/"),
        ("ds", "/models/breast-cancer/environments/dev/"),
        ("approver1", promotion),
        ("approver1", "/models/breast-cancer/environments/dev/monitoring"),
        ("compliance", "/audit/"),
        ("compliance", "/compliance/subjects/"),
        ("compliance", "/compliance/erasure/"),
    ]


def run(lighthouse: str, url: str, cookie: str, desktop: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        report = Path(out) / "report.json"
        command = [lighthouse, url, "--quiet", "--output=json", f"--output-path={report}",
                   "--only-categories=performance,accessibility", "--chrome-flags=--headless=new --no-sandbox",
                   "--extra-headers=" + json.dumps({"Cookie": cookie})]
        if desktop:
            command.append("--preset=desktop")
        for attempt in (1, 2):  # on a loaded machine Chromium now and then fails to start in Lighthouse's time
            done = subprocess.run(command, env={**os.environ, "CHROME_PATH": "/usr/bin/chromium"},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
            if done.returncode == 0:
                break
            if attempt == 2:
                sys.exit(f"Lighthouse failed on {url}: {done.stderr[-2000:]}")
        data = json.loads(report.read_text())
    audits = data["audits"]
    return {"performance": round(data["categories"]["performance"]["score"] * 100),
            "accessibility": round(data["categories"]["accessibility"]["score"] * 100),
            "tbt_ms": audits["total-blocking-time"]["numericValue"],
            "lcp_ms": audits["largest-contentful-paint"]["numericValue"],
            "fcp_ms": audits["first-contentful-paint"]["numericValue"],
            "cls": audits["cumulative-layout-shift"]["numericValue"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="http://127.0.0.1:8000")
    parser.add_argument("--lighthouse", default="lighthouse")
    parser.add_argument("--password", default=os.environ.get("PORTAL_DEMO_PASSWORD", "demo-pass-123"))
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--only", default="", help="run only paths containing this text")
    args = parser.parse_args()
    base = args.base.rstrip("/")
    cookies = {user: sign_in(base, user, args.password) for user in ("ds", "approver1", "compliance")}
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} on {os.cpu_count()} cores")
    print(f"{'page':58} {'form':8} {'perf':>4} {'a11y':>4} {'TBT ms':>7} {'LCP ms':>7} {'FCP ms':>7} {'CLS':>5}")
    for user, path in journeys(base, cookies):
        if args.only and args.only not in path:
            continue
        for desktop in (False, True):
            results = [run(args.lighthouse, base + path, cookies[user], desktop) for _ in range(args.runs)]
            median = {k: statistics.median(r[k] for r in results) for k in results[0]}
            print(f"{path:58} {'desktop' if desktop else 'phone':8} {median['performance']:>4.0f} "
                  f"{median['accessibility']:>4.0f} {median['tbt_ms']:>7.0f} {median['lcp_ms']:>7.0f} "
                  f"{median['fcp_ms']:>7.0f} {median['cls']:>5.3f}", flush=True)


if __name__ == "__main__":
    main()
