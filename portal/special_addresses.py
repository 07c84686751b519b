"""Addresses an outgoing request (a webhook) must never reach: every block of IANA's IPv4 and IPv6 Special-Purpose
Address Registries, plus the multicast blocks and the deprecated IPv4-in-IPv6 forms.

Sources, as of 2025:
https://www.iana.org/assignments/iana-ipv4-special-registry/ and
https://www.iana.org/assignments/iana-ipv6-special-registry/ (each entry below carries the registry's own name and
the RFC that made it), https://www.iana.org/assignments/multicast-addresses/ and
https://www.iana.org/assignments/ipv6-multicast-addresses/.

The table refuses a whole block even where the registry calls part of it "globally reachable" (anycast relays,
AS112, NAT64's well-known prefix): a webhook receiver is an ordinary unicast server, and a block that tunnels or
translates to IPv4 (6to4, Teredo, NAT64, IPv4-mapped) can carry an internal IPv4 address inside it. Anything Python's
``ipaddress`` still does not call global is refused after the table, as a second net for blocks registered later.
"""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class SpecialRange(NamedTuple):
    network: Network
    name: str  # the registry's name for the block
    source: str  # the RFC (or registry) that set it aside


def _table(rows: list[tuple[str, str, str]]) -> tuple[SpecialRange, ...]:
    return tuple(SpecialRange(ipaddress.ip_network(cidr), name, source) for cidr, name, source in rows)


IPV4_SPECIAL = _table([
    ("0.0.0.0/8", '"This network"', "RFC 791"),
    ("0.0.0.0/32", '"This host on this network"', "RFC 1122"),
    ("10.0.0.0/8", "Private-Use", "RFC 1918"),
    ("100.64.0.0/10", "Shared Address Space", "RFC 6598"),
    ("127.0.0.0/8", "Loopback", "RFC 1122"),
    ("169.254.0.0/16", "Link Local", "RFC 3927"),
    ("172.16.0.0/12", "Private-Use", "RFC 1918"),
    ("192.0.0.0/24", "IETF Protocol Assignments", "RFC 6890"),
    ("192.0.0.0/29", "IPv4 Service Continuity Prefix", "RFC 7335"),
    ("192.0.0.8/32", "IPv4 dummy address", "RFC 7600"),
    ("192.0.0.9/32", "Port Control Protocol Anycast", "RFC 7723"),
    ("192.0.0.10/32", "Traversal Using Relays around NAT Anycast", "RFC 8155"),
    ("192.0.0.170/32", "NAT64/DNS64 Discovery", "RFC 7050"),
    ("192.0.0.171/32", "NAT64/DNS64 Discovery", "RFC 7050"),
    ("192.0.2.0/24", "Documentation (TEST-NET-1)", "RFC 5737"),
    ("192.31.196.0/24", "AS112-v4", "RFC 7535"),
    ("192.52.193.0/24", "AMT", "RFC 7450"),
    ("192.88.99.0/24", "Deprecated (6to4 Relay Anycast)", "RFC 7526"),
    ("192.88.99.2/32", "6a44-relay anycast address", "RFC 6751"),
    ("192.168.0.0/16", "Private-Use", "RFC 1918"),
    ("192.175.48.0/24", "Direct Delegation AS112 Service", "RFC 7534"),
    ("198.18.0.0/15", "Benchmarking", "RFC 2544"),
    ("198.51.100.0/24", "Documentation (TEST-NET-2)", "RFC 5737"),
    ("203.0.113.0/24", "Documentation (TEST-NET-3)", "RFC 5737"),
    ("224.0.0.0/4", "Multicast", "RFC 5771"),
    ("240.0.0.0/4", "Reserved", "RFC 1112"),
    ("255.255.255.255/32", "Limited Broadcast", "RFC 8190"),
])

IPV6_SPECIAL = _table([
    ("::1/128", "Loopback Address", "RFC 4291"),
    ("::/128", "Unspecified Address", "RFC 4291"),
    ("::/96", "IPv4-compatible Address (deprecated)", "RFC 4291"),
    ("::ffff:0:0/96", "IPv4-mapped Address", "RFC 4291"),
    ("::ffff:0:0:0/96", "IPv4-translated Address", "RFC 2765"),
    ("64:ff9b::/96", "IPv4-IPv6 Translat. (NAT64 well-known prefix)", "RFC 6052"),
    ("64:ff9b:1::/48", "IPv4-IPv6 Translat. (local-use NAT64)", "RFC 8215"),
    ("100::/64", "Discard-Only Address Block", "RFC 6666"),
    ("100:0:0:1::/64", "Dummy IPv6 Prefix", "RFC 9780"),
    ("2001::/23", "IETF Protocol Assignments", "RFC 2928"),
    ("2001::/32", "TEREDO", "RFC 4380"),
    ("2001:1::1/128", "Port Control Protocol Anycast", "RFC 7723"),
    ("2001:1::2/128", "Traversal Using Relays around NAT Anycast", "RFC 8155"),
    ("2001:1::3/128", "DNS-SD Service Registration Protocol Anycast", "RFC 9665"),
    ("2001:2::/48", "Benchmarking", "RFC 5180"),
    ("2001:3::/32", "AMT", "RFC 7450"),
    ("2001:4:112::/48", "AS112-v6", "RFC 7535"),
    ("2001:10::/28", "Deprecated (previously ORCHID)", "RFC 4843"),
    ("2001:20::/28", "ORCHIDv2", "RFC 7343"),
    ("2001:30::/28", "Drone Remote ID Protocol Entity Tags (DETs) Prefix", "RFC 9374"),
    ("2001:db8::/32", "Documentation", "RFC 3849"),
    ("2002::/16", "6to4", "RFC 3056"),
    ("2620:4f:8000::/48", "Direct Delegation AS112 Service", "RFC 7534"),
    ("3fff::/20", "Documentation", "RFC 9637"),
    ("5f00::/16", "Segment Routing (SRv6) SIDs", "RFC 9602"),
    ("fc00::/7", "Unique-Local", "RFC 4193"),
    ("fe80::/10", "Link-Local Unicast", "RFC 4291"),
    ("fec0::/10", "Site-Local (deprecated)", "RFC 3879"),
    ("ff00::/8", "Multicast", "RFC 4291"),
])

SPECIAL_RANGES = IPV4_SPECIAL + IPV6_SPECIAL


def special_range(address: Address) -> SpecialRange | None:
    """The most specific special-purpose block holding ``address``, or None."""
    found = [r for r in SPECIAL_RANGES if r.network.version == address.version and address in r.network]
    return max(found, key=lambda r: r.network.prefixlen) if found else None


def refusal(address: Address) -> str | None:
    """Why ``address`` may not be reached (naming the block), or None for an ordinary public unicast address."""
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        address = ipaddress.IPv6Address(str(address).split("%")[0])
    block = special_range(address)
    if block is not None:
        return f"in {block.network} ({block.name}, {block.source})"
    if not address.is_global or address.is_reserved:
        return "not a publicly routable address"
    return None
