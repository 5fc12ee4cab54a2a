"""The proxy behind a real corporate egress proxy: Debian's squid, started here on a free
loopback port with its own config, logs and hosts file, no disk cache.

The partner API is the fake, served over TLS (a trustme certificate for api.ndovu.test, the
proxy given its CA as `upstream.ca_file`) and over plain HTTP. Only squid knows where
api.ndovu.test is (its `hosts_file`; `dns_nameservers 127.0.0.1`, so no DNS query leaves the
machine): the token call and the forwarded requests can only reach the API through squid, and
a name the proxy tried to resolve itself would fail. A guard refuses every lookup but localhost
and IP literals through the machine's resolver (asyncio's loop; uvloop resolves in libuv).

The NO_PROXY case, where the proxy does resolve the name, runs in a network and mount
namespace of its own (`unshare -rnm`: only loopback, its own /etc/hosts).
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import pytest
import trustme
from aiohttp import web

from proxy.app import Proxy
from proxy.mock import API
from tests.conftest import StartProxy, url
from tests.fakes import CLIENT_ID, CLIENT_SECRET, FakeNdovu, eventually
from tests.procs import MakeCommand

NAME = "api.ndovu.test"
PROXY_USER = "alice"
PROXY_PASSWORD = "pr0xy@pa55:word"  # an @ and a : that must travel %-encoded in the URL
NCSA = "/usr/lib/squid/basic_ncsa_auth"
#: squid's start-up, and anything through it, is expected within this
WAIT = 20.0



def find_squid() -> str | None:
    return shutil.which("squid") or next(
        (p for p in ("/usr/sbin/squid", "/usr/local/sbin/squid") if os.access(p, os.X_OK)), None)


def free_port() -> int:
    """A loopback port nothing listens on (for squid to take, or to stay dead)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def password_spellings(password: str = PROXY_PASSWORD) -> list[str]:
    """Every form the proxy password could leak in."""
    basic = base64.b64encode(f"{PROXY_USER}:{password}".encode()).decode()
    return [password, quote(password, safe=""), basic]


def events(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.startswith("{")]


def named(buffer: io.StringIO, name: str) -> list[dict[str, Any]]:
    return [e for e in events(buffer) if e.get("event") == name]


# --- squid ----------------------------------------------------------------------------------


class Squid:
    """One squid in the foreground (-N), its files in a fresh directory; stopped by its PID.

    As root, squid switches to its effective user (`proxy` on Debian) after reading its
    config, so the directory is that user's, and what it reads is world-readable."""

    def __init__(self, binary: str, *, auth: bool) -> None:
        self.binary = binary
        self.auth = auth
        self.dir = Path(tempfile.mkdtemp(prefix="ndovu-squid-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._terminated = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url_with(self, user: str, password: str) -> str:
        return f"http://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{self.port}"

    def _config(self, user: str | None) -> str:
        d = self.dir
        lines = [
            f"http_port 127.0.0.1:{self.port}",
            f"pid_filename {d}/squid.pid",
            f"cache_log {d}/cache.log",
            f"access_log stdio:{d}/access.log",
            "cache_store_log none",
            "strip_query_terms off",  # the access log shows whole URLs
            "logfile_rotate 0",
            f"coredump_dir {d}",
            "cache deny all",  # no disk cache (no cache_dir), nothing kept in memory either
            "cache_mem 0 MB",
            # names from this file only; anything else would be asked of 127.0.0.1, where no
            # DNS server listens: no query leaves the machine
            f"hosts_file {d}/hosts",
            "dns_nameservers 127.0.0.1",
            "netdb_filename none",
            "pinger_enable off",
            "icp_port 0",
            "htcp_port 0",
            "shutdown_lifetime 0 seconds",
            "acl local src 127.0.0.0/8",
        ]
        if user is not None:
            lines.append(f"cache_effective_user {user}")
        if self.auth:
            lines += [
                f"auth_param basic program {NCSA} {d}/htpasswd",
                "auth_param basic realm ndovu-test",
                "acl authenticated proxy_auth REQUIRED",
                "http_access allow local authenticated",
            ]
        else:
            lines.append("http_access allow local")
        lines.append("http_access deny all")  # CONNECT to any port: no SSL_ports rule here
        return "\n".join(lines) + "\n"

    def _htpasswd(self) -> str:
        hashed = subprocess.run(["openssl", "passwd", "-apr1", "-stdin"], input=PROXY_PASSWORD,
                                capture_output=True, text=True, check=True, timeout=30).stdout.strip()
        return f"{PROXY_USER}:{hashed}\n"

    def start(self) -> Squid:
        user = None
        if os.geteuid() == 0:
            user = next((u for u in ("proxy", "squid") if _has_user(u)), None)
            if user is None:
                pytest.skip("squid runs as root here, and neither a `proxy` nor a `squid` user exists for it")
            entry = pwd.getpwnam(user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self.dir.chmod(0o755)
        (self.dir / "hosts").write_text(f"127.0.0.1 {NAME}\n")
        if self.auth:
            (self.dir / "htpasswd").write_text(self._htpasswd())
        (self.dir / "squid.conf").write_text(self._config(user))
        for name in ("hosts", "htpasswd", "squid.conf"):
            if (self.dir / name).exists():
                (self.dir / name).chmod(0o644)
        with open(self.dir / "squid.out", "wb") as out:
            self.proc = subprocess.Popen([self.binary, "-N", "-f", str(self.dir / "squid.conf")], cwd=self.dir,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        # ready once it says so (a probe connection would be one more line in its access log)
        deadline = time.monotonic() + WAIT
        while not self._said("Accepting HTTP Socket connections"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"squid did not start:\n{self.output()}")
            time.sleep(0.02)  # paces the polling of its log
        return self

    def _said(self, words: str) -> bool:
        try:
            return words in (self.dir / "cache.log").read_text(errors="replace")
        except FileNotFoundError:
            return False

    def output(self) -> str:
        text = []
        for name in ("squid.out", "cache.log"):
            try:
                text.append((self.dir / name).read_text(errors="replace")[-3000:])
            except FileNotFoundError:
                pass
        return "\n".join(text)

    def access(self) -> list[list[str]]:
        """squid's access log, each line split: [time, elapsed, client, code/status, bytes,
        method, URL, user, hierarchy/peer, type]. A line is written when its transaction
        ends: for CONNECT, when the tunnel closes."""
        try:
            text = (self.dir / "access.log").read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [line.split() for line in text.splitlines() if line.strip()]

    def lines(self, method: str, origin: str) -> list[list[str]]:
        """The access log's lines of `method` to `origin` (host:port): a CONNECT's target, or
        an absolute-form request's authority."""
        return [f for f in self.access() if len(f) > 7 and f[5] == method
                and (f[6] if method == "CONNECT" else urlsplit(f[6]).netloc) == origin]

    def terminate(self) -> None:
        """SIGTERM, once: only this squid, by its own PID."""
        if self.proc is not None and self.proc.poll() is None and not self._terminated:
            self._terminated = True
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM, then up to 10 s for it to exit (SIGKILL after that); its files go."""
        self.terminate()
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture(scope="module")
def squid() -> Iterator[Callable[..., Squid]]:
    """squid(auth=False) -> a running squid, one of each kind for the module (a squid takes 2 s
    to stop), stopped at its end. Tests tell their lines in its access log apart by the fake
    API's ports, new for each test. Skips when squid (or, for auth, its NCSA helper or
    openssl) is not installed."""
    binary = find_squid()
    running: dict[bool, Squid] = {}

    def get(*, auth: bool = False) -> Squid:
        if binary is None:
            pytest.skip("squid is not installed (Debian: apt-get install squid)")
        if auth and not os.access(NCSA, os.X_OK):
            pytest.skip(f"squid's basic auth helper {NCSA} is not installed (Debian's squid package has it)")
        if auth and shutil.which("openssl") is None:
            pytest.skip("openssl is not installed (it makes the htpasswd file)")
        if auth not in running:
            running[auth] = Squid(binary, auth=auth)
            running[auth].start()
        return running[auth]

    yield get
    for proxy in running.values():
        proxy.terminate()  # both at once: each takes 2 s
    for proxy in running.values():
        proxy.stop()


# --- no name lookups here ------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_name_lookups(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every lookup through the machine's resolver but localhost and IP literals is refused
    (and recorded): api.ndovu.test is squid's to resolve, never this process's."""
    refused: list[str] = []
    real = socket.getaddrinfo

    def guarded(host: Any, *args: Any, **kwargs: Any) -> Any:
        text = host.decode() if isinstance(host, bytes) else str(host) if host is not None else ""
        try:
            ipaddress.ip_address(text.split("%")[0])
        except ValueError:
            if text not in ("", "localhost"):
                refused.append(text)
                raise socket.gaierror(socket.EAI_NONAME, "no name lookups in this test") from None
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)
    yield refused
    assert not refused, f"looked up through the machine's resolver: {refused}"


# --- the partner API, over TLS and plain HTTP -----------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
async def fake(ca: trustme.CA) -> AsyncIterator[FakeNdovu]:
    """The fake API (conftest's `fake`, which start_proxy uses, replaced): one app on two
    loopback sockets, `url` https://api.ndovu.test:PORT and `plain_url` http://api.ndovu.test:PORT,
    and `loopback_url` the plain one by address."""
    fake = FakeNdovu()
    runner = web.AppRunner(fake.app())
    await runner.setup()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(NAME).configure_cert(context)
    tls_sock, plain_sock = socket.socket(), socket.socket()
    for sock in (tls_sock, plain_sock):
        sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, tls_sock, ssl_context=context).start()
    await web.SockSite(runner, plain_sock).start()
    fake.url = f"https://{NAME}:{tls_sock.getsockname()[1]}"  # type: ignore[attr-defined]
    fake.plain_url = f"http://{NAME}:{plain_sock.getsockname()[1]}"  # type: ignore[attr-defined]
    fake.loopback_url = f"http://127.0.0.1:{plain_sock.getsockname()[1]}"  # type: ignore[attr-defined]
    yield fake
    await runner.cleanup()


def authority(u: str) -> str:
    return u.split("://", 1)[1]


async def get_json(http: aiohttp.ClientSession, proxy: Proxy, path: str) -> tuple[int, Any]:
    async with http.get(url(proxy, path), timeout=aiohttp.ClientTimeout(total=WAIT)) as resp:
        return resp.status, await resp.json()


def assert_no_password(buffer: io.StringIO, password: str = PROXY_PASSWORD) -> None:
    text = buffer.getvalue()
    for spelling in password_spellings(password):
        assert spelling not in text


# --- (a) https through a CONNECT tunnel -------------------------------------------------------


async def test_https_upstream_through_squid_one_tunnel_for_many_requests(
    start_proxy: StartProxy, fake: FakeNdovu, squid: Callable[..., Squid], http: aiohttp.ClientSession,
    ca_file: str, log_buffer: io.StringIO,
) -> None:
    corp = squid()
    proxy = await start_proxy({"upstream.proxy": corp.url, "upstream.ca_file": ca_file})  # the token came via squid
    for i in range(5):
        status, body = await get_json(http, proxy, f"{API}/echo?i={i}")
        assert status == 200, body
        assert body["query"] == f"i={i}"
    assert fake.auth_calls == 1 and len(fake.api_log) == 5
    opened = named(log_buffer, "upstream_connection_opened")
    assert [(e["peer"], e["via"]) for e in opened] == [(f"127.0.0.1:{corp.port}", corp.url)]  # one tunnel, kept
    await proxy.stop()  # the tunnels close: squid logs each CONNECT as it ends
    target = authority(fake.url)  # type: ignore[attr-defined]
    assert await eventually(lambda: len(corp.lines("CONNECT", target)) == 2, timeout=WAIT), corp.access()
    # one for the token call, one for the pool's five requests; squid opened both (HIER_DIRECT)
    assert all(f[3] == "TCP_TUNNEL/200" and f[8].startswith("HIER_DIRECT/127.0.0.1") for f in corp.lines("CONNECT", target))


# --- (b) plain http in absolute form -----------------------------------------------------------


async def test_plain_http_upstream_through_squid_in_absolute_form(
    start_proxy: StartProxy, fake: FakeNdovu, squid: Callable[..., Squid], http: aiohttp.ClientSession,
    log_buffer: io.StringIO,
) -> None:
    corp = squid()
    plain = fake.plain_url  # type: ignore[attr-defined]
    proxy = await start_proxy({"upstream.url": plain, "upstream.proxy": corp.url})
    for i in range(3):
        status, body = await get_json(http, proxy, f"{API}/echo?i={i}")
        assert status == 200, body
        assert "squid" in body["headers"].get("Via", "")  # it came through squid, which added this
    assert len(named(log_buffer, "upstream_connection_opened")) == 1  # keep-alive to squid
    origin = authority(plain)
    assert await eventually(lambda: len(corp.lines("GET", origin)) == 3, timeout=WAIT), corp.access()
    assert [f[6] for f in corp.lines("GET", origin)] == [f"{plain}{API}/echo?i={i}" for i in range(3)]
    assert [(f[6], f[3]) for f in corp.lines("POST", origin)] == [(f"{plain}{API}/auth", "TCP_MISS/200")]


# --- (c) proxy credentials --------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["https", "http"])
async def test_the_right_proxy_credentials_work_and_are_never_logged(
    scheme: str, start_proxy: StartProxy, fake: FakeNdovu, squid: Callable[..., Squid], http: aiohttp.ClientSession,
    ca_file: str, log_buffer: io.StringIO,
) -> None:
    corp = squid(auth=True)
    upstream = fake.url if scheme == "https" else fake.plain_url  # type: ignore[attr-defined]
    proxy = await start_proxy({"upstream.url": upstream, "upstream.ca_file": ca_file,
                               "upstream.proxy": corp.url_with(PROXY_USER, PROXY_PASSWORD)})
    status, body = await get_json(http, proxy, f"{API}/echo")
    assert status == 200, body
    assert not {"proxy-authorization", "proxy-authenticate"} & {k.lower() for k in body["headers"]}
    await proxy.stop()
    method = "CONNECT" if scheme == "https" else "GET"
    assert await eventually(lambda: any(f[7] == PROXY_USER for f in corp.lines(method, authority(upstream))),
                            timeout=WAIT), corp.access()
    assert_no_password(log_buffer)


@pytest.mark.parametrize("scheme", ["https", "http"])
async def test_wrong_proxy_credentials_leave_the_proxy_without_a_token_saying_why(
    scheme: str, start_proxy: StartProxy, fake: FakeNdovu, squid: Callable[..., Squid], http: aiohttp.ClientSession,
    ca_file: str, log_buffer: io.StringIO,
) -> None:
    corp = squid(auth=True)
    upstream = fake.url if scheme == "https" else fake.plain_url  # type: ignore[attr-defined]
    wrong = "not-" + PROXY_PASSWORD
    proxy = await start_proxy({"upstream.url": upstream, "upstream.ca_file": ca_file,
                               "upstream.proxy": corp.url_with(PROXY_USER, wrong)}, wait_token=False)
    assert await eventually(lambda: bool(named(log_buffer, "token_refresh_failed")), timeout=WAIT)
    failed = named(log_buffer, "token_refresh_failed")[0]
    assert failed["reason"] == "auth_unreachable", failed
    words = json.dumps(failed)
    assert f"127.0.0.1:{corp.port}" in words and "407" in words, failed
    async with http.get(url(proxy, f"{API}/echo")) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"] == "token_unavailable"
    assert fake.auth_calls == 0  # squid stopped it
    assert_no_password(log_buffer, wrong)
    assert_no_password(log_buffer)


@pytest.mark.parametrize("scheme", ["https", "http"])
async def test_wrong_proxy_credentials_for_forwarded_requests_are_a_502_saying_why(
    scheme: str, start_proxy: StartProxy, fake: FakeNdovu, squid: Callable[..., Squid], http: aiohttp.ClientSession,
    ca_file: str, log_buffer: io.StringIO,
) -> None:
    """The token comes directly (its URL is on loopback, never proxied); the requests need squid."""
    corp = squid(auth=True)
    upstream = fake.url if scheme == "https" else fake.plain_url  # type: ignore[attr-defined]
    wrong = "not-" + PROXY_PASSWORD
    proxy = await start_proxy({
        "upstream.url": upstream, "upstream.ca_file": ca_file,
        "upstream.proxy": corp.url_with(PROXY_USER, wrong),
        "auth.token_path": f"{fake.loopback_url}{API}/auth",  # type: ignore[attr-defined]
    })
    async with http.get(url(proxy, f"{API}/echo")) as resp:
        assert resp.status == 502
        assert (await resp.json())["error"] == "upstream_unreachable"
    failed = named(log_buffer, "upstream_failed")
    refused = "tunnel" if scheme == "https" else "request"
    assert [e["reason"] for e in failed] == [
        (f"the egress proxy 127.0.0.1:{corp.port} refused the {refused} to {authority(upstream)}: "
         "407 Proxy Authentication Required")]
    assert fake.api_log == []
    assert_no_password(log_buffer, wrong)


# --- loopback is never proxied -----------------------------------------------------------------


def proxy_variables(where: str, no_proxy: str = "") -> dict[str, str]:
    """Both spellings of each, so the machine's own settings cannot win."""
    env = {}
    for name, value in (("https_proxy", where), ("http_proxy", where), ("no_proxy", no_proxy)):
        env[name] = env[name.upper()] = value
    return env


async def test_a_loopback_upstream_is_never_sent_to_the_proxy_variables(
    command: MakeCommand, fake: FakeNdovu,
) -> None:
    loopback = fake.loopback_url  # type: ignore[attr-defined]
    dead = f"http://127.0.0.1:{free_port()}"
    env = {**proxy_variables(dead), "NDOVU_CLIENT_ID": CLIENT_ID, "NDOVU_CLIENT_SECRET": CLIENT_SECRET,
           "NDOVU_UPSTREAM_URL": loopback, "NDOVU_PROXY_LISTEN": "127.0.0.1:0", "NDOVU_PROXY_ADMIN_LISTEN": "off",
           "NDOVU_PROXY_LOG_FORMAT": "json"}
    check = command("check", env=env)
    assert await check.run() == 0, check.output()
    serve = await command("serve", env=env).start()
    address, _ = await serve.listening()
    await serve.event("token_acquired")
    async with aiohttp.ClientSession() as http, http.get(f"http://{address}{API}/echo") as resp:
        assert resp.status == 200
    assert len(fake.api_log) == 1


# --- (d) NO_PROXY, in a namespace of its own -----------------------------------------------------


def _namespace() -> str | None:
    """Why a private network and mount namespace cannot be had here, or None."""
    for tool in ("unshare", "ip", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is missing"
    with tempfile.NamedTemporaryFile("w", suffix=".hosts") as hosts:
        hosts.write("127.0.0.1 localhost\n")
        hosts.flush()
        probe = subprocess.run(["unshare", "-rnm", "sh", "-c", f'ip link set lo up && mount --bind "{hosts.name}" /etc/hosts'],
                               capture_output=True, text=True, timeout=30, check=False)
    return None if probe.returncode == 0 else f"unshare -rnm is not allowed here: {probe.stderr.strip()[-200:]}"


DRIVER = textwrap.dedent("""
    import json, os, socket, subprocess, sys, time
    port = int(sys.argv[1])
    dead = int(sys.argv[2])
    py = sys.executable
    base = {k: v for k, v in os.environ.items() if not k.startswith("NDOVU_") and k.lower() not in
            ("https_proxy", "http_proxy", "no_proxy")}
    mock = subprocess.Popen([py, "-m", "proxy", "mock-upstream", "--listen", f"127.0.0.1:{port}"], env=base,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:  # until it listens (a private namespace: nothing else could)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or mock.poll() is not None:
                    sys.exit("mock-upstream did not start")
                time.sleep(0.05)
        results = {}
        for case, no_proxy in (("bypassed", "localhost,api.ndovu.test"), ("proxied", "")):
            env = dict(base, NDOVU_UPSTREAM_URL=f"http://api.ndovu.test:{port}", NDOVU_CLIENT_ID="demo-client",
                       NDOVU_CLIENT_SECRET="demo-secret")
            for name, value in (("https_proxy", f"http://127.0.0.1:{dead}"), ("http_proxy", f"http://127.0.0.1:{dead}"),
                                ("no_proxy", no_proxy)):
                env[name] = env[name.upper()] = value
            done = subprocess.run([py, "-m", "proxy", "check"], env=env, capture_output=True, text=True, timeout=30)
            results[case] = {"code": done.returncode, "output": done.stdout + done.stderr}
        print(json.dumps(results))
    finally:
        mock.terminate()
        mock.wait(10)
""")


def test_no_proxy_sends_the_name_direct_and_without_it_the_dead_proxy_is_tried(tmp_path: Path) -> None:
    """Inside: only loopback, an /etc/hosts that maps api.ndovu.test to 127.0.0.1, the fake
    API on it, and both proxy variables pointing to a port where nothing listens."""
    why = _namespace()
    if why is not None:
        pytest.skip(why)
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {NAME}\n")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    script = 'ip link set lo up && mount --bind "$1" /etc/hosts && cd "$2" && exec "$3" "$4" 18081 18099'
    done = subprocess.run(
        ["unshare", "-rnm", "sh", "-c", script, "sh", str(hosts), str(Path(__file__).resolve().parent.parent),
         sys.executable, str(driver)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    bypassed, proxied = results["bypassed"], results["proxied"]
    assert bypassed["code"] == 0, bypassed["output"]
    assert "127.0.0.1:18099" not in bypassed["output"]
    assert proxied["code"] == 3, proxied["output"]
    assert "egress proxy" in proxied["output"] and "127.0.0.1:18099" in proxied["output"], proxied["output"]
    assert "demo-secret" not in bypassed["output"] + proxied["output"]
