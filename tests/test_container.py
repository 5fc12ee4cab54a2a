"""The image as a sidecar, for real: build it, run it against the fake Ndovu API, send a request
through it, run its HEALTHCHECK, stop it with SIGTERM and expect a clean exit within a second
or two. Uses podman and the build-and-run recipe kept beside the project checkout
(../shared/container/); skipped, saying what is missing, where either is absent."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from proxy.mock import MockNdovu

ROOT = Path(__file__).parent.parent
RECIPE = ROOT.parent / "shared" / "container" / "build_and_run.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(600)
async def test_image_runs_as_a_sidecar(aiohttp_server: Any) -> None:
    if shutil.which("podman") is None:
        pytest.skip("podman is missing (apt-get install podman buildah mmdebstrap runc uidmap slirp4netns fuse-overlayfs)")
    if not RECIPE.exists():
        pytest.skip(f"the container recipe {RECIPE} is not beside this checkout")
    mock = MockNdovu()
    server = await aiohttp_server(mock.app(), host="127.0.0.1")
    port, admin = free_port(), free_port()
    cmd = [
        "bash", str(RECIPE), "--url", f"http://127.0.0.1:{port}/api/v3/partners/products",
        "--run-opt", "--read-only",
        "-e", f"NDOVU_UPSTREAM_URL=http://127.0.0.1:{server.port}",
        "-e", f"NDOVU_CLIENT_ID={mock.client_id}", "-e", f"NDOVU_CLIENT_SECRET={mock.client_secret}",
        "-e", f"NDOVU_PROXY_LISTEN=127.0.0.1:{port}", "-e", f"NDOVU_PROXY_ADMIN_LISTEN=127.0.0.1:{admin}",
        str(ROOT),
    ]
    # the recipe blocks in subprocess calls; run it off the loop so the mock keeps answering
    import asyncio

    result = await asyncio.to_thread(
        subprocess.run, cmd, capture_output=True, text=True, timeout=590, env={**os.environ}
    )
    summary = result.stdout
    print(summary)  # build time, image size, start-up and shutdown times for the record
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "RESULT: OK" in summary
    assert re.search(r"answered HTTP 200 .*\"products\"", summary)
    assert "healthcheck: healthy" in summary
    assert "USER=10001:10001" in summary
    stop = re.search(r"stop: container exited ([\d.]+)(ms|s) after SIGTERM \(exit code 0\)", summary)
    assert stop is not None
    assert mock.auth_calls == 1 and mock.api_calls == 1
