"""Token rotation under load: steady traffic through many short token lifetimes and revocations.

    python bench/soak.py                 # 10 minutes
    python bench/soak.py --duration 60   # the CI mode

Starts, on loopback only, `ndovu-proxy mock-upstream` with short-lived tokens and
`ndovu-proxy serve` in front of it (default configuration), drives steady concurrent traffic
(GETs and 4 KiB POSTs) while revoking every token now and then, and prints: requests, non-2xx
answers (must be 0), auth calls against the token lifetimes the run went through, the proxy's
RSS and open file descriptors at the start and the end. Exits 1 when a figure is off. Every
loop stops by itself at the deadline; the two processes it started are ended by their PIDs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

API = "/api/v3/partners"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def wait_for_line(path: Path, pattern: str, proc: asyncio.subprocess.Process, timeout: float = 15) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise SystemExit(f"process exited early: {path.read_text()[-2000:]}")
        m = re.search(pattern, path.read_text())
        if m:
            return m
        await asyncio.sleep(0.05)
    raise SystemExit(f"timed out waiting for {pattern!r} in {path}")


async def soak(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="ndovu-soak-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("NDOVU_")}
    mock_out = tmp / "mock.log"
    mock = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "mock-upstream", "--listen", "127.0.0.1:0", "--token-ttl", str(args.token_ttl),
        stdout=mock_out.open("w"), stderr=asyncio.subprocess.DEVNULL, stdin=asyncio.subprocess.DEVNULL, env=env,
    )
    procs = [mock]
    try:
        upstream = (await wait_for_line(mock_out, r"on (http://\S+)", mock))[1]
        proxy_log = tmp / "proxy.log"
        proxy = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
            "--upstream", upstream, "--log-format", "json",
            stdout=asyncio.subprocess.DEVNULL, stderr=proxy_log.open("w"), stdin=asyncio.subprocess.DEVNULL,
            env={**env, "NDOVU_CLIENT_ID": "demo-client", "NDOVU_CLIENT_SECRET": "demo-secret"},
        )
        procs.append(proxy)
        # the listening event, read as the JSON it is (its keys' order is not part of the format)
        line = json.loads((await wait_for_line(proxy_log, r'(?m)^\{.*"event": "listening".*\}$', proxy))[0])
        base, admin = f"http://{line['address']}", f"http://{line['admin_address']}"
        return await drive(args, proxy.pid, base, admin, upstream)
    finally:
        for p in procs:
            if p.returncode is None:
                p.terminate()
                try:
                    await asyncio.wait_for(p.wait(), 10)
                except TimeoutError:
                    p.kill()
                    await p.wait()


async def drive(args: argparse.Namespace, pid: int, base: str, admin: str, upstream: str) -> int:
    body = os.urandom(4096)
    counts = {"requests": 0, "non2xx": 0, "errors": 0}
    statuses: dict[int, int] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        revocations = 0

        async def worker(n: int, deadline: float) -> None:
            i = 0
            while time.monotonic() < deadline:
                i += 1
                try:
                    if (n + i) % 2:
                        req = http.get(f"{base}{API}/products")
                    else:
                        req = http.post(f"{base}{API}/orders?n={i}", data=body)
                    async with req as resp:
                        await resp.read()
                        statuses[resp.status] = statuses.get(resp.status, 0) + 1
                        if not 200 <= resp.status < 300:
                            counts["non2xx"] += 1
                except (aiohttp.ClientError, TimeoutError):
                    counts["errors"] += 1
                counts["requests"] += 1

        # warm up at full concurrency, so the connection pools on both sides are as full at the
        # start as at the end, and a difference in open fds means a leak
        await asyncio.gather(*(worker(n, time.monotonic() + 2) for n in range(args.concurrency)))
        counts.update(requests=0, non2xx=0, errors=0)
        statuses.clear()
        start_rss, start_fds = rss_mib(pid), open_fds(pid)
        began = time.monotonic()
        deadline = began + args.duration

        async def revoker() -> None:
            nonlocal revocations
            while time.monotonic() + args.revoke_every < deadline:
                await asyncio.sleep(args.revoke_every)
                async with http.post(f"{upstream}/_mock/revoke") as resp:
                    await resp.read()
                revocations += 1

        peak = [start_rss]

        async def sampler() -> None:
            while time.monotonic() < deadline:
                await asyncio.sleep(1)
                peak[0] = max(peak[0], rss_mib(pid))

        await asyncio.gather(*(worker(n, deadline) for n in range(args.concurrency)), revoker(), sampler())
        elapsed = time.monotonic() - began
        end_rss, end_fds = rss_mib(pid), open_fds(pid)
        async with http.get(f"{upstream}/_mock/stats") as resp:
            stats = await resp.json()
        async with http.get(f"{admin}/metrics") as resp:
            metrics = await resp.text()
    replays = int(float(re.search(r"^ndovu_proxy_replays_total (\S+)", metrics, re.M)[1]))  # type: ignore[index]
    # the proxy renews at half the lifetime (refresh_margin 60 s is clamped to ttl/2), so each
    # lifetime costs one auth call; each revocation costs one more
    half_life = args.token_ttl / 2
    lifetimes = int((elapsed + 5) / half_life) + 1  # + the warm-up
    expected_max = lifetimes + revocations + 1
    auth_calls = stats["auth_calls"]
    ok = counts["non2xx"] == 0 and counts["errors"] == 0 and auth_calls <= expected_max and end_fds <= start_fds + 4
    result = {
        "duration_s": round(elapsed, 1), "concurrency": args.concurrency, "token_ttl_s": args.token_ttl,
        "requests": counts["requests"], "req_per_s": round(counts["requests"] / elapsed), "non_2xx": counts["non2xx"],
        "errors": counts["errors"], "statuses": statuses, "replays": replays, "revocations": revocations,
        "auth_calls": auth_calls, "token_lifetimes": lifetimes, "auth_calls_max_expected": expected_max,
        "rss_mib": {"start": round(start_rss, 1), "end": round(end_rss, 1), "peak": round(max(peak[0], hwm_mib(pid)), 1)},
        "open_fds": {"start": start_fds, "end": end_fds}, "ok": ok,
    }
    print(f"soak: {elapsed:.0f} s, {args.concurrency} workers, token ttl {args.token_ttl:g} s, a revocation every {args.revoke_every:g} s")
    print(f"  requests       {counts['requests']} ({result['req_per_s']}/s), statuses {statuses}")
    print(f"  non-2xx        {counts['non2xx']}   client errors {counts['errors']}")
    print(f"  replays        {replays} after {revocations} revocations")
    print(f"  auth calls     {auth_calls} for {lifetimes} token lifetimes + {revocations} revocations (at most {expected_max})")
    print(f"  proxy RSS      start {start_rss:.1f} MiB, end {end_rss:.1f} MiB, peak {result['rss_mib']['peak']} MiB")
    print(f"  open fds       start {start_fds}, end {end_fds}")
    print(f"  result         {'OK' if ok else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600, help="seconds of traffic (default 600)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--token-ttl", type=float, default=6, help="token lifetime the fake API gives (default 6 s)")
    parser.add_argument("--revoke-every", type=float, default=7, help="seconds between revocations (default 7)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(asyncio.wait_for(soak(args), args.duration + 120))
    return 1


if __name__ == "__main__":
    sys.exit(main())
