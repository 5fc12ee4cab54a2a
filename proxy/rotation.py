"""Noticing a rotated client secret file, as Kubernetes rotates a mounted Secret.

A Secret volume holds `dir/secret -> ..data/secret` and `..data -> ..2026_12_01_xx`; the kubelet
writes a new timestamped directory and swaps `..data` by renaming a new symlink over it, so the
path never changes while the file behind it does. A plain rewrite keeps the inode and changes
mtime and size. Both show in `os.stat` (which follows symlinks) and `os.path.realpath`, which is
all this polls: no inotify, no new dependency.

`SecretFileWatcher(path, on_change)` calls the
async `on_change` (the token cache's `refresh_now()`, what SIGHUP does) within a few seconds of
a change. Invariants:

- One look every `interval` seconds (default 1): the file's signature is its real path and
  `(st_dev, st_ino, st_mode, st_size, st_mtime_ns)`, or the error `os.stat` gave. The first
  look is taken when the watcher is made, so make it before the token refresher starts: a
  change after that is never missed.
- A changed signature is acted on once it has been the same at two looks in a row, so a
  file caught half-written is not read: `on_change` runs within 2 × `interval` of the last
  write (plus its own duration). A file that never stops changing is never read.
- When acting, the file is read with `proxy.config.read_secret_file`. Unusable (missing,
  unreadable, a directory, not a regular file, empty): the warning `secret_file_unusable` with
  the plain-words reason, once per change, and no call. Usable: `on_change` runs if the
  content differs from the last usable content seen, or if the file was unusable before (a
  token request may have failed meanwhile); a touch, or Kubernetes swapping `..data` for a
  change to another key of the Secret, calls nothing.
- The secret is never logged and never kept: only an HMAC of it under a key made per watcher.
  Only a regular file is read (read_secret_file refuses a FIFO, which would block the loop).
- `on_change` runs inline, so never two at once; an exception from it is logged as
  `secret_file_reload_failed` (its `kind`, e.g. `credentials_rejected`) and watching goes on.
- `run()` runs until cancelled; cancel the task and await it at stop. Cancellation reaches
  `on_change` if one is running (`TokenCache.refresh_now` shields its fetch from it).
- `sleep` is injectable, so tests drive the looks without waiting.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
from collections.abc import Awaitable, Callable

import structlog

from proxy.config import read_secret_file
from proxy.errors import SecretFileError

log = structlog.get_logger("proxy.rotation")

#: seconds between two looks at the file
DEFAULT_INTERVAL = 1.0

#: what one look saw: the real path and the stat fields that change when the file does, or the
#: real path and the error (errno) that os.stat raised
Signature = tuple[str, int, int, int, int, int] | tuple[str, str, int]


class SecretFileWatcher:
    """Calls `on_change` when the secret file at `path` changes to a usable secret (see the
    module docstring for the invariants)."""

    def __init__(
        self,
        path: str,
        on_change: Callable[[], Awaitable[object]],
        *,
        interval: float = DEFAULT_INTERVAL,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        read: Callable[[str], str] = read_secret_file,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be greater than 0")
        self.path = path
        self.interval = interval
        self._on_change = on_change
        self._sleep = sleep
        self._read = read
        self._key = secrets.token_bytes(32)
        self._seen: Signature = self._signature()  # the signature last acted on
        self._pending: Signature | None = None  # a new one, seen once, waiting to settle
        self._digest: bytes | None = None  # of the last usable content
        self.usable = False
        self._evaluate(initial=True)

    async def run(self) -> None:
        """Look every `interval` seconds until cancelled."""
        while True:
            await self._sleep(self.interval)
            if self.poll():
                await self._call()

    def poll(self) -> bool:
        """One look: True when `on_change` is due. Logs `secret_file_unusable` when a settled
        change left the file unusable."""
        signature = self._signature()
        if signature == self._seen:
            self._pending = None  # changed and changed back between two looks
            return False
        if signature != self._pending:
            self._pending = signature  # first sight: let it settle for one interval
            return False
        self._seen, self._pending = signature, None
        return self._evaluate()

    def _signature(self) -> Signature:
        real = os.path.realpath(self.path)
        try:
            st = os.stat(self.path)  # follows symlinks: the file behind ..data
        except OSError as exc:
            return (real, "error", exc.errno or 0)
        return (real, st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns)

    def _evaluate(self, *, initial: bool = False) -> bool:
        """Read the file as it now is; True when `on_change` is due."""
        try:
            value = self._read(self.path)  # a regular file only: never blocks
        except SecretFileError as exc:
            self.usable = False
            log.warning("secret_file_unusable", path=self.path, reason=exc.reason,
                        action="keeping the current token; watching for the file to be fixed")
            return False
        digest = hmac.new(self._key, value.encode(), hashlib.sha256).digest()
        was_usable, self.usable = self.usable, True
        if initial:
            self._digest = digest
            return False
        if was_usable and hmac.compare_digest(digest, self._digest or b""):
            log.debug("secret_file_touched", path=self.path, action="same secret: nothing to do")
            return False
        self._digest = digest
        log.info("secret_file_changed", path=self.path, recovered=not was_usable,
                 action="fetching a token with the new secret")
        return True

    async def _call(self) -> None:
        try:
            await self._on_change()
        except Exception as exc:  # noqa: BLE001 - the token cache logged the failure itself
            log.warning("secret_file_reload_failed", path=self.path, reason=getattr(exc, "kind", type(exc).__name__),
                        action="the current token stays")

