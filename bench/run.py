"""The cost of the sidecar, side by side: direct, nginx as a proxy, a naive aiohttp proxy, ndovu-proxy.

    python bench/run.py [--seconds 5] [--json bench/results/latest.json]

Needs Debian's nginx (with the echo module: nginx-light and libnginx-mod-http-echo), wrk and
taskset. On loopback only, bounded in time (each wrk run lasts --seconds):

- upstream: nginx, one worker, on CPU 0: the auth call answers a fixed token; the API paths
  check the bearer token (401 otherwise, so a contender that forgot it cannot look fast) and
  serve a ~300-byte JSON, a 4 KiB POST echo and a 10 MiB file;
- contenders, one at a time, alone on CPU 1: `direct` (wrk straight to the upstream with the
  header set: the limit), `nginx-proxy` (nginx, one worker, static bearer header, keep-alive
  upstream pool: the C peer), `naive-aiohttp` (bench/naive_proxy.py: the Python baseline),
  `ndovu-proxy` with its default configuration (access log on);
- load: wrk, one thread, on CPU 0.

Prints one table (each figure, and its ratio to direct, to nginx-proxy and to naive-aiohttp),
flags runs with non-2xx answers as INVALID, and writes the same as JSON.
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


def nginx_conf(tmp: Path, name: str, server: str, upstream_block: str = "") -> Path:
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
    server {{ {server} }}
}}
""")
    return conf


def upstream_server(port: int, tmp: Path) -> str:
    big = tmp / "www" / "api" / "v3" / "partners"
    big.mkdir(parents=True)
    (big / "big").write_bytes(os.urandom(10 * 1024 * 1024))
    auth = f'if ($http_authorization != "Bearer {TOKEN}") {{ return 401; }}'
    grant = json.dumps({"access_token": TOKEN, "expires_in": 3600, "token_type": "Bearer"})
    return f"""
        listen 127.0.0.1:{port} backlog=4096;
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
    def __init__(self, name: str, tmp: Path, up_port: int) -> None:
        self.name, self.tmp, self.up_port = name, tmp, up_port
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0

    def command(self) -> list[str]:
        py = sys.executable
        up = f"http://127.0.0.1:{self.up_port}"
        if self.name == "nginx-proxy":
            pool = f"upstream partner {{ server 127.0.0.1:{self.up_port}; keepalive 64; }}"
            server = f"""
                listen 127.0.0.1:{self.port} backlog=4096;
                location / {{
                    proxy_pass http://partner;
                    proxy_http_version 1.1;
                    proxy_set_header Connection "";
                    proxy_set_header Authorization "Bearer {TOKEN}";
                    proxy_max_temp_file_size 0;
                }}"""
            return ["nginx", "-c", str(nginx_conf(self.tmp, "proxy", server, pool))]
        if self.name == "naive-aiohttp":
            return [py, str(ROOT / "bench" / "naive_proxy.py"), str(self.port), up, TOKEN]
        # the default configuration: access log on, admin listener on (on a free port here)
        return [py, "-m", "proxy", "serve", "--listen", f"127.0.0.1:{self.port}",
                "--admin-listen", f"127.0.0.1:{free_port()}", "--upstream", up]

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

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def warm(url: str, auth_header: bool) -> None:
    import urllib.request

    req = urllib.request.Request(url + "/api/v3/partners/small", headers={"Authorization": f"Bearer {TOKEN}"} if auth_header else {})
    for _ in range(50):
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(req, timeout=5) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.05)
    raise SystemExit(f"{url} never answered 200")


def run(args: argparse.Namespace) -> int:
    for tool in ("nginx", "wrk", "taskset", "pgrep"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench/run.py needs {tool} (apt-get install nginx-light libnginx-mod-http-echo wrk)")
    if not Path(ECHO_MODULE).exists():
        raise SystemExit("bench/run.py needs nginx's echo module (apt-get install libnginx-mod-http-echo)")
    tmp = Path(tempfile.mkdtemp(prefix="ndovu-bench-"))
    os.chmod(tmp, 0o755)
    up_port = free_port()
    upstream = subprocess.Popen(
        ["taskset", "-c", LOAD_CPU, "nginx", "-c", str(nginx_conf(tmp, "upstream", upstream_server(up_port, tmp)))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    results: list[Result] = []
    notes: dict[str, dict[str, float]] = {}
    try:
        wait_port(up_port, upstream)
        for name in args.contenders:
            direct = name == "direct"
            contender = None if direct else Contender(name, tmp, up_port)
            try:
                if contender is not None:
                    contender.start()
                port = up_port if contender is None else contender.port
                base = f"http://127.0.0.1:{port}"
                warm(base, direct)
                if contender is not None:
                    notes[name] = {"startup_s": round(contender.startup_s, 3), "idle_rss_mib": round(contender.rss("VmRSS"), 1)}
                for scenario in SCENARIOS:
                    r = wrk(base, scenario, args.seconds, tmp, direct)
                    r.contender = name
                    results.append(r)
                    print(f"  {name:14} {scenario.name:14} {r.rps:10.0f} req/s {r.mbps:8.1f} MB/s p50 {r.p50_ms:.3f} ms p99 {r.p99_ms:.3f} ms"
                          + (f"  non-2xx {r.non2xx}" if r.non2xx else "") + (f"  errors {r.errors}" if r.errors else ""), flush=True)
                if contender is not None:
                    notes[name]["peak_rss_mib"] = round(contender.rss("VmHWM"), 1)
            finally:
                if contender is not None:
                    contender.stop()
        auth_calls = len((tmp / "auth.log").read_text().splitlines()) if (tmp / "auth.log").exists() else 0
    finally:
        upstream.terminate()
        upstream.wait(10)
    report = table(results, notes, auth_calls)
    print(report)
    out = {"seconds": args.seconds, "results": [r.__dict__ for r in results], "processes": notes, "auth_calls": auth_calls}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)
    return 1 if any(r.non2xx or r.errors for r in results) else 0


def table(results: list[Result], notes: dict[str, dict[str, float]], auth_calls: int) -> str:
    by = {(r.contender, r.scenario): r for r in results}
    rows = []
    figures = [
        ("GET small c1 p50 (ms)", "GET small c1", "p50_ms", False),
        ("GET small c1 p99 (ms)", "GET small c1", "p99_ms", False),
        ("GET small c64 (req/s)", "GET small c64", "rps", True),
        ("POST 4KiB c16 (req/s)", "POST 4KiB c16", "rps", True),
        ("GET 10MiB c4 (MB/s)", "GET 10MiB c4", "mbps", True),
    ]
    contenders = list(CONTENDERS)
    head = f"| figure | {' | '.join(contenders)} | ndovu vs direct | ndovu vs nginx-proxy | ndovu vs naive |"
    rows.append(head)
    rows.append("|" + "---|" * (len(contenders) + 4))
    for label, scenario, attr, _ in figures:
        cells, values = [], {}
        for c in contenders:
            r = by.get((c, scenario))
            v = getattr(r, attr) if r else 0.0
            values[c] = v
            flag = " INVALID" if r and (r.non2xx or r.errors) else ""
            cells.append(f"{v:.3f}{flag}" if attr.endswith("ms") else f"{v:,.0f}{flag}")
        ratios = [f"{values['ndovu-proxy'] / values[o]:.2f}x" if values[o] else "-" for o in ("direct", "nginx-proxy", "naive-aiohttp")]
        rows.append(f"| {label} | {' | '.join(cells)} | {' | '.join(ratios)} |")
    for key, label in (("idle_rss_mib", "idle RSS (MiB)"), ("peak_rss_mib", "peak RSS (MiB)"), ("startup_s", "start-up to listening (s)")):
        cells = ["-"] + [f"{notes.get(c, {}).get(key, 0):g}" for c in contenders[1:]]
        rows.append(f"| {label} | {' | '.join(cells)} | | | |")
    rows.append(f"\nauth calls during the benchmark: {auth_calls} (one token lifetime: 3600 s)")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5, help="length of each wrk run (default 5)")
    parser.add_argument("--json", metavar="PATH", default=str(ROOT / "bench" / "results" / "latest.json"))
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS), metavar="NAME",
                        help=f"which to run, in order (default: {' '.join(CONTENDERS)})")
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
