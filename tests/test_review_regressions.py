"""Regressions from an outside review of routes, egress proxies, OAuth2 styles and the secret
watcher: each of these failed before its fix (a route's own secret lost to an inherited file,
routes with different form fields sharing one token, a FIFO as the secret file freezing the
process, proxy passwords shown without a scheme, the image's environment refusing routes:).
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from proxy import config
from proxy.app import secret_reader
from proxy.egress import ProxyURL
from proxy.errors import ConfigError, SecretFileError
from proxy.logs import Redactor
from proxy.wire.errors import ConnectFailed
from proxy.wire.pool import Pool

BASE = """
upstream: {url: "http://127.0.0.1:18001"}
auth: {client_id: demo-client, client_secret: demo-secret}
"""


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> config.Settings:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return config.load({"config": str(path)}, environ or {})


# --- routes ---------------------------------------------------------------------------------

def test_a_route_name_from_a_variable_is_the_routes_name(tmp_path: Path) -> None:
    s = load(tmp_path, BASE + """
routes:
  - {name: "${RNAME}", listen: "127.0.0.1:0"}
""", {"RNAME": "prod"})
    assert [r.name for r in s.routes] == ["prod"]  # before the fix: "0" (the index), in metrics, /tokenz, logs


def test_a_routes_own_secret_is_not_overridden_by_an_inherited_secret_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "prod.secret"
    secret_file.write_text("PROD-SECRET\n")
    text = f"""
upstream: {{url: "http://127.0.0.1:18001"}}
auth: {{client_id: prod-client, client_secret_file: {secret_file}}}
routes:
  - {{name: prod, listen: "127.0.0.1:0"}}
  - name: dev
    listen: "127.0.0.1:0"
    upstream: {{url: "http://127.0.0.1:18002"}}
    auth: {{client_id: dev-client, client_secret: dev-secret}}
"""
    try:
        s = load(tmp_path, text)
    except ConfigError:
        return  # refusing the ambiguity is a fix too
    dev = s.routes[1].auth
    # before the fix: the prod file wins, and prod's secret goes to dev's token URL
    assert dev.client_secret_file is None
    assert dev.client_secret is not None and dev.client_secret.reveal() == "dev-secret"


def test_the_secret_file_variable_does_not_override_a_routes_own_secret(tmp_path: Path) -> None:
    secret_file = tmp_path / "prod.secret"
    secret_file.write_text("PROD-SECRET\n")
    text = """
upstream: {url: "http://127.0.0.1:18001"}
auth: {client_id: prod-client}
routes:
  - name: dev
    listen: "127.0.0.1:0"
    upstream: {url: "http://127.0.0.1:18002"}
    auth: {client_id: dev-client, client_secret: dev-secret}
"""
    try:
        s = load(tmp_path, text, {"NDOVU_CLIENT_SECRET_FILE": str(secret_file)})
    except ConfigError:
        return
    assert s.routes[0].auth.client_secret_file is None


def test_routes_with_different_extra_params_or_secrets_do_not_share_a_token(tmp_path: Path) -> None:
    s = load(tmp_path, """
upstream: {url: "http://127.0.0.1:18001"}
auth: {client_id: c, client_secret: s, style: client_secret_basic, token_path: "http://127.0.0.1:18009/token"}
routes:
  - {name: a, listen: "127.0.0.1:0", auth: {extra_params: {resource: "https://api-a.example"}}}
  - {name: b, listen: "127.0.0.1:0", auth: {extra_params: {resource: "https://api-b.example"}}}
  - {name: c, listen: "127.0.0.1:0", auth: {client_secret: other, extra_params: {resource: "https://api-a.example"}}}
""")
    keys = [r.auth.cache_key for r in s.routes]
    # before the fix: one key for all three: b's upstream gets a token minted for resource A, and c's
    # secret is never used (while `check` fetches with it and reports c on its own)
    assert keys[0] != keys[1]
    assert keys[0] != keys[2]


def test_an_error_caused_by_a_routes_setting_names_the_route(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigErrors) as err:
        load(tmp_path, """
upstream: {url: "http://127.0.0.1:18001"}
auth: {client_id: "a:b", client_secret: s, style: client_secret_basic}
routes:
  - {name: r1, listen: "127.0.0.1:0"}
  - {name: r2, listen: "127.0.0.1:0", auth: {style: ndovu}}
""")
    # before the fix: `auth.client_id: must not contain ':' with auth.style ndovu`, naming no route,
    # while the top-level style is client_secret_basic
    assert any("r2" in str(e) for e in err.value.errors), str(err.value)


# --- config output --------------------------------------------------------------------------

@pytest.mark.parametrize("password", ["p@ss", "pa ss"])
def test_config_never_shows_a_proxy_password(tmp_path: Path, password: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(BASE + "routes:\n"
                    f'  - {{name: a, listen: "127.0.0.1:0", upstream: {{proxy: "http://u:{password}@10.0.0.1:3128"}}}}\n')
    env = {"HTTPS_PROXY": f"http://bob:{password}@10.0.0.2:3128"}
    shown = config.effective({"config": str(path)}, env)
    text = repr(shown)
    # both URLs load (the proxy authenticates with the password); neither may show any of it
    assert f":{password}@" not in text, text
    assert f"{password[-2:]}@10.0.0" not in text, text


# --- the secret file -----------------------------------------------------------------------

def _read_with_deadline(fn, path: str, seconds: float = 3.0) -> BaseException | str:
    """fn(path) in a thread; if it is still blocked after `seconds` (a FIFO with no writer),
    unblock it by opening the write end, and report the hang."""
    out: list[BaseException | str] = []

    def run() -> None:
        try:
            out.append(fn(path))
        except BaseException as exc:  # noqa: BLE001
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(5)
        raise AssertionError(f"{fn.__name__}({path!r}) blocked on a FIFO for {seconds} s")
    return out[0]


def test_a_token_request_never_blocks_on_a_secret_file_that_became_a_fifo(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("demo-secret\n")
    auth = config.AuthSettings(token_url="http://127.0.0.1:1/auth", client_id="c", client_secret=None,
                               client_secret_file=str(path), refresh_margin=60, timeout=1,
                               backoff_initial=1, backoff_max=2)
    read = secret_reader(auth, Redactor())
    assert read() == "demo-secret"
    path.unlink()
    os.mkfifo(path)  # what the watcher calls "not a regular file"
    # before the fix: open() blocks the event loop (and SIGTERM) until someone writes to the FIFO
    result = _read_with_deadline(lambda p: read(), str(path))
    assert isinstance(result, SecretFileError)


def test_a_fifo_as_the_secret_file_is_a_config_error_not_a_hang(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    os.mkfifo(path)
    result = _read_with_deadline(config.read_secret_file, str(path))
    assert isinstance(result, SecretFileError)


# --- egress ---------------------------------------------------------------------------------

async def test_a_proxy_that_closes_after_200_gives_a_reason() -> None:
    async def main() -> str:
        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await r.readuntil(b"\r\n\r\n")
            w.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await w.drain()
            w.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = Pool("https://api.ndovu.test", tls=True, limit=1, connect_timeout=3, read_timeout=3,
                    via=ProxyURL("127.0.0.1", port))
        try:
            await pool.send("GET", "/x", [], None)
        except ConnectFailed as exc:
            return str(exc)
        finally:
            server.close()
        raise AssertionError("no error")

    words = await main()
    # before the fix: "cannot connect to api.ndovu.test through the egress proxy 127.0.0.1:N: "
    assert not words.rstrip().endswith(":"), words


def test_config_never_shows_the_password_of_a_proxy_given_without_a_scheme(tmp_path: Path) -> None:
    # parse_proxy reads `user:pass@host:port` as http://user:pass@host:port and authenticates
    # with it; the masking regex wants a scheme, so before the fix it was printed whole
    path = tmp_path / "c.yaml"
    path.write_text(BASE.replace('url: "http://127.0.0.1:18001"',
                                 'url: "http://127.0.0.1:18001", proxy: "alice:hunter2@10.0.0.1:3128"'))
    shown = config.effective({"config": str(path)}, {"HTTPS_PROXY": "bob:s3cret@10.0.0.2:3128"})
    text = repr(shown)
    assert "hunter2" not in text and "s3cret" not in text, text


def test_a_yaml_error_never_shows_a_proxy_password(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("upstream:\n  proxy: alice:hunter2@10.0.0.1:3128: x\n")
    with pytest.raises(ConfigError) as err:
        config.load({"config": str(path)}, {})
    assert "hunter2" not in str(err.value), str(err.value)


def test_the_container_images_environment_admits_a_routes_config(tmp_path: Path) -> None:
    """The image sets NDOVU_PROXY_LISTEN (to the default), which makes every `routes:` config
    a config error inside it."""
    import re
    import shlex

    dockerfile = (Path(__file__).resolve().parent.parent / "Dockerfile").read_text()
    environ: dict[str, str] = {}
    for block in re.findall(r"^ENV\s+((?:.*\\\n)*.*)$", dockerfile, re.MULTILINE):
        for word in shlex.split(block.replace("\\\n", " ")):
            if "=" in word:
                name, _, value = word.partition("=")
                environ[name] = value
    load(tmp_path, BASE + 'routes:\n  - {name: a, listen: "127.0.0.1:0"}\n', environ)
