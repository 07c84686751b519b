"""Outgoing webhooks: internal targets refused (also after DNS resolution), signed deliveries, retries, the log."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from django.core.exceptions import ValidationError

from portal import special_addresses, webhook_policy, webhooks
from portal.models import AuditEvent, Team, TeamWebhook, WebhookDelivery
from tests.conftest import assert_error_shape

SECRET = "a-webhook-secret-of-some-length"


def _fake_dns(monkeypatch: pytest.MonkeyPatch, table: dict[str, str]) -> None:
    """DNS is the outside world: answer from ``table`` and refuse everything else."""
    real = socket.getaddrinfo

    def getaddrinfo(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host in table:
            family = socket.AF_INET6 if ":" in table[host] else socket.AF_INET
            return [(family, socket.SOCK_STREAM, 6, "", (table[host], port))]
        if host in ("127.0.0.1", "::1"):
            return real(host, port, *args, **kwargs)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(webhook_policy.socket, "getaddrinfo", getaddrinfo)


@pytest.mark.parametrize("url", [
    "https://127.0.0.1/hook", "https://127.9.9.9/hook", "https://[::1]/hook", "https://localhost/hook",
    "https://10.0.0.5/hook", "https://172.16.3.4/hook", "https://192.168.1.1/hook", "https://169.254.169.254/latest",
    "https://[fe80::1]/hook", "https://[::ffff:127.0.0.1]/hook", "https://0.0.0.0/hook", "https://[fd00:ec2::254]/",
    "https://metadata.google.internal/computeMetadata/v1/", "https://100.64.0.1/hook", "https://224.0.0.1/hook",
    "http://hooks.example.com/plain-http", "ftp://hooks.example.com/x", "https://user:pw@hooks.example.com/x",
    "https://hooks.example.com:99999/x", "https://",
])
def test_internal_and_malformed_targets_are_refused(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_dns(monkeypatch, {"hooks.example.com": "93.184.216.34"})
    with pytest.raises(ValidationError):
        webhook_policy.validate_webhook_url(url)


@pytest.mark.parametrize("name,address", [("rebind.example.com", "127.0.0.1"), ("intranet.example.com", "10.1.2.3"),
                                          ("meta.example.com", "169.254.169.254"), ("v6.example.com", "::1")])
def test_names_that_resolve_inside_are_refused(name: str, address: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_dns(monkeypatch, {name: address})
    with pytest.raises(ValidationError, match="resolves to"):
        webhook_policy.validate_webhook_url(f"https://{name}/hook")


def test_a_public_name_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_dns(monkeypatch, {"hooks.example.com": "93.184.216.34"})
    assert webhook_policy.validate_webhook_url("https://hooks.example.com/x") == ("hooks.example.com", 443,
                                                                            ["93.184.216.34"])


def test_the_api_refuses_ssrf_targets_and_only_admins_manage_webhooks(
        personas: dict[str, Any], api_as: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_dns(monkeypatch, {"hooks.example.com": "93.184.216.34", "sneaky.example.com": "192.168.0.10"})
    admin = api_as(personas["admin"])
    for url in ("https://169.254.169.254/latest/meta-data/", "https://sneaky.example.com/hook",
                "https://localhost:8000/api/v1/"):
        body = assert_error_shape(admin.post("/api/v1/teams/acme/webhooks/", {"url": url, "secret": SECRET},
                                             format="json"), 400)
        assert "public addresses" in json.dumps(body)
    assert not TeamWebhook.objects.exists()
    for who in ("ds", "approver1", "compliance"):
        assert_error_shape(api_as(personas[who]).post("/api/v1/teams/acme/webhooks/",
                                                      {"url": "https://hooks.example.com/x", "secret": SECRET},
                                                      format="json"), 403)
    response = admin.post("/api/v1/teams/acme/webhooks/", {"url": "https://hooks.example.com/x", "secret": SECRET,
                                                           "events": ["promotion.live"]}, format="json")
    assert response.status_code == 201, response.content
    assert "secret" not in response.json()
    assert AuditEvent.objects.filter(action="webhook.create").count() == 1
    assert admin.get("/api/v1/teams/acme/webhooks/").json()[0]["events"] == ["promotion.live"]
    # Every event the portal sends can be subscribed to on its own (the A/B verdict and the retraining request were
    # once lost to a second definition of the list).
    for event in ("experiment.verdict", "retraining.requested"):
        response = admin.post("/api/v1/teams/acme/webhooks/", {"url": f"https://hooks.example.com/{event}",
                                                               "secret": SECRET, "events": [event]}, format="json")
        assert response.status_code == 201, response.content


class _Receiver(BaseHTTPRequestHandler):
    answers: list[int] = []
    received: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self) -> None:  # the stdlib's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((dict(self.headers), body))
        self.send_response(type(self).answers.pop(0) if type(self).answers else 200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver(settings: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, type[_Receiver]]]:
    """A local HTTP receiver reached as http://hooks.example.com, a name that resolves to a public address."""
    settings.PORTAL_WEBHOOK_ALLOW_HTTP = True
    _fake_dns(monkeypatch, {"hooks.example.com": "93.184.216.34"})
    _Receiver.answers, _Receiver.received = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    settings.PORTAL_WEBHOOK_PORTS = (443, 8443, server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://hooks.example.com:{server.server_address[1]}/portal", _Receiver
    server.shutdown()


def test_deliveries_are_signed_retried_with_backoff_and_logged(
        personas: dict[str, Any], receiver: tuple[str, type[_Receiver]], monkeypatch: pytest.MonkeyPatch) -> None:
    url, handler = receiver
    hook = TeamWebhook.objects.create(team=Team.objects.get(slug="acme"), url=url, secret=SECRET)
    # The receiver stands in for a public host: the address check passes it, the connection goes to it.
    monkeypatch.setattr(webhook_policy, "resolve_public", lambda host, port: ["127.0.0.1"])
    handler.answers = [503, 200]
    [delivery] = webhooks.webhooks_notify(team=hook.team, event="promotion.live",
                                          payload={"event": "promotion.live", "model": "churn"})
    assert webhooks.webhook_deliver(delivery_id=delivery.pk) == ("retrying", 2)
    assert webhooks.webhook_deliver(delivery_id=delivery.pk) == ("delivered", None)
    delivery.refresh_from_db()
    assert delivery.attempts == 2 and delivery.response_status == 200 and delivery.delivered_at
    headers, body = handler.received[-1]
    expected = hmac.new(SECRET.encode(), headers["X-Portal-Timestamp"].encode() + b"." + body,
                        hashlib.sha256).hexdigest()
    assert headers["X-Portal-Signature"] == f"sha256={expected}"
    assert headers["X-Portal-Event"] == "promotion.live" and headers["Host"].startswith("hooks.example.com")
    assert json.loads(body) == {"event": "promotion.live", "model": "churn"}
    assert webhooks.webhook_deliver(delivery_id=delivery.pk) == ("delivered", None), "delivered once only"
    assert len(handler.received) == 2

    handler.answers = [410]
    [gone] = webhooks.webhooks_notify(team=hook.team, event="promotion.failed", payload={})
    assert webhooks.webhook_deliver(delivery_id=gone.pk) == ("failed", None), "a 4xx is not retried"
    assert [webhooks.backoff_seconds(n) for n in (1, 2, 3, 10)] == [2, 4, 8, 600]


def test_a_name_that_rebinds_to_loopback_after_saving_is_refused_at_delivery(
        personas: dict[str, Any], receiver: tuple[str, type[_Receiver]], monkeypatch: pytest.MonkeyPatch) -> None:
    url, handler = receiver
    hook = webhooks.webhook_create(team=Team.objects.get(slug="acme"), url=url, secret=SECRET,
                                   actor=personas["admin"])
    _fake_dns(monkeypatch, {"hooks.example.com": "127.0.0.1"})  # the attacker's DNS now points inside
    [delivery] = webhooks.webhooks_notify(team=hook.team, event="promotion.live", payload={})
    assert webhooks.webhook_deliver(delivery_id=delivery.pk) == ("failed", None)
    delivery.refresh_from_db()
    assert "127.0.0.1" in delivery.error and "loopback" in delivery.error.lower()
    assert handler.received == [], "nothing reached the loopback receiver"
    log = WebhookDelivery.objects.filter(webhook=hook).values_list("status", flat=True)
    assert list(log) == ["failed"]


# --- Every special-purpose block of IANA's registries, and the ports ----------------------------------------------

def _samples(block: special_addresses.SpecialRange) -> list[str]:
    """The first, a middle and the last address of a block."""
    net = block.network
    return sorted({str(net[0]), str(net[net.num_addresses // 2]), str(net[-1])})


@pytest.mark.parametrize("block", special_addresses.SPECIAL_RANGES, ids=lambda b: f"{b.network} {b.name}")
def test_every_special_purpose_block_is_refused_literally_and_after_resolution(
        block: special_addresses.SpecialRange, monkeypatch: pytest.MonkeyPatch) -> None:
    for address in _samples(block):
        literal = f"[{address}]" if ":" in address else address
        with pytest.raises(ValidationError) as refused:
            webhook_policy.validate_webhook_url(f"https://{literal}/hook")
        assert "public addresses" in str(refused.value)
        # The same address behind a name (saved while it pointed elsewhere, say) is refused at delivery time.
        _fake_dns(monkeypatch, {"hooks.example.com": address})
        with pytest.raises(ValidationError, match="resolves to"):
            webhook_policy.validate_webhook_url("https://hooks.example.com/hook")
    named = special_addresses.special_range(block.network[0])
    assert named is not None and named.network.prefixlen >= block.network.prefixlen


@pytest.mark.parametrize("url,words", [
    ("https://[2002:7f00:1::]/x", "6to4"),  # 127.0.0.1 inside 6to4: the review's finding
    ("https://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/x", "TEREDO"),
    ("https://[64:ff9b::a9fe:a9fe]/x", "NAT64"),  # 169.254.169.254 through NAT64
    ("https://[64:ff9b:1::7f00:1]/x", "local-use NAT64"),
    ("https://[2001:20::1]/x", "ORCHIDv2"),
    ("https://[2001:db8::1]/x", "Documentation"),
    ("https://[3fff::1]/x", "Documentation"),
    ("https://192.0.2.10/x", "TEST-NET-1"),
    ("https://198.19.0.1/x", "Benchmarking"),
    ("https://[2001:2::1]/x", "Benchmarking"),
    ("https://100.100.100.200/x", "Shared Address Space"),
    ("https://0.1.2.3/x", "This network"),
    ("https://241.0.0.1/x", "Reserved"),
    ("https://239.1.1.1/x", "Multicast"),
    ("https://[ff02::1]/x", "Multicast"),
    ("https://[fd12:3456::1]/x", "Unique-Local"),
    ("https://[::ffff:10.0.0.1]/x", "IPv4-mapped"),
    ("https://[::10.0.0.1]/x", "IPv4-compatible"),
    ("https://[::ffff:0:7f00:1]/x", "IPv4-translated"),
    ("https://[fe80::1%25eth0]/x", "Link-Local"),
])
def test_the_review_s_address_forms_are_refused_by_name(url: str, words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        webhook_policy.validate_webhook_url(url)


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "100.63.255.255", "100.128.0.1", "198.17.255.255",
                                     "198.20.0.1", "2606:2800:220:1:248:1893:25c8:1946", "2001:4860:4860::8888",
                                     "2003::1", "2620:4f:8001::1"])
def test_public_neighbours_of_the_blocks_are_accepted(address: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_dns(monkeypatch, {"hooks.example.com": address})
    assert webhook_policy.validate_webhook_url("https://hooks.example.com/x")[2] == [address]


def test_only_the_allowed_ports_are_accepted(personas: dict[str, Any], api_as: Any, settings: Any,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_dns(monkeypatch, {"hooks.example.com": "93.184.216.34"})
    assert webhook_policy.validate_webhook_url("https://hooks.example.com/x")[1] == 443
    assert webhook_policy.validate_webhook_url("https://hooks.example.com:8443/x")[1] == 8443
    for url in ("https://hooks.example.com:22/x", "https://hooks.example.com:6379/x",
                "https://hooks.example.com:80/x", "https://93.184.216.34:9200/x"):
        with pytest.raises(ValidationError, match="PORTAL_WEBHOOK_PORTS"):
            webhook_policy.validate_webhook_url(url)
    admin = api_as(personas["admin"])
    body = assert_error_shape(admin.post("/api/v1/teams/acme/webhooks/", {"url": "https://hooks.example.com:6379/x",
                                                                         "secret": SECRET}, format="json"), 400)
    assert "port" in body["error"]["message"] and not TeamWebhook.objects.exists()

    settings.PORTAL_WEBHOOK_PORTS = (443, 9443)
    assert webhook_policy.validate_webhook_url("https://hooks.example.com:9443/x")[1] == 9443
    hook = TeamWebhook.objects.create(team=Team.objects.get(slug="acme"), url="https://hooks.example.com:9443/x",
                                      secret=SECRET)
    settings.PORTAL_WEBHOOK_PORTS = (443, 8443)  # the port is taken off the list after the URL was saved
    [delivery] = webhooks.webhooks_notify(team=hook.team, event="promotion.live", payload={})
    assert webhooks.webhook_deliver(delivery_id=delivery.pk) == ("failed", None)
    delivery.refresh_from_db()
    assert "9443" in delivery.error and delivery.attempts == 1
