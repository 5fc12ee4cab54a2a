"""proxy.rotation: a rotated secret file is noticed without SIGHUP, against real files in
tmp_path (a plain rewrite, Kubernetes' `..data` symlink swap, files that go unusable and
recover), with the watcher's sleep driven by the test; and once end to end with `serve`."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.errors import CredentialsRejected
from proxy.rotation import SecretFileWatcher
from tests.conftest import assert_no_secrets
from tests.fakes import CLIENT_SECRET, FakeNdovu
from tests.procs import MakeCommand
from tests.procs import proxy_env

#: real seconds a step waits for the watcher before failing the test
PATIENCE = 5.0


class Ticks:
    """The watcher's `sleep`: every look waits for the test's `step()`, so nothing sleeps."""

    def __init__(self) -> None:
        self._parked: asyncio.Queue[asyncio.Future[None]] = asyncio.Queue()
        self._held: asyncio.Future[None] | None = None

    async def sleep(self, _seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._parked.put_nowait(fut)
        await fut

    async def parked(self) -> None:
        """Wait until the watcher sleeps: everything before it (a look, a callback) is done."""
        if self._held is None:
            self._held = await asyncio.wait_for(self._parked.get(), PATIENCE)

    async def release(self) -> None:
        """Let the watcher take one look, without waiting for it to finish."""
        await self.parked()
        assert self._held is not None
        self._held.set_result(None)
        self._held = None

    async def step(self, looks: int = 1) -> None:
        """Let the watcher take `looks` looks, each with whatever callback it leads to."""
        for _ in range(looks):
            await self.release()
            await self.parked()


class Calls:
    """The callback: counts its calls; `fail` makes the next ones raise."""

    def __init__(self) -> None:
        self.count = 0
        self.fail: Exception | None = None
        self.called = asyncio.Event()

    async def __call__(self) -> None:
        self.count += 1
        self.called.set()
        if self.fail is not None:
            raise self.fail


@pytest.fixture
async def watch(log_buffer: io.StringIO) -> AsyncIterator[Callable[[Path], Any]]:
    """watch(path) -> (Ticks, Calls): a watcher task on `path`, cancelled after the test."""
    tasks: list[asyncio.Task[None]] = []

    async def start(path: Path) -> tuple[Ticks, Calls]:
        ticks, calls = Ticks(), Calls()
        tasks.append(asyncio.create_task(SecretFileWatcher(str(path), calls, sleep=ticks.sleep).run()))
        await ticks.parked()  # its first look is taken
        return ticks, calls

    yield start
    for task in tasks:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()


def events(log_buffer: io.StringIO, name: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in log_buffer.getvalue().splitlines() if line.startswith("{")]
    return [e for e in lines if e.get("event") == name]


def kubernetes_secret(root: Path, value: str) -> Path:
    """A Secret volume as the kubelet lays it out: `secret -> ..data/secret`,
    `..data -> ..2026_12_01_00_00_00.1`; the path a pod would be given."""
    stamp = root / "..2026_12_01_00_00_00.1"
    stamp.mkdir()
    (stamp / "secret").write_text(value)
    os.symlink(stamp.name, root / "..data")
    os.symlink("..data/secret", root / "secret")
    return root / "secret"


def kubernetes_swap(root: Path, value: str | None, n: int) -> None:
    """The kubelet's atomic update: a new timestamped directory, then a new `..data` symlink
    renamed over the old one, then the old directory removed. `value` None: the key is gone
    from the Secret (the mounted path dangles)."""
    old = os.readlink(root / "..data")
    stamp = root / f"..2026_12_01_00_00_00.{n}"
    stamp.mkdir()
    if value is not None:
        (stamp / "secret").write_text(value)
    os.symlink(stamp.name, root / "..data_tmp")
    os.replace(root / "..data_tmp", root / "..data")
    for child in (root / old).iterdir():
        child.unlink()
    (root / old).rmdir()


# --- 1. changes that call back ---------------------------------------------------------------


async def test_a_plain_rewrite_calls_back_once_after_it_settles(watch: Any, tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("secret-1\n")
    ticks, calls = await watch(path)
    await ticks.step(3)
    assert calls.count == 0  # nothing changed: nothing at start either
    path.write_text("secret-two\n")
    await ticks.step()
    assert calls.count == 0  # seen once: it may still be being written
    await ticks.step()
    assert calls.count == 1
    await ticks.step(3)
    assert calls.count == 1


async def test_a_change_still_under_way_is_read_only_once_it_stops(watch: Any, tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("secret-1")
    ticks, calls = await watch(path)
    path.write_text("sec")  # half-written
    await ticks.step()
    path.write_text("secret-2-done")
    await ticks.step()
    assert calls.count == 0
    await ticks.step()
    assert calls.count == 1


async def test_the_kubernetes_data_symlink_swap_calls_back(watch: Any, tmp_path: Path, log_buffer: io.StringIO) -> None:
    path = kubernetes_secret(tmp_path, "secret-1")
    ticks, calls = await watch(path)
    kubernetes_swap(tmp_path, "secret-2", 2)
    await ticks.step(2)
    assert calls.count == 1
    [changed] = events(log_buffer, "secret_file_changed")
    assert changed["path"] == str(path) and changed["recovered"] is False
    # a swap that leaves this key as it was (another key of the Secret changed): nothing to do
    kubernetes_swap(tmp_path, "secret-2", 3)
    await ticks.step(3)
    assert calls.count == 1
    kubernetes_swap(tmp_path, "secret-3", 4)
    await ticks.step(2)
    assert calls.count == 2
    assert "secret-2" not in log_buffer.getvalue() and "secret-3" not in log_buffer.getvalue()


async def test_a_touch_without_a_new_secret_calls_nothing(watch: Any, tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("secret-1\n")
    ticks, calls = await watch(path)
    os.utime(path, ns=(1, 1))
    await ticks.step(3)
    path.write_text("secret-1\n")  # rewritten with the same secret
    await ticks.step(3)
    assert calls.count == 0


# --- 2. unusable files: a warning, no call, and a call once usable again ---------------------


def _empty(path: Path) -> str:
    path.write_text("\n")
    return f"{path} is empty"


def _gone(path: Path) -> str:
    path.unlink()
    return f"cannot read {path}: No such file or directory"


def _dangling(path: Path) -> str:
    path.unlink()
    os.symlink(path.parent / "nowhere", path)  # chmod 000 stops nobody when the tests run as root
    return f"cannot read {path}: No such file or directory"


def _directory(path: Path) -> str:
    path.unlink()
    path.mkdir()
    return f"{path} is a directory, not a file"


def _fifo(path: Path) -> str:
    path.unlink()
    os.mkfifo(path)  # reading it would block the event loop until a writer came
    return f"{path} is not a regular file"


def _restore(path: Path, value: str) -> None:
    if path.is_symlink() or path.is_fifo():
        path.unlink()
    elif path.is_dir():
        path.rmdir()
    path.write_text(value + "\n")


@pytest.mark.parametrize("breaks", [_empty, _gone, _dangling, _directory, _fifo])
async def test_an_unusable_file_warns_calls_nothing_and_recovery_calls_back(
    watch: Any, tmp_path: Path, log_buffer: io.StringIO, breaks: Callable[[Path], str]
) -> None:
    path = tmp_path / "secret"
    path.write_text(CLIENT_SECRET + "\n")
    ticks, calls = await watch(path)
    reason = breaks(path)
    await ticks.step(4)
    assert calls.count == 0
    [warning] = events(log_buffer, "secret_file_unusable")  # once, not at every look
    assert warning["level"] == "warning" and warning["reason"] == reason and warning["path"] == str(path)
    # back, with the very secret it held before: a token request may have failed meanwhile
    _restore(path, CLIENT_SECRET)
    await ticks.step(2)
    assert calls.count == 1
    [changed] = events(log_buffer, "secret_file_changed")
    assert changed["recovered"] is True
    assert CLIENT_SECRET not in log_buffer.getvalue()


async def test_a_kubernetes_secret_that_loses_its_key_and_gets_it_back(watch: Any, tmp_path: Path, log_buffer: io.StringIO) -> None:
    path = kubernetes_secret(tmp_path, "secret-1")
    ticks, calls = await watch(path)
    kubernetes_swap(tmp_path, None, 2)
    await ticks.step(2)
    assert calls.count == 0
    [warning] = events(log_buffer, "secret_file_unusable")
    assert warning["reason"] == f"cannot read {path}: No such file or directory"
    kubernetes_swap(tmp_path, "secret-2", 3)
    await ticks.step(2)
    assert calls.count == 1


async def test_a_file_unusable_from_the_start_warns_and_calls_back_once_fixed(
    watch: Any, tmp_path: Path, log_buffer: io.StringIO
) -> None:
    path = tmp_path / "secret"
    path.write_text("")
    ticks, calls = await watch(path)
    assert [e["reason"] for e in events(log_buffer, "secret_file_unusable")] == [f"{path} is empty"]
    path.write_text("now-set")
    await ticks.step(2)
    assert calls.count == 1


# --- 3. the callback's failures, cancellation, the real clock ---------------------------------


async def test_a_failing_callback_is_logged_and_watching_goes_on(watch: Any, tmp_path: Path, log_buffer: io.StringIO) -> None:
    path = tmp_path / "secret"
    path.write_text("secret-1")
    ticks, calls = await watch(path)
    calls.fail = CredentialsRejected("auth endpoint answered 401", status=401, hint="check it")
    path.write_text("secret-two")
    await ticks.step(2)
    [failed] = events(log_buffer, "secret_file_reload_failed")
    assert failed["reason"] == "credentials_rejected"
    calls.fail = None
    path.write_text("secret-three")
    await ticks.step(2)
    assert calls.count == 2


async def test_cancelling_stops_the_watcher_even_inside_the_callback(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("secret-1")
    entered, never = asyncio.Event(), asyncio.Event()

    async def slow() -> None:
        entered.set()
        await never.wait()

    ticks = Ticks()
    task = asyncio.create_task(SecretFileWatcher(str(path), slow, sleep=ticks.sleep).run())
    await ticks.parked()
    path.write_text("secret-two")
    await ticks.step()
    await ticks.release()  # the second look, which calls back, and the callback hangs
    await asyncio.wait_for(entered.wait(), PATIENCE)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_with_the_real_clock_a_change_is_noticed_within_a_few_intervals(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("secret-1")
    calls = Calls()
    watcher = SecretFileWatcher(str(path), calls, interval=0.02)  # its first look is taken here
    task = asyncio.create_task(watcher.run())
    try:
        path.write_text("secret-two")
        await asyncio.wait_for(calls.called.wait(), PATIENCE)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert calls.count == 1


def test_a_watcher_wants_a_positive_interval(tmp_path: Path) -> None:
    async def nothing() -> None:
        pass

    with pytest.raises(ValueError, match="interval"):
        SecretFileWatcher(str(tmp_path / "s"), nothing, interval=0)


# --- 4. end to end: serve picks up a rotated secret file without SIGHUP ------------------------


async def test_serve_fetches_a_token_with_a_rotated_secret_without_sighup(
    command: MakeCommand, fake: FakeNdovu, tmp_path: Path
) -> None:
    """Kubernetes rotates the Secret: the API accepts only the new secret from then on, and
    the mounted file changes by the `..data` swap. /tokenz shows a new generation soon after."""
    volume = tmp_path / "volume"
    volume.mkdir()
    path = kubernetes_secret(volume, CLIENT_SECRET + "\n")
    cmd = await command("serve", env=proxy_env(fake, NDOVU_CLIENT_SECRET_FILE=str(path))).start()
    _, admin = await cmd.listening()
    await cmd.event("token_acquired")
    rotated = "rotated/+=secret-2"
    fake.client_secret = rotated
    kubernetes_swap(volume, rotated + "\n", 2)
    acquired = await cmd.wait_for(lambda e: isinstance(e, dict) and e.get("event") == "token_acquired"
                                  and e.get("generation") == 2, timeout=10)
    assert acquired["generation"] == 2
    async with aiohttp.ClientSession() as http, http.get(f"http://{admin}/tokenz") as resp:
        state = await resp.json()
    assert state["generation"] == 2 and state["last_error"] is None
    assert fake.auth_calls == 2  # one at start, one for the rotation: no failed attempt between
    cmd.signal(signal.SIGTERM)
    assert await cmd.wait() == 0
    assert rotated not in cmd.output()
    assert_no_secrets(cmd.output(), fake)
