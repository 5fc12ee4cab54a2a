"""The cost of the sidecar, side by side: direct, nginx as a proxy, a naive aiohttp proxy, ndovu-proxy,
in front of a plain-HTTP upstream and an HTTPS one.

    python bench/run.py [--seconds 5] [--upstream plain tls] [--json bench/results/latest.json]
    python bench/run.py --quick      # ~30 s: ndovu-proxy and naive-aiohttp, plain HTTP, the ratios

Needs Debian's nginx (with the echo module: nginx-light and libnginx-mod-http-echo), wrk,
openssl and taskset. On loopback only, bounded in time (each wrk run lasts --seconds):

- upstream: nginx, one worker, on CPU 0, on two ports: plain HTTP, and HTTPS with a certificate
  from a CA the bench makes (ECDSA P-256; the contenders verify it). The auth call answers a
  fixed token; the API paths check the bearer token (401 otherwise, so a contender that forgot
  it cannot look fast) and serve a ~300-byte JSON, a 4 KiB POST echo and a 10 MiB file;
- contenders, one at a time, alone on CPU 1: `direct` (wrk straight to the upstream with the
  header set: the limit), `nginx-proxy` (nginx, one worker, static bearer header, keep-alive
  upstream pool, TLS sessions reused: the C peer), `naive-aiohttp` (bench/naive_proxy.py: the
  Python baseline), `ndovu-proxy` with its default configuration (access log on; the upstream's
  CA as `upstream.ca_file`);
- load: wrk, one thread, on CPU 0.

Prints a table per upstream kind (each figure, and ndovu-proxy's ratio to direct, nginx-proxy
and naive-aiohttp), then the figures against the project's targets; flags runs with non-2xx
answers as INVALID; counts the upstream connections ndovu-proxy opened (each one TLS handshake
over HTTPS) from its own metric; writes the same as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench." + "a1b2c3d4" * 8 + ".sig"
SMALL = json.dumps({"id": "prd_001", "name": "Maize flour 2 kg", "description": "x" * 170,
                    "price": {"amount": 21500, "currency": "KES"}, "in_stock": True}, separators=(",", ":"))
ECHO_MODULE = "/usr/lib/nginx/modules/ngx_http_echo_module.so"
LOAD_CPU, PROXY_CPU = "0", "1"
CONTENDERS = ("direct", "nginx-proxy", "naive-aiohttp", "ndovu-proxy")
KINDS = ("plain", "tls")
QUICK_CONTENDERS = ("naive-aiohttp", "ndovu-proxy")


@dataclass
class Scenario:
    name: str
    path: str
    connections: int
    figure: str  # p50/p99 | rps | mbps
    post: bool = False


SCENARIOS = [
    Scenario("GET small c1", "/api/v3/partners/small", 1, "latency"),
    Scenario("GET small c64", "/api/v3/partners/small", 64, "rps"),
    Scenario("POST 4KiB c16", "/api/v3/partners/echo", 16, "rps", post=True),
    Scenario("GET 10MiB c4", "/api/v3/partners/big", 4, "mbps"),
]


@dataclass
class Result:
    contender: str
    scenario: str
    rps: float = 0.0
    mbps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    non2xx: int = 0
    errors: int = 0
    extra: dict[str, float] = field(default_factory=dict)
    kind: str = "plain"  # the upstream's: plain or tls


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15) -> float:
    """Seconds until `port` accepts a connection."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"contender exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return time.monotonic() - began
        time.sleep(0.002)
    raise SystemExit(f"nothing listens on {port} after {timeout}s")


def nginx_conf(tmp: Path, name: str, servers: list[str], upstream_block: str = "") -> Path:
    conf = tmp / f"{name}.conf"
    conf.write_text(f"""
load_module {ECHO_MODULE};
worker_processes 1;
daemon off;
user root;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}.error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/{name}-body;
    proxy_temp_path {tmp}/{name}-proxy;
    fastcgi_temp_path {tmp}/{name}-fcgi; uwsgi_temp_path {tmp}/{name}-uwsgi; scgi_temp_path {tmp}/{name}-scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    sendfile on;
    tcp_nopush on;
    {upstream_block}
    {" ".join(f"server {{ {server} }}" for server in servers)}
}}
""")
    return conf


@dataclass
class Certs:
    ca: Path  # the bench's own CA: what the contenders trust
    cert: Path  # the upstream's, for 127.0.0.1 and localhost
    key: Path


def make_certs(tmp: Path) -> Certs:
    """A CA and a server certificate it signs, with the extensions strict verification wants."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30, cwd=tmp)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=ndovu bench CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", *ec, "-keyout", "up.key", "-out", "up.csr", "-subj", "/CN=localhost")
    (tmp / "up.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
                                "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
                                "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n")
    openssl("x509", "-req", "-in", "up.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "up.pem", "-days", "2", "-extfile", "up.ext")
    return Certs(tmp / "ca.pem", tmp / "up.pem", tmp / "up.key")


def upstream_servers(ports: dict[str, int], tmp: Path, certs: Certs) -> list[str]:
    big = tmp / "www" / "api" / "v3" / "partners"
    big.mkdir(parents=True)
    (big / "big").write_bytes(os.urandom(10 * 1024 * 1024))
    tls = f"ssl_certificate {certs.cert}; ssl_certificate_key {certs.key}; ssl_session_cache shared:up:1m;"
    return [upstream_server(f"listen 127.0.0.1:{ports['plain']} backlog=4096;", tmp),
            upstream_server(f"listen 127.0.0.1:{ports['tls']} ssl backlog=4096; {tls}", tmp)]


def upstream_server(listen: str, tmp: Path) -> str:
    auth = f'if ($http_authorization != "Bearer {TOKEN}") {{ return 401; }}'
    grant = json.dumps({"access_token": TOKEN, "expires_in": 3600, "token_type": "Bearer"})
    return f"""
        {listen}
        root {tmp}/www;
        location = /api/v3/partners/auth {{
            access_log {tmp}/auth.log;
            default_type application/json;
            return 200 '{grant}';
        }}
        location = /api/v3/partners/small {{
            {auth}
            default_type application/json;
            return 200 '{SMALL}';
        }}
        location = /api/v3/partners/echo {{
            {auth}
            client_body_buffer_size 64k;
            client_body_in_single_buffer on;
            echo_read_request_body;
            echo_request_body;
        }}
        location = /api/v3/partners/big {{
            {auth}
            default_type application/octet-stream;
        }}
    """


def parse_wrk(text: str) -> tuple[float, float, float, float, int, int]:
    def number(pattern: str) -> float:
        m = re.search(pattern, text)
        return float(m[1]) if m else 0.0

    def duration_ms(pct: str) -> float:
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        if not m:
            return 0.0
        return float(m[1]) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m[2]]

    m = re.search(r"Transfer/sec:\s+([\d.]+)(B|KB|MB|GB)", text)
    mbps = float(m[1]) * {"B": 1e-6, "KB": 1.024e-3, "MB": 1.048576, "GB": 1073.741824}[m[2]] if m else 0.0
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", text))
    return number(r"Requests/sec:\s+([\d.]+)"), mbps, duration_ms("50"), duration_ms("99"), int(number(r"Non-2xx or 3xx responses: (\d+)")), errors


def wrk(url: str, scenario: Scenario, seconds: float, tmp: Path, auth_header: bool) -> Result:
    cmd = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{scenario.connections}", f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "10s"]
    if auth_header:
        cmd += ["-H", f"Authorization: Bearer {TOKEN}"]
    if scenario.post:
        script = tmp / "post.lua"
        script.write_text('wrk.method = "POST"\nwrk.body = string.rep("p", 4096)\nwrk.headers["Content-Type"] = "application/octet-stream"\n')
        cmd += ["-s", str(script)]
    out = subprocess.run([*cmd, url + scenario.path], capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    rps, mbps, p50, p99, non2xx, errors = parse_wrk(out)
    return Result("", scenario.name, rps, mbps, p50, p99, non2xx, errors)


def status_kib(pid: int, key: str) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


class Contender:
    def __init__(self, name: str, tmp: Path, upstream: str, certs: Certs) -> None:
        self.name, self.tmp, self.upstream, self.certs = name, tmp, upstream, certs
        self.tls = upstream.startswith("https:")
        self.port = free_port()
        self.admin_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0

    def command(self) -> list[str]:
        py = sys.executable
        up = self.upstream
        if self.name == "nginx-proxy":
            pool = f"upstream partner {{ server {up.split('://')[1]}; keepalive 64; }}"
            tls = (f"proxy_ssl_trusted_certificate {self.certs.ca}; proxy_ssl_verify on; "
                   "proxy_ssl_name localhost; proxy_ssl_session_reuse on;") if self.tls else ""
            server = f"""
                listen 127.0.0.1:{self.port} backlog=4096;
                location / {{
                    proxy_pass {"https" if self.tls else "http"}://partner;
                    proxy_http_version 1.1;
                    proxy_set_header Connection "";
                    proxy_set_header Authorization "Bearer {TOKEN}";
                    proxy_max_temp_file_size 0;
                    {tls}
                }}"""
            return ["nginx", "-c", str(nginx_conf(self.tmp, "proxy", [server], pool))]
        if self.name == "naive-aiohttp":
            return [py, str(ROOT / "bench" / "naive_proxy.py"), str(self.port), up, TOKEN,
                    *([str(self.certs.ca)] if self.tls else [])]
        # the default configuration (access log on, admin listener on), the bench's CA trusted
        conf = self.tmp / "ndovu.yaml"
        conf.write_text(json.dumps({"upstream": {"url": up, "ca_file": str(self.certs.ca)}}))
        return [py, "-m", "proxy", "serve", "--config", str(conf), "--listen", f"127.0.0.1:{self.port}",
                "--admin-listen", f"127.0.0.1:{self.admin_port}"]

    def start(self) -> None:
        env = {**os.environ, "NDOVU_CLIENT_ID": "bench", "NDOVU_CLIENT_SECRET": "bench-secret"}
        log = (self.tmp / f"{self.name}.log").open("wb")
        self.proc = subprocess.Popen(["taskset", "-c", PROXY_CPU, *self.command()], stdout=log, stderr=log, env=env, cwd=ROOT)
        self.startup_s = wait_port(self.port, self.proc)

    def pids(self) -> list[int]:
        assert self.proc is not None
        return children(self.proc.pid) if self.name == "nginx-proxy" else [self.proc.pid]

    def rss(self, key: str) -> float:
        return sum(status_kib(p, key) for p in self.pids())

    def connections_opened(self) -> float | None:
        """ndovu-proxy's own count of upstream connections (one TLS handshake each over https)."""
        if self.name != "ndovu-proxy":
            return None
        import urllib.request

        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
            m = re.search(r"^ndovu_proxy_upstream_connections_opened_total(?:\{[^}]*\})? ([\d.e+]+)$", text, re.M)
            return float(m[1]) if m else None
        return None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def warm(url: str, auth_header: bool, ca: Path) -> None:
    import ssl
    import urllib.request

    context = ssl.create_default_context(cafile=str(ca))
    req = urllib.request.Request(url + "/api/v3/partners/small", headers={"Authorization": f"Bearer {TOKEN}"} if auth_header else {})
    for _ in range(50):
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(req, timeout=5, context=context) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.05)
    raise SystemExit(f"{url} never answered 200")


def run(args: argparse.Namespace) -> int:
    for tool in ("nginx", "wrk", "taskset", "pgrep", "openssl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench/run.py needs {tool} (apt-get install nginx-light libnginx-mod-http-echo wrk openssl)")
    if not Path(ECHO_MODULE).exists():
        raise SystemExit("bench/run.py needs nginx's echo module (apt-get install libnginx-mod-http-echo)")
    tmp = Path(tempfile.mkdtemp(prefix="ndovu-bench-"))
    os.chmod(tmp, 0o755)
    certs = make_certs(tmp)
    ports = {kind: free_port() for kind in KINDS}
    upstream = subprocess.Popen(
        ["taskset", "-c", LOAD_CPU, "nginx", "-c", str(nginx_conf(tmp, "upstream", upstream_servers(ports, tmp, certs)))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    results: list[Result] = []
    notes: dict[str, dict[str, dict[str, float]]] = {kind: {} for kind in args.upstream}
    try:
        for kind in KINDS:
            wait_port(ports[kind], upstream)
        for kind in args.upstream:
            origin = f"{'https' if kind == 'tls' else 'http'}://127.0.0.1:{ports[kind]}"
            print(f"upstream: {kind} ({origin})", flush=True)
            for name in args.contenders:
                results += measure(name, kind, origin, tmp, certs, args.seconds, notes[kind])
        auth_calls = len((tmp / "auth.log").read_text().splitlines()) if (tmp / "auth.log").exists() else 0
    finally:
        upstream.terminate()
        upstream.wait(10)
    report = "\n\n".join(table(results, notes, kind, args.contenders) for kind in args.upstream)
    report += "\n\n" + targets(results, notes, args.upstream, args.contenders)
    report += f"\n\nauth calls during the benchmark: {auth_calls} (one per ndovu-proxy start; a token lives 3600 s)"
    print(report)
    out = {"seconds": args.seconds, "results": [r.__dict__ for r in results], "processes": notes, "auth_calls": auth_calls}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)
    return 1 if any(r.non2xx or r.errors for r in results) else 0


def measure(name: str, kind: str, origin: str, tmp: Path, certs: Certs, seconds: float,
            notes: dict[str, dict[str, float]]) -> list[Result]:
    """Every scenario against one contender, started afresh for this upstream kind."""
    direct = name == "direct"
    contender = None if direct else Contender(name, tmp, origin, certs)
    results = []
    try:
        if contender is not None:
            contender.start()
        base = origin if contender is None else f"http://127.0.0.1:{contender.port}"
        warm(base, direct, certs.ca)
        if contender is not None:
            notes[name] = {"startup_s": round(contender.startup_s, 3), "idle_rss_mib": round(contender.rss("VmRSS"), 1)}
        for scenario in SCENARIOS:
            r = wrk(base, scenario, seconds, tmp, direct)
            r.contender, r.kind = name, kind
            results.append(r)
            print(f"  {name:14} {scenario.name:14} {r.rps:10.0f} req/s {r.mbps:8.1f} MB/s p50 {r.p50_ms:.3f} ms p99 {r.p99_ms:.3f} ms"
                  + (f"  non-2xx {r.non2xx}" if r.non2xx else "") + (f"  errors {r.errors}" if r.errors else ""), flush=True)
        if contender is not None:
            notes[name]["peak_rss_mib"] = round(contender.rss("VmHWM"), 1)
            opened = contender.connections_opened()
            if opened is not None:
                notes[name]["upstream_connections"] = opened
    finally:
        if contender is not None:
            contender.stop()
    return results


FIGURES = [
    ("GET small c1 p50 (ms)", "GET small c1", "p50_ms"),
    ("GET small c1 p99 (ms)", "GET small c1", "p99_ms"),
    ("GET small c64 (req/s)", "GET small c64", "rps"),
    ("POST 4KiB c16 (req/s)", "POST 4KiB c16", "rps"),
    ("GET 10MiB c4 (MB/s)", "GET 10MiB c4", "mbps"),
]


def table(results: list[Result], notes: dict[str, dict[str, dict[str, float]]], kind: str,
          contenders: list[str]) -> str:
    by = {(r.contender, r.scenario): r for r in results if r.kind == kind}
    others = [c for c in ("direct", "nginx-proxy", "naive-aiohttp") if c in contenders and "ndovu-proxy" in contenders]
    rows = [f"{'plain HTTP' if kind == 'plain' else 'HTTPS'} upstream",
            f"| figure | {' | '.join(contenders)} |" + "".join(f" ndovu vs {o} |" for o in others),
            "|" + "---|" * (len(contenders) + len(others) + 1)]
    for label, scenario, attr in FIGURES:
        cells, values = [], {}
        for c in contenders:
            r = by.get((c, scenario))
            v = getattr(r, attr) if r else 0.0
            values[c] = v
            flag = " INVALID" if r and (r.non2xx or r.errors) else ""
            cells.append(f"{v:.3f}{flag}" if attr.endswith("ms") else f"{v:,.0f}{flag}")
        ratios = [f"{values['ndovu-proxy'] / values[o]:.2f}x" if values[o] else "-" for o in others]
        rows.append(f"| {label} | {' | '.join(cells + ratios)} |")
    for key, label in (("idle_rss_mib", "idle RSS (MiB)"), ("peak_rss_mib", "peak RSS (MiB)"),
                       ("startup_s", "start-up to listening (s)"),
                       ("upstream_connections", "upstream connections opened")):
        cells = [f"{notes[kind].get(c, {}).get(key, '-'):}" if c != "direct" else "-" for c in contenders]
        rows.append(f"| {label} | {' | '.join(cells)} |" + " |" * len(others))
    return "\n".join(rows)


#: (label, scenario, attribute, against, the target ratio, higher is better), per upstream kind
TARGETS = {
    "plain": [("GET small c64", "GET small c64", "rps", "naive-aiohttp", 3.5, True),
              ("POST 4KiB c16", "POST 4KiB c16", "rps", "naive-aiohttp", 3.3, True),
              ("GET 10MiB c4", "GET 10MiB c4", "mbps", "nginx-proxy", 1.0, True),
              ("GET small c1 p50", "GET small c1", "p50_ms", "nginx-proxy", 1.3, False)],
    "tls": [("GET small c64", "GET small c64", "rps", "naive-aiohttp", 3.5, True),
            ("POST 4KiB c16", "POST 4KiB c16", "rps", "naive-aiohttp", 3.3, True),
            ("GET 10MiB c4", "GET 10MiB c4", "mbps", "nginx-proxy", 0.8, True),
            ("GET small c1 p50", "GET small c1", "p50_ms", "nginx-proxy", 1.3, False)],
}


def targets(results: list[Result], notes: dict[str, dict[str, dict[str, float]]], kinds: list[str],
            contenders: list[str]) -> str:
    """ndovu-proxy's ratios beside the targets; a target whose peer did not run is left out."""
    by = {(r.kind, r.contender, r.scenario): r for r in results}
    rows = ["targets (ndovu-proxy's ratio, this run)", "| upstream | figure | vs | ratio | target | met |", "|---|---|---|---|---|---|"]
    for kind in kinds:
        for label, scenario, attr, peer, goal, higher in TARGETS[kind]:
            ours, theirs = by.get((kind, "ndovu-proxy", scenario)), by.get((kind, peer, scenario))
            if ours is None or theirs is None or not getattr(theirs, attr):
                continue
            ratio = getattr(ours, attr) / getattr(theirs, attr)
            met = ratio >= goal if higher else ratio <= goal
            rows.append(f"| {kind} | {label} | {peer} | {ratio:.2f}x | {'>=' if higher else '<='} {goal}x | {'yes' if met else 'NO'} |")
        ndovu = notes.get(kind, {}).get("ndovu-proxy")
        if ndovu:
            rows.append(f"| {kind} | peak RSS | | {ndovu.get('peak_rss_mib', 0):g} MiB | <= 64 MiB | "
                        f"{'yes' if ndovu.get('peak_rss_mib', 0) <= 64 else 'NO'} |")
            rows.append(f"| {kind} | start-up to listening | | {ndovu.get('startup_s', 0):g} s | <= 0.3 s | "
                        f"{'yes' if ndovu.get('startup_s', 0) <= 0.3 else 'NO'} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=None, help="length of each wrk run (default 5; 2 with --quick)")
    parser.add_argument("--json", metavar="PATH", default=str(ROOT / "bench" / "results" / "latest.json"))
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=None, metavar="NAME",
                        help=f"which to run, in order (default: {' '.join(CONTENDERS)})")
    parser.add_argument("--upstream", nargs="+", choices=KINDS, default=None, metavar="KIND",
                        help="plain, tls or both (default: both; plain with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="the regression guard, about 30 s: ndovu-proxy against naive-aiohttp on a plain "
                        "upstream, 2 s a figure; run it before and after a change to the hot path")
    args = parser.parse_args()
    quick = args.quick
    args.seconds = args.seconds or (2 if quick else 5)
    args.contenders = args.contenders or list(QUICK_CONTENDERS if quick else CONTENDERS)
    args.upstream = args.upstream or (["plain"] if quick else list(KINDS))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
