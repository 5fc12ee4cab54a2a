"""The HTTP/1.1 wire: the proxy's server side and its client pool, behind small interfaces.

- `Listener(handler, ...)` hands each `Request` to the handler, which answers through
  `Request.respond()` or `start()`/`write()`/`end()`, with headers as name/value pairs.
- `Pool(url, ...).send(...)` returns a `Response` or raises an `errors.OriginError`.

Nothing above this package touches a parser, a transport or bytes on the wire, so the
server or the client can be swapped by changing this package alone.
"""

from __future__ import annotations

from proxy.wire import errors
from proxy.wire.http import HTTP_10, HTTP_11, NO_BODY, Headers
from proxy.wire.pool import Pool, RequestBody, Response
from proxy.wire.listener import Handler, Listener
from proxy.wire.request import Request
from proxy.wire.server import MALFORMED
from proxy.wire.stream import Body

__all__ = ["HTTP_10", "HTTP_11", "MALFORMED", "NO_BODY", "Body", "Handler", "Headers", "Listener", "Pool", "Request",
           "RequestBody", "Response", "errors"]
