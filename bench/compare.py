"""Two builds of ndovu-proxy side by side, interleaved, on bench/run.py's upstream and load.

    python bench/compare.py --baseline DIR [--baseline-python PY] [--rounds 3] [--seconds 5] [--upstream plain|tls]

DIR is another checkout of the project (e.g. `git worktree add /tmp/base <commit>`), run with
PY (a Python that has that checkout's dependencies; default: this one) and PYTHONPATH=DIR.
Each round runs every scenario against the baseline, then against this checkout (the order
alternates between rounds, so drift on a shared machine hits both alike); the table gives the
median of the rounds and every round's figure, and the proxy's CPU time per request (user +
system, from /proc), which a busy machine disturbs far less than throughput. Same needs as bench/run.py (nginx with the
echo module, wrk, taskset); loopback only, bounded by --rounds x scenarios x --seconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402  (bench/run.py, beside this file)

SCENARIOS = {"GET small c64": "rps", "POST 4KiB c16": "rps", "GET small c1": "p50_ms"}


class Build(run.Contender):
    """ndovu-proxy from a given checkout, in its default configuration."""

    def __init__(self, name: str, tmp: Path, upstream: str, certs: run.Certs, tree: Path, python: str) -> None:
        super().__init__("ndovu-proxy", tmp, upstream, certs)
        self.label, self.tree, self.python = name, tree, python

    def command(self) -> list[str]:
        return [self.python, *super().command()[1:]]

    def start(self) -> None:
        env = {**os.environ, "NDOVU_CLIENT_ID": "bench", "NDOVU_CLIENT_SECRET": "bench-secret",
               "PYTHONPATH": str(self.tree)}
        log = (self.tmp / f"{self.label}.log").open("wb")
        self.proc = subprocess.Popen(["taskset", "-c", run.PROXY_CPU, *self.command()], stdout=log, stderr=log,
                                     env=env, cwd=self.tree)
        self.startup_s = run.wait_port(self.port, self.proc)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, type=Path, help="the other checkout")
    parser.add_argument("--baseline-python", default=sys.executable, help="the Python to run it with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--upstream", choices=run.KINDS, default="plain", help="the upstream's kind (default plain)")
    args = parser.parse_args()
    for tool in ("nginx", "wrk", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench/compare.py needs {tool} (apt-get install nginx-light libnginx-mod-http-echo wrk)")
    builds = [("baseline", args.baseline.resolve(), args.baseline_python), ("this", run.ROOT, sys.executable)]
    scenarios = [s for s in run.SCENARIOS if s.name in SCENARIOS]
    tmp = Path(tempfile.mkdtemp(prefix="ndovu-compare-"))
    os.chmod(tmp, 0o755)
    certs = run.make_certs(tmp)
    ports = {kind: run.free_port() for kind in run.KINDS}
    upstream = subprocess.Popen(
        ["taskset", "-c", run.LOAD_CPU, "nginx", "-c",
         str(run.nginx_conf(tmp, "upstream", run.upstream_servers(ports, tmp, certs)))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    origin = f"{'https' if args.upstream == 'tls' else 'http'}://127.0.0.1:{ports[args.upstream]}"
    figures: dict[tuple[str, str], list[float]] = {}
    invalid = False
    try:
        run.wait_port(ports[args.upstream], upstream)
        for n in range(args.rounds):
            for label, tree, python in builds if n % 2 == 0 else builds[::-1]:
                build = Build(label, tmp, origin, certs, tree, python)
                try:
                    build.start()
                    base = f"http://127.0.0.1:{build.port}"
                    run.warm(base, False, certs.ca)
                    assert build.proc is not None
                    for scenario in scenarios:
                        cpu = cpu_seconds(build.proc.pid)
                        r = run.wrk(base, scenario, args.seconds, tmp, False)
                        value = getattr(r, SCENARIOS[scenario.name])
                        figures.setdefault((label, scenario.name), []).append(value)
                        served = r.rps * args.seconds
                        if served:
                            used = (cpu_seconds(build.proc.pid) - cpu) / served * 1e6
                            figures.setdefault((label, scenario.name + " cpu"), []).append(used)
                        invalid |= bool(r.non2xx or r.errors)
                        print(f"  round {n + 1} {label:8} {scenario.name:14} {value:10.3f}"
                              + (f"  non-2xx {r.non2xx} errors {r.errors}" if r.non2xx or r.errors else ""), flush=True)
                finally:
                    build.stop()
    finally:
        upstream.terminate()
        upstream.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n| figure (median of {args.rounds}) | baseline | this | this vs baseline | rounds: baseline / this |")
    print("|---|---|---|---|---|")
    for scenario in scenarios:
        unit = SCENARIOS[scenario.name]
        old, new = figures[("baseline", scenario.name)], figures[("this", scenario.name)]
        mo, mn = statistics.median(old), statistics.median(new)
        fmt = "{:.3f}" if unit.endswith("ms") else "{:,.0f}"
        label = f"{scenario.name} ({'p50 ms' if unit.endswith('ms') else 'req/s'})"
        rounds = " ".join(fmt.format(v) for v in old) + " / " + " ".join(fmt.format(v) for v in new)
        print(f"| {label} | {fmt.format(mo)} | {fmt.format(mn)} | {mn / mo:.2f}x | {rounds} |")
        old, new = figures.get(("baseline", scenario.name + " cpu"), []), figures.get(("this", scenario.name + " cpu"), [])
        if old and new:
            mo, mn = statistics.median(old), statistics.median(new)
            rounds = " ".join(f"{v:.1f}" for v in old) + " / " + " ".join(f"{v:.1f}" for v in new)
            print(f"| {scenario.name} (proxy CPU us/request) | {mo:.1f} | {mn:.1f} | {mn / mo:.2f}x | {rounds} |")
    return 1 if invalid else 0


if __name__ == "__main__":
    raise SystemExit(main())
