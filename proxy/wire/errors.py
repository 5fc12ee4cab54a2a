"""The wire layer's own errors, in one small tree; `proxy.forward` maps them to the proxy's.

    Exception
    └── WireError
        ├── ClientBodyError       the app's request body cannot be read to its end
        │   ├── BodyTimeout           no byte of it for the body timeout (408)
        │   ├── BadFraming            its chunks or trailers are malformed (`kind` as in MALFORMED)
        │   └── ClientGone            the app closed its connection
        └── OriginError           the exchange with the origin failed
            ├── ConnectFailed         refused, unreachable, no such host, TLS failed
            ├── OriginTimeout         (also a TimeoutError)
            │   ├── ConnectTimeout        no connection within connect_timeout
            │   ├── ReadTimeout           no byte of the answer for read_timeout
            │   └── WriteTimeout          the origin took no byte of the body for read_timeout
            ├── Disconnected          closed or reset before the answer ended
            │   └── NotSent               closed before the request was written
            └── BadResponse           not valid HTTP/1.1, or a head over the size limit
"""

from __future__ import annotations


class WireError(Exception):
    pass


class ClientBodyError(WireError):
    pass


class BodyTimeout(ClientBodyError):
    pass


class BadFraming(ClientBodyError):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class ClientGone(ClientBodyError):
    pass


class OriginError(WireError):
    pass


class ConnectFailed(OriginError):
    pass


class OriginTimeout(OriginError, TimeoutError):
    pass


class ConnectTimeout(OriginTimeout):
    pass


class ReadTimeout(OriginTimeout):
    pass


class WriteTimeout(OriginTimeout):
    pass


class Disconnected(OriginError):
    """`reset` is True for a reset (ECONNRESET and kin) rather than a clean close."""

    def __init__(self, message: str, *, reset: bool = False) -> None:
        super().__init__(message)
        self.reset = reset


class NotSent(Disconnected):
    pass


class BadResponse(OriginError):
    pass
