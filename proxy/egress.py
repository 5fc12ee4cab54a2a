"""Which outbound HTTP proxy, if any, a URL is reached through (a corporate egress proxy).

Pure: `proxy.config` reads `upstream.proxy` and the environment (`HTTPS_PROXY`, `HTTP_PROXY`,
`NO_PROXY`, lower-case names first, as curl reads them) and builds one `Egress`; the token
call and the upstream pool ask it `proxy_for(url)`.

Invariants:
- `localhost`, 127.0.0.0/8 and ::1 are never proxied, whatever the settings: a loopback
  set-up keeps working on a machine where the variables are set globally.
- A proxy's credentials (`http://user:pass@proxy:3128`) live only in `ProxyURL.authorization`;
  `str()` and `repr()` of a ProxyURL never show them.
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

#: `upstream.proxy: direct`: never through a proxy, whatever the environment says
DIRECT_WORD = "direct"


@dataclass(frozen=True, slots=True)
class ProxyURL:
    """An http:// forward proxy: where it is, and the Proxy-Authorization value if it wants one."""

    host: str
    port: int
    authorization: bytes | None = field(default=None, repr=False, compare=True)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The proxy's URL without credentials (what logs and aiohttp's `proxy=` get)."""
        return str(self)


def parse_proxy(text: str) -> ProxyURL:
    """`http://[user:pass@]host[:port][/]` (port 80, http's own, when absent; a bare `host:port`
    is read as http://). Raises ValueError saying what is wrong, never echoing a password."""
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError("not a valid proxy URL (http://[user:pass@]host:port)") from None
    if parts.scheme != "http":
        raise ValueError(f"only http:// proxies are supported, not {parts.scheme}://")
    if not parts.hostname:
        raise ValueError("not a valid proxy URL (http://[user:pass@]host:port)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("a proxy URL has no path (http://[user:pass@]host:port)")
    authorization = None
    if parts.username is not None:
        user, password = unquote(parts.username), unquote(parts.password or "")
        authorization = b"Basic " + base64.b64encode(f"{user}:{password}".encode())
    if port == 0:
        raise ValueError("a proxy URL's port must be 1-65535")
    return ProxyURL(parts.hostname, 80 if port is None else port, authorization)


def parse_no_proxy(text: str) -> tuple[str, ...]:
    """`NO_PROXY`: comma- or space-separated host names (`.example.com` or `example.com` match
    the domain and its subdomains), IP addresses, CIDRs, `host:port`, or `*` for all."""
    return tuple(entry.strip().lower() for entry in text.replace(" ", ",").split(",") if entry.strip())


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (also as ::ffff:127.x.x.x) and localhost: only this machine reaches it."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def _is_unspecified(host: str) -> bool:
    """0.0.0.0 or ::: connecting to it reaches this machine, like loopback."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def _bypassed(host: str, port: int, no_proxy: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for entry in no_proxy:
        if entry == "*":
            return True
        name, want_port = entry, None
        if entry.count(":") == 1 or (entry.startswith("[") and "]:" in entry):  # host:port, [v6]:port
            name, _, port_text = entry.rpartition(":")
            if not port_text.isdigit():
                continue
            want_port = int(port_text)
        name = name.strip("[]").rstrip(".")
        if want_port is not None and want_port != port:
            continue
        if ip is not None:
            try:
                if ip in ipaddress.ip_network(name, strict=False):
                    return True
            except ValueError:
                pass
            continue
        name = name.lstrip("*").lstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


@dataclass(frozen=True, slots=True)
class Egress:
    """The proxy for each scheme, and the hosts that bypass them. `Egress()` is direct."""

    https: ProxyURL | None = None
    http: ProxyURL | None = None
    no_proxy: tuple[str, ...] = ()

    def proxy_for(self, url: str) -> ProxyURL | None:
        """The proxy `url` goes through, or None for a direct connection."""
        parts = urlsplit(url)
        via = self.https if parts.scheme == "https" else self.http if parts.scheme == "http" else None
        host = parts.hostname or ""
        if via is None or is_loopback(host) or _is_unspecified(host):
            return None
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return None if _bypassed(host, port, self.no_proxy) else via


DIRECT = Egress()
