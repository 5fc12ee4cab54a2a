"""One frozen settings object, built once at start-up from four sources.

Highest first: command-line flags, environment, the YAML file, defaults. This module is
the only reader of `os.environ` and of the config file; the caller passes both in, so
nothing here runs at import time. Problems raise `ConfigErrors` (a `ConfigError`): every
problem found in one load, each naming its dotted key, so that one run shows them all.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, cast
from urllib.parse import urlsplit

from proxy.errors import ConfigError, SecretFileError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: environment variable -> dotted key it sets
ENV_KEYS: Mapping[str, str] = {
    "NDOVU_CLIENT_ID": "auth.client_id",
    "NDOVU_CLIENT_SECRET": "auth.client_secret",
    "NDOVU_CLIENT_SECRET_FILE": "auth.client_secret_file",
    "NDOVU_UPSTREAM_URL": "upstream.url",
    "NDOVU_PROXY_LISTEN": "listen",
    "NDOVU_PROXY_ADMIN_LISTEN": "admin_listen",
    "NDOVU_PROXY_LOG_LEVEL": "logging.level",
    "NDOVU_PROXY_LOG_FORMAT": "logging.format",
}
CONFIG_ENV = "NDOVU_PROXY_CONFIG"

DEFAULTS: Mapping[str, Any] = {
    "listen": "127.0.0.1:8080",
    "admin_listen": "127.0.0.1:9901",
    "upstream.url": "https://be-dev-1.dev.ndovu.co",
    "upstream.connect_timeout": 5,
    "upstream.read_timeout": 60,
    "upstream.tls_verify": True,
    "upstream.ca_file": None,
    "upstream.max_connections": 100,
    "auth.token_path": "/api/v3/partners/auth",
    "auth.client_id": None,
    "auth.client_secret": None,
    "auth.client_secret_file": None,
    "auth.refresh_margin": 60,
    "auth.timeout": 10,
    "auth.backoff_initial": 1,
    "auth.backoff_max": 60,
    "forwarding.retry_on_401": True,
    "forwarding.replay_buffer_bytes": 1048576,
    "forwarding.max_body_bytes": 104857600,
    "forwarding.allowed_paths": ["/api/v3/partners/"],
    "forwarding.allowed_clients": [],
    "forwarding.inbound_token": None,
    "limits.max_header_bytes": 65536,
    "logging.level": "info",
    "logging.format": "auto",
    "logging.access_log": True,
    "shutdown_timeout": 20,
    "shutdown_delay": 0,
}
SECTIONS = frozenset(k.split(".")[0] for k in DEFAULTS if "." in k)

_P = ParamSpec("_P")
_T = TypeVar("_T")


class ConfigErrors(ConfigError):
    """Every problem one `load` found, in the order found (file first, then each setting).
    `key` and `problem` are the first one's, for callers that show a single error; `str()`
    is one `key: problem` line per error."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        if not errors:
            raise ValueError("ConfigErrors needs at least one error")
        super().__init__(errors[0].key, errors[0].problem)
        self.errors: tuple[ConfigError, ...] = tuple(errors)

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


class _Collector:
    """Runs validators, keeping each `ConfigError` instead of stopping at the first."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    def add(self, key: str, problem: str) -> None:
        self.errors.append(ConfigError(key, problem))

    def get(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """fn's result; on a ConfigError, the error is kept and None comes back typed as the
        result: a caller checks `ok` before it depends on the value, and `load` raises before
        any Settings is built from it."""
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            self.errors.append(exc)
            return cast(_T, None)

    def count(self) -> int:
        return len(self.errors)

    def raise_any(self) -> None:
        if self.errors:
            raise ConfigErrors(self.errors)


def did_you_mean(word: str, known: Sequence[str]) -> str:
    """`; did you mean X?` when one known name is close to `word`, else ''."""
    close = difflib.get_close_matches(word, known, n=1)
    return f"; did you mean {close[0]}?" if close else ""


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


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    url: str  # scheme://host[:port][/base-path], no trailing slash
    connect_timeout: float
    read_timeout: float
    tls_verify: bool
    ca_file: str | None
    max_connections: int


@dataclass(frozen=True, slots=True)
class AuthSettings:
    token_url: str  # token_path resolved against upstream.url
    client_id: str
    client_secret: Secret | None
    client_secret_file: str | None  # wins over client_secret; read at every token request
    refresh_margin: float
    timeout: float
    backoff_initial: float
    backoff_max: float


@dataclass(frozen=True, slots=True)
class ForwardingSettings:
    retry_on_401: bool
    replay_buffer_bytes: int
    max_body_bytes: int
    allowed_paths: tuple[str, ...]  # [] forwards every path
    allowed_clients: tuple[IPNetwork, ...]  # [] admits everyone who reaches `listen`
    inbound_token: Secret | None


@dataclass(frozen=True, slots=True)
class LimitsSettings:
    max_header_bytes: int  # request line + headers + trailers; over it: 431


@dataclass(frozen=True, slots=True)
class LoggingSettings:
    level: str
    format: str  # json | console | auto
    access_log: bool


@dataclass(frozen=True, slots=True)
class Settings:
    listen: Address
    admin_listen: Address | None
    upstream: UpstreamSettings
    auth: AuthSettings
    forwarding: ForwardingSettings
    logging: LoggingSettings
    shutdown_timeout: float
    limits: LimitsSettings = LimitsSettings(max_header_bytes=65536)
    #: seconds the listener keeps accepting after SIGTERM while /readyz already says draining
    shutdown_delay: float = 0.0
    config_file: str | None = None


def load(flags: Mapping[str, Any], environ: Mapping[str, str]) -> Settings:
    """Build the settings. `flags` maps dotted keys (and `config`) to values given on the
    command line; a None value means "not given"."""
    errors = _Collector()
    raw, _, path = _merge(flags, environ, errors)
    return _build(raw, config_file=path, errors=errors)


def _merge(
    flags: Mapping[str, Any], environ: Mapping[str, str], errors: _Collector
) -> tuple[dict[str, Any], dict[str, str], str | None]:
    """(raw value by dotted key, its source by dotted key, the config file). A source is
    `default`, `file PATH` (`file PATH via ${VAR}` when the value used a variable),
    `env NAME` or `flag KEY`."""
    raw: dict[str, Any] = dict(DEFAULTS)
    source = dict.fromkeys(DEFAULTS, "default")
    path = flags.get("config") or environ.get(CONFIG_ENV) or None
    if path:
        used: dict[str, list[str]] = {}
        try:
            from_file = _read_file(path, environ, errors, used)
        except ConfigError as exc:  # the file as a whole is unusable: nothing else can be judged
            raise ConfigErrors([*errors.errors, exc]) from exc
        raw.update(from_file)
        for key in from_file:
            via = ", ".join(f"${{{var}}}" for var in used.get(key, ()))
            source[key] = f"file {path}" + (f" via {via}" if via else "")
    for var, key in ENV_KEYS.items():
        if environ.get(var):  # an empty variable counts as unset, as compose files pass them
            raw[key] = environ[var]
            source[key] = f"env {var}"
    for key, value in flags.items():
        if key != "config" and value is not None:
            raw[key] = value
            source[key] = f"flag {key}"
    return raw, source, path


#: the settings `effective` never shows, only whether they are set
SECRET_KEYS = frozenset({"auth.client_secret", "forwarding.inbound_token"})
MASK = "<set>"


def effective(
    flags: Mapping[str, Any], environ: Mapping[str, str], flag_names: Mapping[str, str] | None = None
) -> dict[str, tuple[Any, str]]:
    """Every setting as (value, source), validated as `load` validates (raising the same
    `ConfigErrors`). Secrets show as `<set>`; a password in a URL as `<set>` in its place.
    `flag_names` renames `flag KEY` sources to the flag as typed (`flag --upstream`)."""
    flag_names = flag_names or {}
    errors = _Collector()
    raw, source, path = _merge(flags, environ, errors)
    _build(raw, config_file=path, errors=errors)  # raises on any problem
    out: dict[str, tuple[Any, str]] = {}
    if path:
        out["config"] = (path, f"flag {flag_names.get('config', 'config')}" if flags.get("config")
                         else f"env {CONFIG_ENV}")
    for key in DEFAULTS:
        value, where = raw[key], source[key]
        if where.startswith("flag "):
            where = f"flag {flag_names.get(key, key)}"
        if key in SECRET_KEYS and value not in (None, ""):
            value = MASK
        out[key] = (_mask_url_passwords(value), where)
    return out


_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@:\s]*:)[^/@\s]*@")


def _mask_url_passwords(value: Any) -> Any:
    if isinstance(value, str):
        return _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}@", value)
    if isinstance(value, list):
        return [_mask_url_passwords(v) for v in value]
    return value


def read_secret_file(path: str) -> str:
    """The secret in `path`, minus one trailing newline (\\n or \\r\\n) and nothing else.

    Raises `SecretFileError` saying why in plain words (`cannot read PATH: No such file or
    directory`, `... Permission denied`, `PATH is a directory`, `PATH is empty`): `load` turns
    it into a config error, a token request into `SecretUnreadable`."""
    try:
        with open(path, encoding="utf-8") as fh:
            value = fh.read()
    except IsADirectoryError as exc:
        raise SecretFileError(path, f"{path} is a directory, not a file") from exc
    except OSError as exc:
        raise SecretFileError(path, f"cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise SecretFileError(path, f"{path} is not UTF-8 text") from exc
    if value.endswith("\r\n"):
        value = value[:-2]
    elif value.endswith("\n"):
        value = value[:-1]
    if not value:
        raise SecretFileError(path, f"{path} is empty")
    return value


# --- the file -------------------------------------------------------------------------

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _read_file(
    path: str, environ: Mapping[str, str], errors: _Collector | None = None,
    used: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """The file's settings by dotted key, `${VAR}` expanded. A file that cannot be read or
    parsed raises one ConfigError; problems with single keys go to `errors` (without it,
    they are raised together at the end). `used` gets, by key, the variables its value named."""
    import yaml  # only when there is a file: a sidecar configured by environment never loads it

    own = errors is None
    found = _Collector() if errors is None else errors
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("config", f"{path} is not UTF-8 text") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("config", f"{path} is not valid YAML{_yaml_where(exc, text)}") from exc
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError("config", f"{path} must hold a mapping of settings")
    out: dict[str, Any] = {}
    top_level = sorted({*SECTIONS, *(k for k in DEFAULTS if "." not in k)})
    for key, value in doc.items():
        key = str(key)
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                found.add(key, "must be a mapping")
                continue
            for sub, subvalue in value.items():
                dotted = f"{key}.{sub}"
                if dotted not in DEFAULTS:
                    found.add(dotted, "unknown key" + _suggest_sub(key, str(sub)))
                    continue
                out[dotted] = found.get(_expand, subvalue, environ, dotted)
                _note_vars(used, dotted, subvalue)
        elif key in DEFAULTS:
            out[key] = found.get(_expand, value, environ, key)
            _note_vars(used, key, value)
        else:
            found.add(key, "unknown key" + did_you_mean(key, [*top_level, *DEFAULTS]))
    if own:
        found.raise_any()
    return out


def _note_vars(used: dict[str, list[str]] | None, key: str, value: Any) -> None:
    if used is None:
        return
    for text in value if isinstance(value, list) else [value]:
        if isinstance(text, str):
            for m in _VAR.finditer(text):
                if m[1] not in used.setdefault(key, []):
                    used[key].append(m[1])


def _suggest_sub(section: str, sub: str) -> str:
    """A close key in the same section; else the same name in another section."""
    mine = [k.split(".", 1)[1] for k in DEFAULTS if k.startswith(section + ".")]
    close = difflib.get_close_matches(sub, mine, n=1)
    if close:
        return f"; did you mean {section}.{close[0]}?"
    elsewhere = [k for k in DEFAULTS if k.endswith("." + sub)]
    return f"; did you mean {elsewhere[0]}?" if elsewhere else ""


_SECRET_LINE = re.compile(r"secret|token|password|://[^/\s]*:[^/\s]*@", re.IGNORECASE)


def _yaml_where(exc: Exception, text: str) -> str:
    """` at line L, column C: PROBLEM; the line: '...'` from a MarkedYAMLError. When the
    problem is at the end of the file, the line shown is the one where the unclosed thing
    began (the error's context). A line that may hold a credential shows only its key."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is None:
        return ""
    where = f" at line {mark.line + 1}, column {mark.column + 1}"
    problem = getattr(exc, "problem", None)
    if problem:
        where += f": {problem}"
    lines = text.splitlines()
    shown: int = mark.line
    if not (0 <= mark.line < len(lines) and lines[mark.line].strip()):
        context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context_mark is not None and 0 <= context_mark.line < len(lines):
            where += f"; {context or 'it began'} at line {context_mark.line + 1}, column {context_mark.column + 1}"
            shown = context_mark.line
        else:  # the last line with something on it, before the end
            filled = [n for n, ln in enumerate(lines[: mark.line + 1]) if ln.strip()]
            if not filled:
                return where
            where += f"; the last line before it is line {filled[-1] + 1}"
            shown = filled[-1]
    line = lines[shown].rstrip()
    if _SECRET_LINE.search(line):
        line = line.split(":", 1)[0] + ": <hidden>" if ":" in line else "<hidden>"
    return where + f"; the line: {line!r}"


def _expand(value: Any, environ: Mapping[str, str], key: str) -> Any:
    """`${VAR}` and `${VAR:-default}` in strings; an unset VAR without default is ''."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: environ.get(m[1]) or (m[2] or ""), value)
    if isinstance(value, list):
        return [_expand(v, environ, key) for v in value]
    if isinstance(value, dict):
        raise ConfigError(key, "expected a value, not a mapping")
    return value


# --- typing and checking ----------------------------------------------------------------


def _build(raw: Mapping[str, Any], *, config_file: str | None, errors: _Collector) -> Settings:
    c = errors
    before = c.count()
    upstream_url = c.get(_url, raw, "upstream.url")
    upstream_ok = c.count() == before
    secret_file, secret = c.get(_client_secret, raw) or (None, None)
    client_id = c.get(_client_id, raw)
    ca_file = c.get(_ca_file, raw)
    before = c.count()
    backoff_initial = c.get(_number, raw, "auth.backoff_initial", positive=True)
    backoff_max = c.get(_number, raw, "auth.backoff_max", positive=True)
    if c.count() == before and backoff_max < backoff_initial:
        c.add("auth.backoff_max", "must be at least auth.backoff_initial")
    inbound = c.get(_opt_str, raw, "forwarding.inbound_token")
    before = c.count()
    # a bad upstream.url is reported once, on its own key; the token path is still checked
    token_url = c.get(_token_url, raw, upstream_url if upstream_ok else "http://upstream.invalid")
    allowed_paths = c.get(_paths, raw, "forwarding.allowed_paths")
    if upstream_ok and c.count() == before:
        c.get(_refuse_doubled_base_path, upstream_url, token_url, raw["auth.token_path"], allowed_paths)
    listen = c.get(_address, raw, "listen")
    admin_listen = c.get(_opt_address, raw, "admin_listen")
    connect_timeout = c.get(_number, raw, "upstream.connect_timeout", positive=True)
    read_timeout = c.get(_number, raw, "upstream.read_timeout", positive=True)
    tls_verify = c.get(_bool, raw, "upstream.tls_verify")
    max_connections = c.get(_number, raw, "upstream.max_connections", positive=True, integer=True)
    refresh_margin = c.get(_number, raw, "auth.refresh_margin")
    auth_timeout = c.get(_number, raw, "auth.timeout", positive=True)
    retry_on_401 = c.get(_bool, raw, "forwarding.retry_on_401")
    replay_buffer_bytes = c.get(_number, raw, "forwarding.replay_buffer_bytes", integer=True)
    max_body_bytes = c.get(_number, raw, "forwarding.max_body_bytes", integer=True)
    allowed_clients = c.get(_networks, raw, "forwarding.allowed_clients")
    level = c.get(_choice, raw, "logging.level", ("debug", "info", "warning", "error"))
    log_format = c.get(_choice, raw, "logging.format", ("json", "console", "auto"))
    access_log = c.get(_bool, raw, "logging.access_log")
    shutdown_timeout = c.get(_number, raw, "shutdown_timeout")
    shutdown_delay = c.get(_number, raw, "shutdown_delay")
    max_header_bytes = c.get(_number, raw, "limits.max_header_bytes", positive=True, integer=True)
    c.raise_any()
    return Settings(
        listen=listen,
        admin_listen=admin_listen,
        upstream=UpstreamSettings(
            url=upstream_url,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            tls_verify=tls_verify,
            ca_file=ca_file,
            max_connections=int(max_connections),
        ),
        auth=AuthSettings(
            token_url=token_url,
            client_id=client_id,
            client_secret=Secret(secret) if secret is not None else None,
            client_secret_file=secret_file,
            refresh_margin=refresh_margin,
            timeout=auth_timeout,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
        ),
        forwarding=ForwardingSettings(
            retry_on_401=retry_on_401,
            replay_buffer_bytes=int(replay_buffer_bytes),
            max_body_bytes=int(max_body_bytes),
            allowed_paths=allowed_paths,
            allowed_clients=allowed_clients,
            inbound_token=Secret(inbound) if inbound is not None else None,
        ),
        logging=LoggingSettings(level=level, format=log_format, access_log=access_log),
        shutdown_timeout=shutdown_timeout,
        shutdown_delay=shutdown_delay,
        limits=LimitsSettings(max_header_bytes=int(max_header_bytes)),
        config_file=config_file,
    )


def _client_secret(raw: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(secret file, secret): the file, once readable, wins and the secret is dropped."""
    secret_file = _opt_str(raw, "auth.client_secret_file")
    if secret_file is not None:
        try:
            read_secret_file(secret_file)  # read as every token request will; the value is dropped
        except SecretFileError as exc:
            raise ConfigError("auth.client_secret_file", exc.reason) from exc
        return secret_file, None
    secret = _opt_str(raw, "auth.client_secret")
    if secret is None:
        raise ConfigError(
            "auth.client_secret", "missing; set NDOVU_CLIENT_SECRET or auth.client_secret_file"
        )
    return None, secret


def _client_id(raw: Mapping[str, Any]) -> str:
    client_id = _opt_str(raw, "auth.client_id")
    if client_id is None:
        raise ConfigError("auth.client_id", "missing; set NDOVU_CLIENT_ID")
    if ":" in client_id:
        # Basic credentials are id:secret; an id with a colon cannot be told apart (RFC 7617 §2)
        raise ConfigError("auth.client_id", "must not contain ':'")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in client_id):
        raise ConfigError("auth.client_id", "must not contain control characters")
    return client_id


def _ca_file(raw: Mapping[str, Any]) -> str | None:
    ca_file = _opt_str(raw, "upstream.ca_file")
    if ca_file is not None and not os.access(ca_file, os.R_OK):
        raise ConfigError("upstream.ca_file", f"cannot read {ca_file}")
    return ca_file


def _opt_str(raw: Mapping[str, Any], key: str) -> str | None:
    value = raw[key]
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(key, "expected a string")
    return str(value)


def _number(
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


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _bool(raw: Mapping[str, Any], key: str) -> bool:
    value = raw[key]
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise ConfigError(key, f"expected true or false, got {value!r}")


def _choice(raw: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> str:
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


def _address(raw: Mapping[str, Any], key: str) -> Address:
    value = raw[key]
    try:
        return parse_address(str(value))
    except ValueError:
        raise ConfigError(key, f"expected HOST:PORT, got {value!r}") from None


def _opt_address(raw: Mapping[str, Any], key: str) -> Address | None:
    value = raw[key]
    if value is None or (isinstance(value, str) and value.lower() in ("", "off", "none", "null")):
        return None
    return _address(raw, key)


def _is_http_url(value: str) -> bool:
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


def _url(raw: Mapping[str, Any], key: str) -> str:
    value = raw[key]
    if not isinstance(value, str) or not _is_http_url(value):
        raise ConfigError(key, "not a valid http(s) URL")
    return value.rstrip("/")


def _token_url(raw: Mapping[str, Any], upstream_url: str) -> str:
    value = raw["auth.token_path"]
    if isinstance(value, str) and value.startswith("/") and not value.startswith("//"):
        return upstream_url + value
    if isinstance(value, str) and _is_http_url(value):
        return value
    raise ConfigError("auth.token_path", "expected a path starting with / or an http(s) URL")


def _segments(path: str) -> list[str]:
    return [seg for seg in path.split("/") if seg]


def _refuse_doubled_base_path(
    upstream_url: str, token_url: str, token_path: object, allowed_paths: tuple[str, ...]
) -> None:
    """A base path in upstream.url that ends, segment by segment, with the first two or more
    segments of the token path or of an allowed_paths prefix is the API's own path given
    twice (NDOVU_UPSTREAM_URL=http://host/api/v3/partners): every URL would hold it doubled.
    One shared segment (`/gw/api` against `/api/v3/...`) is a plausible gateway prefix."""
    parts = urlsplit(upstream_url)
    base = _segments(parts.path)
    if len(base) < 2:
        return
    # the token path first: it names the URL the user will recognise
    token = [token_path] if isinstance(token_path, str) and token_path.startswith("/") else []
    for candidate in (*token, *allowed_paths):
        segs = _segments(candidate)
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


def _list(raw: Mapping[str, Any], key: str) -> list[Any]:
    value = raw[key]
    if isinstance(value, str):  # from the environment or a flag: comma-separated
        return [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        raise ConfigError(key, "expected a list")
    return value


def _paths(raw: Mapping[str, Any], key: str) -> tuple[str, ...]:
    paths = _list(raw, key)
    for p in paths:
        if not isinstance(p, str) or not p.startswith("/"):
            raise ConfigError(key, f"each entry must be a path starting with /, got {p!r}")
    return tuple(paths)


def _networks(raw: Mapping[str, Any], key: str) -> tuple[IPNetwork, ...]:
    out = []
    for entry in _list(raw, key):
        try:
            out.append(ipaddress.ip_network(str(entry), strict=False))
        except ValueError:
            raise ConfigError(key, f"not a CIDR: {entry!r}") from None
    return tuple(out)

