"""One raw setting to a typed value. Every check takes the merged raw settings and the dotted
key it reads, and raises `ConfigError` naming that key; `proxy.config` runs them all and
gathers their errors. Pure: nothing here reads the environment or a file, except
`read_secret_file` and the readability check of `upstream.ca_file`.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from proxy.egress import DIRECT, DIRECT_WORD, Egress, parse_no_proxy, parse_proxy
from proxy.errors import ConfigError, SecretFileError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: form fields the proxy sets itself in an OAuth2 token request
OWN_FORM_FIELDS = frozenset({"grant_type", "client_id", "client_secret", "scope", "audience"})


class Secret:
    """A string that never shows itself in a repr, a log line or a traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


#: the most a secret file may hold: a client secret is tens of bytes; more is not a secret file
MAX_SECRET_BYTES = 64 * 1024


def read_secret_file(path: str) -> str:
    """The secret in `path`, minus one trailing newline (\\n or \\r\\n) and nothing else.

    Raises `SecretFileError` saying why in plain words (`cannot read PATH: No such file or
    directory`, `... Permission denied`, `PATH is a directory`, `PATH is empty`, `PATH is not
    a regular file`): `load` turns it into a config error, a token request into
    `SecretUnreadable`. Only a regular file of at most MAX_SECRET_BYTES is read, opened
    without blocking: this runs on the event loop, where a FIFO put in the file's place would
    otherwise stop the whole process until someone wrote into it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except IsADirectoryError as exc:
        raise SecretFileError(path, f"{path} is a directory, not a file") from exc
    except OSError as exc:
        raise SecretFileError(path, f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise SecretFileError(path, f"{path} is a directory, not a file")
        if not stat.S_ISREG(info.st_mode):
            raise SecretFileError(path, f"{path} is not a regular file")
        if info.st_size > MAX_SECRET_BYTES:
            raise SecretFileError(path, f"{path} is over {MAX_SECRET_BYTES // 1024} KiB: not a secret")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise SecretFileError(path, f"cannot read {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET_BYTES:
        raise SecretFileError(path, f"{path} is over {MAX_SECRET_BYTES // 1024} KiB: not a secret")
    try:
        value = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SecretFileError(path, f"{path} is not UTF-8 text") from exc
    if value.endswith("\r\n"):
        value = value[:-2]
    elif value.endswith("\n"):
        value = value[:-1]
    if not value:
        raise SecretFileError(path, f"{path} is empty")
    return value


def egress(raw: Mapping[str, Any], egress_env: Mapping[str, tuple[str, str]]) -> Egress:
    """upstream.proxy (a URL, or `direct`); when unset, HTTPS_PROXY, HTTP_PROXY and NO_PROXY."""
    value = opt_str(raw, "upstream.proxy")
    if value is not None:
        if value.strip().lower() == DIRECT_WORD:
            return DIRECT
        try:
            via = parse_proxy(value.strip())
        except ValueError as exc:
            raise ConfigError("upstream.proxy", f"{exc}; or {DIRECT_WORD} for no proxy") from None
        return Egress(https=via, http=via)
    found: dict[str, Any] = {}
    for name in ("https_proxy", "http_proxy"):
        if name in egress_env:
            var, text = egress_env[name]
            try:
                found[name] = parse_proxy(text.strip())
            except ValueError as exc:
                raise ConfigError(var, f"{exc}; set upstream.proxy (a URL, or {DIRECT_WORD}) to override it") from None
    no_proxy = parse_no_proxy(egress_env["no_proxy"][1]) if "no_proxy" in egress_env else ()
    return Egress(https=found.get("https_proxy"), http=found.get("http_proxy"), no_proxy=no_proxy)


def oauth2_params(raw: Mapping[str, Any], style: str | None) -> tuple[str | None, str | None, tuple[tuple[str, str], ...]]:
    """(scope, audience, extra_params): form fields of the OAuth2 styles; with `ndovu` (whose
    call has no body) any of them is an error."""
    scope = opt_str(raw, "auth.scope")
    audience = opt_str(raw, "auth.audience")
    value = raw["auth.extra_params"]
    if value is None or value == "":
        value = {}
    if not isinstance(value, dict):
        raise ConfigError("auth.extra_params", "expected a mapping of form fields")
    extra = []
    for field_name, field_value in value.items():
        if field_name in OWN_FORM_FIELDS:
            raise ConfigError("auth.extra_params", f"{field_name} is set by the proxy"
                              + ("; use auth.scope or auth.audience" if field_name in ("scope", "audience") else ""))
        if isinstance(field_value, bool) or not isinstance(field_value, str | int | float):
            raise ConfigError("auth.extra_params", f"{field_name}: expected a string")
        extra.append((field_name, str(field_value)))
    if style == "ndovu":
        for key, given in (("auth.scope", scope), ("auth.audience", audience), ("auth.extra_params", extra)):
            if given:
                raise ConfigError(key, "only with auth.style client_secret_basic or client_secret_post "
                                  "(Ndovu's auth call takes no body)")
    return scope, audience, tuple(extra)


def client_secret(raw: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(secret file, secret): the file, once readable, wins and the secret is dropped."""
    secret_file = opt_str(raw, "auth.client_secret_file")
    if secret_file is not None:
        try:
            read_secret_file(secret_file)  # read as every token request will; the value is dropped
        except SecretFileError as exc:
            raise ConfigError("auth.client_secret_file", exc.reason) from exc
        return secret_file, None
    secret = opt_str(raw, "auth.client_secret")
    if secret is None:
        raise ConfigError(
            "auth.client_secret", "missing; set NDOVU_CLIENT_SECRET or auth.client_secret_file"
        )
    return None, secret


def client_id(raw: Mapping[str, Any], style: str | None) -> str:
    client_id = opt_str(raw, "auth.client_id")
    if client_id is None:
        raise ConfigError("auth.client_id", "missing; set NDOVU_CLIENT_ID")
    if ":" in client_id and style == "ndovu":
        # Basic credentials are the raw id:secret; an id with a colon cannot be told apart
        # (RFC 7617 §2). The OAuth2 styles form-urlencode it (RFC 6749 §2.3.1).
        raise ConfigError("auth.client_id", "must not contain ':' with auth.style ndovu")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in client_id):
        raise ConfigError("auth.client_id", "must not contain control characters")
    return client_id


def ca_file(raw: Mapping[str, Any]) -> str | None:
    ca_file = opt_str(raw, "upstream.ca_file")
    if ca_file is not None and not os.access(ca_file, os.R_OK):
        raise ConfigError("upstream.ca_file", f"cannot read {ca_file}")
    return ca_file


def opt_str(raw: Mapping[str, Any], key: str) -> str | None:
    value = raw[key]
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(key, "expected a string")
    return str(value)


def number(
    raw: Mapping[str, Any], key: str, *, positive: bool = False, integer: bool = False
) -> float:
    value = raw[key]
    kind = "a whole number" if integer else "a number"
    if isinstance(value, bool):
        raise ConfigError(key, f"expected {kind}, got {value!r}")
    if isinstance(value, str):
        try:
            value = int(value) if integer else float(value)
        except ValueError:
            raise ConfigError(key, f"expected {kind}, got {value!r}") from None
    if not isinstance(value, int | float) or (integer and not float(value).is_integer()):
        raise ConfigError(key, f"expected {kind}, got {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(key, f"expected {kind}, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ConfigError(key, "must be greater than 0" if positive else "must not be negative")
    return float(value)


TRUE_WORDS = {"true", "yes", "on", "1"}
FALSE_WORDS = {"false", "no", "off", "0"}


def boolean(raw: Mapping[str, Any], key: str) -> bool:
    value = raw[key]
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in TRUE_WORDS | FALSE_WORDS:
        return value.lower() in TRUE_WORDS
    raise ConfigError(key, f"expected true or false, got {value!r}")


def choice(raw: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = raw[key]
    if isinstance(value, str) and value.lower() in choices:
        return value.lower()
    raise ConfigError(key, f"expected one of {', '.join(choices)}, got {value!r}")


def parse_address(text: str) -> Address:
    """`HOST:PORT` or `[IPv6]:PORT`; raises ValueError."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(text)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(text)
    return Address(host, int(port))


def address(raw: Mapping[str, Any], key: str) -> Address:
    value = raw[key]
    try:
        return parse_address(str(value))
    except ValueError:
        raise ConfigError(key, f"expected HOST:PORT, got {value!r}") from None


def opt_address(raw: Mapping[str, Any], key: str) -> Address | None:
    value = raw[key]
    if value is None or (isinstance(value, str) and value.lower() in ("", "off", "none", "null")):
        return None
    return address(raw, key)


def is_http_url(value: str) -> bool:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return False
    return (
        parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and not parts.query
        and not parts.fragment
        and "@" not in parts.netloc
        and not any(c.isspace() for c in value)
    )


def url(raw: Mapping[str, Any], key: str) -> str:
    value = raw[key]
    if not isinstance(value, str) or not is_http_url(value):
        raise ConfigError(key, "not a valid http(s) URL")
    return value.rstrip("/")


def token_url(raw: Mapping[str, Any], upstream_url: str) -> str:
    value = raw["auth.token_path"]
    if isinstance(value, str) and value.startswith("/") and not value.startswith("//"):
        return upstream_url + value
    if isinstance(value, str) and is_http_url(value):
        return value
    raise ConfigError("auth.token_path", "expected a path starting with / or an http(s) URL")


def segments(path: str) -> list[str]:
    return [seg for seg in path.split("/") if seg]


def refuse_doubled_base_path(
    upstream_url: str, token_url: str, token_path: object, allowed_paths: tuple[str, ...]
) -> None:
    """A base path in upstream.url that ends, segment by segment, with the first two or more
    segments of the token path or of an allowed_paths prefix is the API's own path given
    twice (NDOVU_UPSTREAM_URL=http://host/api/v3/partners): every URL would hold it doubled.
    One shared segment (`/gw/api` against `/api/v3/...`) is a plausible gateway prefix."""
    parts = urlsplit(upstream_url)
    base = segments(parts.path)
    if len(base) < 2:
        return
    # the token path first: it names the URL the user will recognise
    token = [token_path] if isinstance(token_path, str) and token_path.startswith("/") else []
    for candidate in (*token, *allowed_paths):
        segs = segments(candidate)
        for k in range(min(len(base), len(segs)), 1, -1):
            if base[-k:] != segs[:k]:
                continue
            doubled = "/" + "/".join(base[-k:])
            keep = "/".join(base[:-k])
            use = f"{parts.scheme}://{parts.netloc}" + (f"/{keep}" if keep else "")
            whole = "/" + "/".join(base)
            what = f"the base path {whole} would be doubled" if whole == doubled else (
                f"the base path {whole} would double {doubled}")
            if candidate in token:
                result = f"the token URL would be {token_url}"
            else:
                result = f"a request to {candidate} would go to {upstream_url}{candidate}"
            raise ConfigError("upstream.url", f"{what}: {result}; use {use}")


def as_list(raw: Mapping[str, Any], key: str) -> list[Any]:
    value = raw[key]
    if isinstance(value, str):  # from the environment or a flag: comma-separated
        return [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        raise ConfigError(key, "expected a list")
    return value


def paths(raw: Mapping[str, Any], key: str) -> tuple[str, ...]:
    paths = as_list(raw, key)
    for p in paths:
        if not isinstance(p, str) or not p.startswith("/"):
            raise ConfigError(key, f"each entry must be a path starting with /, got {p!r}")
    return tuple(paths)


def networks(raw: Mapping[str, Any], key: str) -> tuple[IPNetwork, ...]:
    out = []
    for entry in as_list(raw, key):
        try:
            out.append(ipaddress.ip_network(str(entry), strict=False))
        except ValueError:
            raise ConfigError(key, f"not a CIDR: {entry!r}") from None
    return tuple(out)

