"""The command line: serve, check, demo, mock-upstream. The only place that reads argv,
the environment (handing it to proxy.config) or exits."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import structlog
from proxy import config, logs
from proxy.app import Proxy, make_session, serve, token_source
from proxy.errors import AuthError, ConfigError, CredentialsRejected, SecretUnreadable

if TYPE_CHECKING:
    from proxy.mock import MockNdovu

EXIT_OK, EXIT_CONFIG, EXIT_REJECTED, EXIT_UNREACHABLE = 0, 1, 2, 3

DESCRIPTION = """\
A local reverse proxy for the Ndovu Partner API. Apps send plain HTTP requests to it; it
attaches a cached bearer token, forwards to the partner API, streams the answer back and
retries once when the API answers 401."""

ENV_HELP = """\
environment: NDOVU_CLIENT_ID, NDOVU_CLIENT_SECRET, NDOVU_CLIENT_SECRET_FILE, NDOVU_UPSTREAM_URL,
NDOVU_PROXY_CONFIG, NDOVU_PROXY_LISTEN, NDOVU_PROXY_ADMIN_LISTEN, NDOVU_PROXY_LOG_LEVEL,
NDOVU_PROXY_LOG_FORMAT; HTTPS_PROXY, HTTP_PROXY, NO_PROXY (either case) for an egress proxy
unless upstream.proxy is set. Precedence: flags, environment, config file, defaults; with
routes: in the file, flags and environment set the top-level defaults every route inherits."""


#: dotted key -> the flag that sets it, for `serve` and `config`
FLAG_NAMES = {
    "config": "--config", "listen": "--listen", "admin_listen": "--admin-listen",
    "upstream.url": "--upstream", "logging.level": "--log-level", "logging.format": "--log-format",
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("ndovu-proxy")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ndovu-proxy", description=DESCRIPTION, epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ndovu-proxy {version()}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the proxy", epilog=ENV_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _serve_flags(p)

    p = sub.add_parser(
        "config", help="print the effective configuration and where each value came from (secrets masked)",
        description="One line a setting: KEY = VALUE  # SOURCE, the source being default, file PATH "
        "(via ${VAR} when the value used one), env NAME or flag --NAME. Secrets show as <set>. "
        "Validates as serve does: exit 1 on a config error.", epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _serve_flags(p)
    p.add_argument("--json", action="store_true", help='print {"KEY": {"value": ..., "source": ...}} instead')

    p = sub.add_parser("check", help="validate the config exactly as serve does and fetch one token (never printed)",
                       description="Exit codes: 0 a token was obtained, 1 invalid config, "
                       "2 credentials rejected (401/400), 3 auth endpoint unreachable or answered badly.")
    p.add_argument("--config", metavar="PATH", help="YAML config file (env NDOVU_PROXY_CONFIG)")
    p.add_argument("--upstream", metavar="URL", help="the partner API's base URL (env NDOVU_UPSTREAM_URL)")
    _more_commands(sub)
    return parser


def _serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="PATH", help="YAML config file (env NDOVU_PROXY_CONFIG)")
    p.add_argument("--listen", metavar="HOST:PORT", help="where apps send requests (default 127.0.0.1:8080)")
    p.add_argument("--admin-listen", metavar="HOST:PORT",
                   help="/healthz /readyz /metrics /tokenz (default 127.0.0.1:9901; 'off' turns it off)")
    p.add_argument("--upstream", metavar="URL", help="the partner API's base URL")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   help="default info; debug adds the auth call and upstream connections (env NDOVU_PROXY_LOG_LEVEL)")
    p.add_argument("--log-format", choices=("json", "console", "auto"),
                   help="default auto: console on a terminal, else json (env NDOVU_PROXY_LOG_FORMAT)")


def _more_commands(sub: Any) -> None:
    p = sub.add_parser("demo", help="the proxy in front of an embedded fake Ndovu API; no credentials needed")
    p.add_argument("--listen", metavar="HOST:PORT", help="default 127.0.0.1:8080")
    p.add_argument("--admin-listen", metavar="HOST:PORT", help="off unless given")

    p = sub.add_parser(
        "mock-upstream", help="a fake Ndovu Partner API for your app's tests",
        description="A fake Ndovu Partner API: POST /api/v3/partners/auth with the real semantics, "
        "GET /api/v3/partners/products (a sample catalogue), and every other path under "
        "/api/v3/partners/ echoing the request as JSON. With --style oauth2 the auth path is an "
        "OAuth2 token endpoint instead (RFC 6749 client credentials: a form body with "
        "grant_type=client_credentials, the client authenticated by client_secret_basic or "
        "client_secret_post; errors as RFC 6749 JSON), for a proxy with auth.style "
        "client_secret_basic or client_secret_post. For tests of an app's retry paths: "
        "POST /_mock/expire and POST /_mock/revoke end every token issued so far; "
        "GET /_mock/stats counts auth calls and requests (and shows the last token request's "
        "scope and audience).")
    p.add_argument("--listen", metavar="HOST:PORT", default="127.0.0.1:8081", help="default 127.0.0.1:8081")
    # the defaults are the demo's (proxy.mock); spelled out here so that `serve` never loads
    # the fake API and aiohttp's web framework with it
    p.add_argument("--client-id", help="accepted client id (default demo-client)")
    p.add_argument("--client-secret", help="accepted raw client secret (default demo-secret)")
    p.add_argument("--token-ttl", type=float, default=3600, metavar="S", help="token lifetime in seconds (default 3600)")
    p.add_argument("--style", choices=("ndovu", "oauth2"), default="ndovu",
                   help="the auth endpoint's semantics: ndovu (Basic over the raw id:secret, no body; "
                   "the default) or oauth2 (RFC 6749 client credentials, client_secret_basic or "
                   "client_secret_post)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return cmd_serve(args, os.environ)
        if args.command == "check":
            return cmd_check(args, os.environ)
        if args.command == "config":
            code = cmd_config(args, os.environ)
            sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
            return code
        if args.command == "demo":
            return cmd_demo(args, os.environ)
        return cmd_mock(args)
    except ConfigError as exc:
        # every problem the load found, one line each
        for error in exc.errors if isinstance(exc, config.ConfigErrors) else (exc,):
            print(f"ndovu-proxy: config error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except BrokenPipeError:
        # stdout went away (`ndovu-proxy config | head`): no traceback, and none at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run on uvloop (a dependency on Linux and macOS), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _start_logging(settings: config.Settings) -> logs.Redactor:
    return logs.configure(settings.logging.level, settings.logging.format, buffered=True)


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    """The dotted keys the command line sets; a flag a command does not take counts as not given."""
    return {
        "config": getattr(args, "config", None),
        "listen": getattr(args, "listen", None),
        "admin_listen": getattr(args, "admin_listen", None),
        "upstream.url": getattr(args, "upstream", None),
        "logging.level": getattr(args, "log_level", None),
        "logging.format": getattr(args, "log_format", None),
    }


def load_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> config.Settings:
    """The settings `serve` runs with; `check` and `config` validate through the same
    config.load checks, so a config that they accept is one `serve` starts with."""
    return config.load(_flags(args), environ)


def cmd_config(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    shown = config.effective(_flags(args), environ, FLAG_NAMES)
    if args.json:
        doc = {key: {"value": value, "source": source} for key, (value, source) in shown.items()}
        print(json.dumps(doc, indent=2, default=str))
        return EXIT_OK
    for key, (value, source) in shown.items():
        print(f"{key} = {_show(value)}  # {source}")
    return EXIT_OK


def _show(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)  # true, null, 5, ["/api/v3/partners/"]


def cmd_serve(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    settings = load_settings(args, environ)
    redactor = _start_logging(settings)
    return _serve(Proxy(settings, redactor=redactor))


def _serve(proxy: Proxy) -> int:
    try:
        _run(serve(proxy))
    except OSError as exc:  # the port is taken, or the address is not ours
        print(f"ndovu-proxy: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


def cmd_check(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    settings = load_settings(args, environ)
    # check talks on stdout; only warnings and errors go to the log
    redactor = logs.configure("warning", settings.logging.format, buffered=True)
    print(f"config:   OK ({settings.config_file or 'no file; environment and defaults'})")
    sources = {key: source for key, (_, source) in config.effective(_flags(args), environ).items()}
    return int(_run(_check_all(settings, sources, redactor)))


async def _check_all(settings: config.Settings, sources: Mapping[str, str], redactor: logs.Redactor) -> int:
    """Every route, one after another; the worst code wins (0 < 1 < 2 < 3)."""
    return max([await _check(route, settings, sources, redactor) for route in settings.routes])


def secret_source(auth: config.AuthSettings, config_file: str | None, sources: Mapping[str, str],
                  prefix: str = "") -> str:
    """Where the client secret comes from, in the words of the setting that gave it (never its
    value): `NDOVU_CLIENT_SECRET`, `auth.client_secret in FILE`, `NDOVU_CLIENT_SECRET_FILE: PATH`,
    `auth.client_secret_file: PATH (in FILE)`; with the secret that the file overrides, if any.
    `sources` are config.effective's, by key; `prefix` is a route's (`routes[prod].`), whose own
    keys win over the top-level ones."""

    def given(key: str) -> str | None:
        if prefix and prefix + key in sources:
            return f"{prefix}{key} in {config_file}"
        source = sources.get(key, "default")
        if source.startswith("env "):
            return source.removeprefix("env ")
        if source.startswith("file "):
            return f"{key} in {config_file}"
        return None

    secret = given("auth.client_secret")
    path = auth.client_secret_file
    if path is None:
        return secret or "auth.client_secret"
    where = given("auth.client_secret_file") or "auth.client_secret_file"
    if where.startswith("NDOVU_"):
        where = f"{where}: {path}"
    else:
        key = where.split(" in ")[0]
        where = f"{key}: {path} (in {config_file})"
    if secret is not None:
        where += f"; {secret} is set too: the file wins"
    return where


async def _check(route: config.Route, settings: config.Settings, sources: Mapping[str, str],
                 redactor: logs.Redactor) -> int:
    auth = route.auth
    if settings.named_routes:
        print(f"route:    {route.name} (listen {route.listen})")
    style = "" if auth.style == "ndovu" else f" ({auth.style})"
    print(f"auth:     POST {auth.token_url} as client {auth.client_id!r}{style}")
    prefix = f"routes[{route.name}]." if settings.named_routes else ""
    print(f"secret:   {secret_source(auth, settings.config_file, sources, prefix)} (the secret itself is never shown)")
    via = route.upstream.egress.proxy_for(auth.token_url)
    if via is not None:
        print(f"proxy:    via {via}")
    async with make_session(route.upstream) as session:
        source = token_source(route, session, redactor)
        try:
            grant = await asyncio.wait_for(source.fetch(), auth.timeout)
        except TimeoutError:
            print(f"token:    FAILED: no answer within auth.timeout ({auth.timeout:g}s)")
            return EXIT_UNREACHABLE
        except SecretUnreadable as exc:  # the file went away after the config was read
            print(f"token:    FAILED: {exc.detail}")
            return EXIT_CONFIG
        except CredentialsRejected as exc:
            print(f"token:    FAILED: {exc.detail}\nhint:     {exc.hint}")
            return EXIT_REJECTED
        except AuthError as exc:
            print(f"token:    FAILED: {exc.detail} ({exc.kind})")
            return EXIT_UNREACHABLE
    redactor.add(grant.value)
    print(f"token:    OK, lifetime {grant.lifetime:.0f} s (the token itself is never shown)")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from proxy import mock
    keep = {"NDOVU_PROXY_LISTEN", "NDOVU_PROXY_LOG_LEVEL", "NDOVU_PROXY_LOG_FORMAT"}
    env = {k: v for k, v in environ.items() if k in keep}
    fake = mock.MockNdovu()
    flags = {
        "listen": args.listen,
        "admin_listen": args.admin_listen or environ.get("NDOVU_PROXY_ADMIN_LISTEN") or "off",
        "auth.client_id": fake.client_id,
        "auth.client_secret": fake.client_secret,
        "upstream.url": "http://127.0.0.1:1",  # replaced below, once the fake listens
    }
    settings = config.load(flags, env)
    redactor = _start_logging(settings)
    return int(_run(_demo(fake, flags, env, redactor)))


async def _demo(fake: MockNdovu, flags: dict[str, Any], env: Mapping[str, str],
                redactor: logs.Redactor) -> int:
    runner, address = await fake.listen(config.Address("127.0.0.1", 0))  # a free loopback port
    upstream = f"http://{address}"
    settings = config.load({**flags, "upstream.url": upstream}, env)
    proxy = Proxy(settings, redactor=redactor)

    def started(p: Proxy) -> None:
        base = f"http://{p.address}"
        admin = f"\n  curl -s http://{p.admin_address}/tokenz" if p.admin_address else ""
        print(
            f"ndovu-proxy demo: the proxy on {base}, in front of a fake Ndovu API on {upstream}\n"
            f"Try:\n  curl -s {base}/api/v3/partners/products\n"
            f"  curl -s -X POST -d 'hello' '{base}/api/v3/partners/echo?x=1'{admin}\n"
            "Ctrl-C stops it. Real credentials: see README.md (check, then serve).",
            flush=True,
        )

    try:
        await serve(proxy, started=started)
    except OSError as exc:
        print(f"ndovu-proxy: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        await runner.cleanup()
    return EXIT_OK


def cmd_mock(args: argparse.Namespace) -> int:
    from proxy import mock
    try:
        where = config.parse_address(args.listen)
    except ValueError:
        raise ConfigError("--listen", f"expected HOST:PORT, got {args.listen!r}") from None
    if args.token_ttl <= 0:
        raise ConfigError("--token-ttl", "must be greater than 0")
    logs.configure("info", "auto")
    fake = mock.MockNdovu(args.client_id, args.client_secret, args.token_ttl, style=args.style)
    return int(_run(_mock(fake, where)))


async def _mock(fake: MockNdovu, where: config.Address) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        runner, address = await fake.listen(where)
    except OSError as exc:
        print(f"ndovu-proxy: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        structlog.get_logger("proxy.mock").info("mock_listening", address=str(address), style=fake.style)
        print(f"fake Ndovu Partner API on http://{address}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
    return EXIT_OK
