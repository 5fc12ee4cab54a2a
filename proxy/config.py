"""One frozen settings object, built once at start-up from four sources.

Highest first: command-line flags, environment, the YAML file, defaults. This module is
the only reader of `os.environ` and of the config file; the caller passes both in, so
nothing here runs at import time. Problems raise `ConfigErrors` (a `ConfigError`): every
problem found in one load, each naming its dotted key, so that one run shows them all.

Settings hold one `Route` or more: without `routes:` one, named `default`, from the top-level
keys; with it, each route's own keys over the top-level ones (which the environment and flags
set), its errors named `routes[NAME].KEY`. The check of each single value is `proxy.values`'.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, cast

from proxy import values
from proxy.egress import DIRECT, Egress
from proxy.errors import ConfigError
# the values a setting takes, and two readers, are part of this module's API too
from proxy.values import Address as Address
from proxy.values import IPNetwork as IPNetwork
from proxy.values import Secret as Secret
from proxy.values import parse_address as parse_address
from proxy.values import read_secret_file as read_secret_file

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
#: the egress proxy's variables, each read lower-case first as curl reads them; the upstream.proxy
#: setting wins over all three
EGRESS_ENV = ("https_proxy", "http_proxy", "no_proxy")

DEFAULTS: Mapping[str, Any] = {
    "listen": "127.0.0.1:8080",
    "admin_listen": "127.0.0.1:9901",
    "upstream.url": "https://be-dev-1.dev.ndovu.co",
    "upstream.connect_timeout": 5,
    "upstream.read_timeout": 60,
    "upstream.tls_verify": True,
    "upstream.ca_file": None,
    "upstream.max_connections": 100,
    "upstream.proxy": None,
    "auth.style": "ndovu",
    "auth.scope": None,
    "auth.audience": None,
    "auth.extra_params": {},
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
#: the blocks a route may override, key by key
ROUTE_SECTIONS = ("upstream", "auth", "forwarding")
#: settings whose value is a mapping (of form fields)
MAPPING_KEYS = frozenset({"auth.extra_params"})
#: auth.style: how the client authenticates at the token endpoint
AUTH_STYLES = ("ndovu", "client_secret_basic", "client_secret_post")
#: a route's name: a metric label value and part of `routes[NAME].key` in errors
ROUTE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")

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


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    url: str  # scheme://host[:port][/base-path], no trailing slash
    connect_timeout: float
    read_timeout: float
    tls_verify: bool
    ca_file: str | None
    max_connections: int
    #: the egress proxy for the upstream and the token URL (upstream.proxy, else the environment)
    egress: Egress = DIRECT


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
    style: str = "ndovu"  # one of AUTH_STYLES
    scope: str | None = None  # the OAuth2 styles only
    audience: str | None = None
    extra_params: tuple[tuple[str, str], ...] = ()  # form fields, in the order given

    @property
    def cache_key(self) -> tuple[object, ...]:
        """Routes whose auth has the same key share one token cache; others never see each
        other's token. Beyond SPEC's (token URL, client id, style, scope, audience): the extra
        form fields (an RFC 8707 `resource` names the API a token is for) and the secret's
        source, so that no route's own setting is silently replaced by another's."""
        return (self.token_url, self.client_id, self.style, self.scope, self.audience, self.extra_params,
                self.client_secret, self.client_secret_file)


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
class Route:
    """One listener and what crosses it: its upstream, its credentials, its rules."""

    name: str
    listen: Address
    upstream: UpstreamSettings
    auth: AuthSettings
    forwarding: ForwardingSettings


#: the one route's name when the config has no `routes:`
DEFAULT_ROUTE = "default"


@dataclass(frozen=True, slots=True)
class Settings:
    routes: tuple[Route, ...]  # at least one; without `routes:`, one named "default"
    admin_listen: Address | None
    logging: LoggingSettings
    shutdown_timeout: float
    limits: LimitsSettings = LimitsSettings(max_header_bytes=65536)
    #: seconds the listener keeps accepting after SIGTERM while /readyz already says draining
    shutdown_delay: float = 0.0
    config_file: str | None = None
    #: `routes:` was set: metrics gain a route label, /tokenz and access lines a route key
    named_routes: bool = False

    # the first route's, which is the only one without `routes:`
    @property
    def listen(self) -> Address:
        return self.routes[0].listen

    @property
    def upstream(self) -> UpstreamSettings:
        return self.routes[0].upstream

    @property
    def auth(self) -> AuthSettings:
        return self.routes[0].auth

    @property
    def forwarding(self) -> ForwardingSettings:
        return self.routes[0].forwarding


def load(flags: Mapping[str, Any], environ: Mapping[str, str]) -> Settings:
    """Build the settings. `flags` maps dotted keys (and `config`) to values given on the
    command line; a None value means "not given"."""
    errors = _Collector()
    merged = _merge(flags, environ, errors)
    return _build(merged, errors=errors)


@dataclass(slots=True)
class _RouteRaw:
    """One entry of `routes:` as the file gives it: its label in errors (its name, else its
    index), and the dotted keys it sets (`name`, `listen`, `auth.client_id`, ...)."""

    label: str
    values: dict[str, Any]
    used: dict[str, list[str]]


@dataclass(slots=True)
class _Merged:
    raw: dict[str, Any]  # value by dotted key
    source: dict[str, str]  # its source by dotted key
    path: str | None  # the config file
    routes: list[_RouteRaw] | None  # `routes:`, when the file has it
    egress_env: dict[str, tuple[str, str]]  # (variable, value) of each EGRESS_ENV name that is set


def _merge(flags: Mapping[str, Any], environ: Mapping[str, str], errors: _Collector) -> _Merged:
    """Every source merged. A source is `default`, `file PATH` (`file PATH via ${VAR}` when the
    value used a variable), `env NAME` or `flag KEY`."""
    raw: dict[str, Any] = dict(DEFAULTS)
    source = dict.fromkeys(DEFAULTS, "default")
    path = flags.get("config") or environ.get(CONFIG_ENV) or None
    routes = None
    if path:
        used: dict[str, list[str]] = {}
        try:
            from_file, routes = _read_file(path, environ, errors, used)
        except ConfigError as exc:  # the file as a whole is unusable: nothing else can be judged
            raise ConfigErrors([*errors.errors, exc]) from exc
        raw.update(from_file)
        for key in from_file:
            source[key] = f"file {path}" + _via(used.get(key, ()))
    for var, key in ENV_KEYS.items():
        if environ.get(var):  # an empty variable counts as unset, as compose files pass them
            raw[key] = environ[var]
            source[key] = f"env {var}"
    for key, value in flags.items():
        if key != "config" and value is not None:
            raw[key] = value
            source[key] = f"flag {key}"
    egress_env: dict[str, tuple[str, str]] = {}
    for name in EGRESS_ENV:
        for var in (name, name.upper()):
            if environ.get(var):
                egress_env[name] = (var, environ[var])
                break
    return _Merged(raw, source, path, routes, egress_env)


def _via(variables: Sequence[str]) -> str:
    via = ", ".join(f"${{{var}}}" for var in variables)
    return f" via {via}" if via else ""


#: the settings `effective` never shows, only whether they are set
SECRET_KEYS = frozenset({"auth.client_secret", "forwarding.inbound_token"})
MASK = "<set>"


def effective(
    flags: Mapping[str, Any], environ: Mapping[str, str], flag_names: Mapping[str, str] | None = None
) -> dict[str, tuple[Any, str]]:
    """Every setting as (value, source), validated as `load` validates (raising the same
    `ConfigErrors`). Secrets show as `<set>`; a password in a URL as `<set>` in its place.
    `flag_names` renames `flag KEY` sources to the flag as typed (`flag --upstream`). With
    `routes:`, each route's own keys follow as `routes[NAME].KEY`, and the top-level `listen`
    (unused then) is left out; the egress proxy variables that are set show as `env.NAME`."""
    flag_names = flag_names or {}
    errors = _Collector()
    merged = _merge(flags, environ, errors)
    _build(merged, errors=errors)  # raises on any problem
    raw, source, path = merged.raw, merged.source, merged.path
    out: dict[str, tuple[Any, str]] = {}
    if path:
        out["config"] = (path, f"flag {flag_names.get('config', 'config')}" if flags.get("config")
                         else f"env {CONFIG_ENV}")
    for key in DEFAULTS:
        if key == "listen" and merged.routes:
            continue  # each route listens where its own line says; no listen of the top level is used
        value, where = raw[key], source[key]
        if where.startswith("flag "):
            where = f"flag {flag_names.get(key, key)}"
        out[key] = (_shown(key, value), where)
    for var, value in merged.egress_env.values():
        out[f"env.{var}"] = (_mask_proxy_password(value), f"env {var}")
    for route in merged.routes or ():
        for key, value in route.values.items():
            out[f"routes[{route.label}].{key}"] = (_shown(key, value), f"file {path}" + _via(route.used.get(key, ())))
    return out


#: settings that hold one URL, whose userinfo may hold a password
PROXY_KEYS = frozenset({"upstream.proxy"})


def _shown(key: str, value: Any) -> Any:
    if key in SECRET_KEYS and value not in (None, ""):
        return MASK
    if key in MAPPING_KEYS and isinstance(value, dict):  # form fields may be credentials
        return {name: MASK for name in value}
    if key in PROXY_KEYS and isinstance(value, str):
        return _mask_proxy_password(value)
    return _mask_url_passwords(value)


_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@:\s]*:)[^/@\s]*@")
#: a proxy URL, scheme optional (`user:pass@host:3128` is accepted too); the password runs to
#: the last `@`, whatever it holds, as urlsplit reads it
_PROXY_PASSWORD = re.compile(r"^(?P<head>\s*(?:[A-Za-z][A-Za-z0-9+.-]*://[^/@:]*:|[^/@:]*:(?!//))).*@", re.DOTALL)


def _mask_url_passwords(value: Any) -> Any:
    if isinstance(value, str):
        return _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}@", value)
    if isinstance(value, list):
        return [_mask_url_passwords(v) for v in value]
    return value


def _mask_proxy_password(value: str) -> str:
    return _PROXY_PASSWORD.sub(lambda m: f"{m['head']}{MASK}@", value, count=1)


# --- the file -------------------------------------------------------------------------

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _read_file(
    path: str, environ: Mapping[str, str], errors: _Collector, used: dict[str, list[str]],
) -> tuple[dict[str, Any], list[_RouteRaw] | None]:
    """The file's settings by dotted key, `${VAR}` expanded, and its `routes:` if any. A file
    that cannot be read or parsed raises one ConfigError; problems with single keys go to
    `errors`. `used` gets, by key, the variables its value named."""
    import yaml  # only when there is a file: a sidecar configured by environment never loads it

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
        return {}, None
    if not isinstance(doc, dict):
        raise ConfigError("config", f"{path} must hold a mapping of settings")
    routes = None
    if "routes" in doc:
        routes = _read_routes(doc.pop("routes"), environ, errors)
    top_level = sorted({*SECTIONS, *(k for k in DEFAULTS if "." not in k), "routes"})
    out = _read_keys(doc, environ, errors, used, sections=SECTIONS, plain=DEFAULTS, prefix="",
                     suggest=lambda key: did_you_mean(key, [*top_level, *DEFAULTS]))
    return out, routes


def _read_keys(
    doc: Mapping[Any, Any], environ: Mapping[str, str], errors: _Collector, used: dict[str, list[str]], *,
    sections: Collection[str], plain: Collection[str], prefix: str, suggest: Callable[[str], str],
) -> dict[str, Any]:
    """The dotted keys of one mapping: blocks among `sections`, plain keys among `plain`.
    Errors name keys with `prefix` in front (`routes[prod].`)."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        key = str(key)
        if key in sections:
            if value is None:
                continue
            if not isinstance(value, dict):
                errors.add(prefix + key, "must be a mapping")
                continue
            for sub, subvalue in value.items():
                dotted = f"{key}.{sub}"
                if dotted not in DEFAULTS:
                    errors.add(prefix + dotted, "unknown key" + _suggest_sub(key, str(sub)))
                    continue
                out[dotted] = errors.get(_expand, subvalue, environ, dotted, prefix)
                _note_vars(used, dotted, subvalue)
        elif key in plain:
            out[key] = errors.get(_expand, value, environ, key, prefix)
            _note_vars(used, key, value)
        else:
            errors.add(prefix + key, "unknown key" + suggest(key))
    return out


#: what a route sets besides its blocks
ROUTE_KEYS = ("name", "listen")


def _read_routes(value: Any, environ: Mapping[str, str], errors: _Collector) -> list[_RouteRaw] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        errors.add("routes", "expected a list of routes, each with a name and a listen address")
        return []
    routes = []
    for index, entry in enumerate(value):
        if not isinstance(entry, dict):
            errors.add(f"routes[{index}]", "expected a mapping with name, listen and optional upstream, auth "
                       "and forwarding blocks")
            continue
        name = entry.get("name")
        if isinstance(name, str):
            name = _expand(name, environ, "name")  # `name: "${ROUTE}"` is the route's name
        label = name if isinstance(name, str) and ROUTE_NAME.fullmatch(name) else str(index)
        used: dict[str, list[str]] = {}
        values = _read_keys(entry, environ, errors, used, sections=ROUTE_SECTIONS, plain=ROUTE_KEYS,
                            prefix=f"routes[{label}].",
                            suggest=lambda key: did_you_mean(key, [*ROUTE_KEYS, *ROUTE_SECTIONS]))
        routes.append(_RouteRaw(label, values, used))
    return routes


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


_SECRET_LINE = re.compile(r"secret|token|password|proxy|assertion|[^\s:]*:[^\s]*@", re.IGNORECASE)


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


def _expand(value: Any, environ: Mapping[str, str], key: str, prefix: str = "") -> Any:
    """`${VAR}` and `${VAR:-default}` in strings; an unset VAR without default is ''. Only
    MAPPING_KEYS take a mapping (of scalars)."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: environ.get(m[1]) or (m[2] or ""), value)
    if isinstance(value, list):
        return [_expand(v, environ, key, prefix) for v in value]
    if isinstance(value, dict):
        if key not in MAPPING_KEYS:
            raise ConfigError(prefix + key, "expected a value, not a mapping")
        return {str(k): _expand(v, environ, key, prefix) for k, v in value.items()}
    return value


# --- typing and checking ----------------------------------------------------------------


def _build(m: _Merged, *, errors: _Collector) -> Settings:
    c, raw = errors, m.raw
    if m.routes is None:
        route = _route(DEFAULT_ROUTE, raw, m.egress_env, c)
        routes = [route] if route is not None else []
    else:
        if m.source["listen"] != "default":
            c.add("listen", f"set by {m.source['listen'].split(' via ')[0]}, but with routes: every route has its "
                  "own listen address (routes[NAME].listen)")
        routes = _named_routes(m, c)
    admin_listen = c.get(values.opt_address, raw, "admin_listen")
    level = c.get(values.choice, raw, "logging.level", ("debug", "info", "warning", "error"))
    log_format = c.get(values.choice, raw, "logging.format", ("json", "console", "auto"))
    access_log = c.get(values.boolean, raw, "logging.access_log")
    shutdown_timeout = c.get(values.number, raw, "shutdown_timeout")
    shutdown_delay = c.get(values.number, raw, "shutdown_delay")
    max_header_bytes = c.get(values.number, raw, "limits.max_header_bytes", positive=True, integer=True)
    c.raise_any()
    return Settings(
        routes=tuple(routes),
        admin_listen=admin_listen,
        logging=LoggingSettings(level=level, format=log_format, access_log=access_log),
        shutdown_timeout=shutdown_timeout,
        shutdown_delay=shutdown_delay,
        limits=LimitsSettings(max_header_bytes=int(max_header_bytes)),
        config_file=m.path,
        named_routes=m.routes is not None,
    )


def _named_routes(m: _Merged, c: _Collector) -> list[Route]:
    """Each route: its own keys over the top-level ones. An error is named `routes[NAME].KEY`
    when the route's own keys cause it (the key is the route's, or the top-level keys alone
    are fine there: a route's `style: ndovu` against an inherited client id with a colon);
    an error the top-level keys have on their own keeps the top-level name, once."""
    routes: list[Route] = []
    names: dict[str, str] = {}
    addresses: dict[Address, str] = {}
    shown = {str(e) for e in c.errors}
    top_level = _Collector()
    _route(DEFAULT_ROUTE, m.raw, m.egress_env, top_level)  # judged alone: only to tell errors apart
    inherited = {str(e) for e in top_level.errors}
    for entry in m.routes or ():
        own = entry.values
        found = _Collector()
        name = own.get("name")
        if name is None or name == "":
            found.add("name", "missing; every route needs a unique name")
        elif not isinstance(name, str) or not ROUTE_NAME.fullmatch(name):
            found.add("name", "letters, digits, '_', '.' and '-' only, starting with a letter or digit, "
                      "at most 63 characters")
        elif name in names:
            found.add("name", f"{name!r} names two routes")
        else:
            names[name] = entry.label
        if "listen" not in own:
            found.add("listen", "missing; every route has its own listen address")
        merged = {**m.raw, **own}
        if "auth.client_secret" in own and "auth.client_secret_file" not in own:
            # the route's own secret: an inherited file (the top level's, NDOVU_CLIENT_SECRET_FILE)
            # must not win over it, as a file of the same level would
            merged["auth.client_secret_file"] = None
        route = _route(entry.label, merged, m.egress_env, found)
        if route is not None and route.listen.port != 0:  # port 0: each gets a free port of its own
            if route.listen in addresses:
                found.add("listen", f"{route.listen} is routes[{addresses[route.listen]}].listen too")
            else:
                addresses[route.listen] = entry.label
        for error in found.errors:
            caused = error.key in own or error.key in ROUTE_KEYS or str(error) not in inherited
            key = f"routes[{entry.label}].{error.key}" if caused else error.key
            if f"{key}: {error.problem}" not in shown:
                shown.add(f"{key}: {error.problem}")
                c.add(key, error.problem)
        if route is not None and not found.errors:
            routes.append(route)
    return routes


def _route(name: str, raw: Mapping[str, Any], egress_env: Mapping[str, tuple[str, str]],
           c: _Collector) -> Route | None:
    """One route's settings from its raw keys; None when any of them is wrong (in `c`)."""
    start = c.count()
    before = c.count()
    upstream_url = c.get(values.url, raw, "upstream.url")
    upstream_ok = c.count() == before
    style = c.get(values.choice, raw, "auth.style", AUTH_STYLES)
    secret_file, secret = c.get(values.client_secret, raw) or (None, None)
    client_id = c.get(values.client_id, raw, style)
    scope, audience, extra_params = c.get(values.oauth2_params, raw, style) or (None, None, ())
    ca_file = c.get(values.ca_file, raw)
    egress = c.get(values.egress, raw, egress_env)
    before = c.count()
    backoff_initial = c.get(values.number, raw, "auth.backoff_initial", positive=True)
    backoff_max = c.get(values.number, raw, "auth.backoff_max", positive=True)
    if c.count() == before and backoff_max < backoff_initial:
        c.add("auth.backoff_max", "must be at least auth.backoff_initial")
    inbound = c.get(values.opt_str, raw, "forwarding.inbound_token")
    before = c.count()
    # a bad upstream.url is reported once, on its own key; the token path is still checked
    token_url = c.get(values.token_url, raw, upstream_url if upstream_ok else "http://upstream.invalid")
    allowed_paths = c.get(values.paths, raw, "forwarding.allowed_paths")
    if upstream_ok and c.count() == before:
        c.get(values.refuse_doubled_base_path, upstream_url, token_url, raw["auth.token_path"], allowed_paths)
    listen = c.get(values.address, raw, "listen")
    connect_timeout = c.get(values.number, raw, "upstream.connect_timeout", positive=True)
    read_timeout = c.get(values.number, raw, "upstream.read_timeout", positive=True)
    tls_verify = c.get(values.boolean, raw, "upstream.tls_verify")
    max_connections = c.get(values.number, raw, "upstream.max_connections", positive=True, integer=True)
    refresh_margin = c.get(values.number, raw, "auth.refresh_margin")
    auth_timeout = c.get(values.number, raw, "auth.timeout", positive=True)
    retry_on_401 = c.get(values.boolean, raw, "forwarding.retry_on_401")
    replay_buffer_bytes = c.get(values.number, raw, "forwarding.replay_buffer_bytes", integer=True)
    max_body_bytes = c.get(values.number, raw, "forwarding.max_body_bytes", integer=True)
    allowed_clients = c.get(values.networks, raw, "forwarding.allowed_clients")
    if c.count() != start:
        return None
    return Route(
        name=name,
        listen=listen,
        upstream=UpstreamSettings(
            url=upstream_url,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            tls_verify=tls_verify,
            ca_file=ca_file,
            max_connections=int(max_connections),
            egress=egress,
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
            style=style,
            scope=scope,
            audience=audience,
            extra_params=extra_params,
        ),
        forwarding=ForwardingSettings(
            retry_on_401=retry_on_401,
            replay_buffer_bytes=int(replay_buffer_bytes),
            max_body_bytes=int(max_body_bytes),
            allowed_paths=allowed_paths,
            allowed_clients=allowed_clients,
            inbound_token=Secret(inbound) if inbound is not None else None,
        ),
    )
