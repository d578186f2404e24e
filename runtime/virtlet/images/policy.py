"""The image source policy: which URLs a pull may fetch, which addresses it may connect to, how much it may
download.  See docs/images.md ("Image source policy").

Who chooses an address decides whether it is checked:

* the first URL of a translation entry is written by the node's admin: trusted, not checked;
* an image name without a translation (fetched as ``<default scheme>://<name>``) and every redirect hop (also
  of a translated URL) are chosen by a pod author or by a remote server: the host is resolved, *every*
  resolved address must pass the deny/allow lists, and the connection goes to exactly those checked addresses
  (no second lookup, so no DNS-rebinding gap between check and connect);
* a proxy of a transport profile is written by the admin: trusted.  Through a proxy the proxy connects, so an
  untrusted target is checked as this node resolves it; a name this node cannot resolve is left to the proxy.

The deny list (loopback, link-local including the cloud metadata address 169.254.169.254, unspecified) is
fixed; the allow list (config ``image_source_allow``) overrides it.  IPv4-mapped IPv6 addresses are checked as
the IPv4 address they map.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

from virtlet import errors

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_MAX_SIZE = 64 << 30
SCHEMES = ("http", "https")
DEFAULT_DENY: tuple[tuple[str, str], ...] = (
    ("127.0.0.0/8", "loopback"),
    ("::1/128", "loopback"),
    ("169.254.0.0/16", "link-local, includes the cloud metadata address 169.254.169.254"),
    ("fe80::/10", "link-local"),
    ("0.0.0.0/8", "unspecified ('this host')"),
    ("::/128", "unspecified"),
)
MAX_ADDRESSES = 64  # more A/AAAA records than this for one name is not a real image server

Address = tuple[int, tuple[str, int] | tuple[str, int, int, int]]  # (family, sockaddr)


@dataclass(frozen=True)
class SourcePolicy:
    allow: tuple[IpNetwork, ...] = ()
    deny: tuple[tuple[IpNetwork, str], ...] = tuple((ipaddress.ip_network(n), why) for n, why in DEFAULT_DENY)
    schemes: tuple[str, ...] = SCHEMES
    max_size: int = DEFAULT_MAX_SIZE
    name_fallback: bool = True

    @classmethod
    def build(cls, allow: Iterable[str] = (), max_size: int = DEFAULT_MAX_SIZE,
              name_fallback: bool = True) -> SourcePolicy:
        """From config values (``allow`` as CIDR strings, already validated by the config loader)."""
        return cls(allow=tuple(ipaddress.ip_network(a, strict=False) for a in allow), max_size=max_size,
                   name_fallback=name_fallback)

    def denied(self, address: IpAddress) -> str | None:
        """Why ``address`` is denied ("127.0.0.0/8 (loopback)"), or None when it may be reached."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address.version == n.version and address in n for n in self.allow):
            return None
        for net, why in self.deny:
            if address.version == net.version and address in net:
                return f"{net} ({why})"
        return None

    def resolve(self, host: str, port: int, what: str) -> list[Address]:
        """Resolve ``host`` and check every address; the addresses to connect to (all of them allowed).

        PermissionDenied when any address is denied (a name that resolves to one public and one internal
        address is refused: the connection could go to either).  ``socket.gaierror`` propagates (the
        fetcher reports it as a resolution failure)."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        except UnicodeError as exc:
            raise errors.InvalidArgument(f"{what}: host {host[:80]!r} is not a valid host name") from exc
        out: list[Address] = []
        for family, _type, _proto, _canon, sockaddr in infos[:MAX_ADDRESSES]:
            ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            why = self.denied(ip)
            if why is not None:
                raise errors.PermissionDenied(
                    f"{what}: host {host!r} resolves to {ip}, which the node's image source policy denies: "
                    f"{why}.  Images from such addresses need a translation written by the node admin, or "
                    "the admin may allow the range with --image-source-allow (image_source_allow)")
            out.append(cast(Address, (family, sockaddr)))  # TCP over IPv4/IPv6: an IP sockaddr
        return out


def connect(addresses: list[Address], timeout: float | None) -> socket.socket:
    """A TCP connection to the first of ``addresses`` that answers (the ones ``resolve`` checked)."""
    last: OSError | None = None
    for family, sockaddr in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    if last is None:
        raise socket.gaierror(socket.EAI_NONAME, "the name has no addresses")
    raise last
