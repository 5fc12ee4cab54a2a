"""Every error ndovu-proxy raises, in one tree.

    Exception
    ├── ConfigError           bad settings; `serve` exits 1 naming the key
    ├── SecretFileError       the client secret file cannot be read, or is empty
    ├── AuthError             a token request failed (proxy.ndovu maps Ndovu's answers here)
    │   ├── CredentialsRejected   401 or 400 from the auth endpoint
    │   ├── SecretUnreadable      the client secret file went missing, unreadable or empty
    │   ├── RateLimited           429, with the Retry-After it gave
    │   ├── AuthUnreachable       connect failure, reset, timeout or a 5xx
    │   └── BadAuthResponse       any other status, or a 200 that is not a usable token
    └── ProxyError            an answer the proxy makes itself (SPEC "Errors the proxy itself makes")
        ├── TokenUnavailable      503 token_unavailable, with Retry-After
        ├── UpstreamUnreachable   502 upstream_unreachable
        ├── UpstreamTimeout       504 upstream_timeout
        ├── BadRequest            400 bad_request
        ├── PathNotAllowed        403 path_not_allowed
        ├── ClientNotAllowed      403 client_not_allowed
        ├── BodyTooLarge          413 body_too_large
        ├── MethodNotAllowed      405 method_not_allowed
        ├── HeadersTooLarge       431 headers_too_large
        ├── RequestTimeout        408 request_timeout
        └── InternalError         500 internal_error (a bug in the proxy)

`AuthError.kind` is the short name shown as `last_error` on /tokenz and as `reason` in logs.
No message in this tree ever carries a token or a secret.
"""

from __future__ import annotations


class ConfigError(Exception):
    """A setting is missing or wrong; `key` is its dotted name, e.g. `upstream.url`."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class SecretFileError(Exception):
    """`auth.client_secret_file` cannot be used; `reason` says why in plain words."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(reason)
        self.path = path
        self.reason = reason


class AuthError(Exception):
    kind = "bad_response"
    #: the metric label of ndovu_proxy_token_fetches_total{result}
    result = "error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class CredentialsRejected(AuthError):
    kind = "credentials_rejected"
    result = "rejected"

    def __init__(self, detail: str, *, status: int, hint: str) -> None:
        super().__init__(detail)
        self.status = status
        self.hint = hint


class SecretUnreadable(AuthError):
    """The secret file could not be read for a token request: the operator's to fix, not the
    auth endpoint's answer (no request was sent)."""

    kind = "secret_unreadable"


class RateLimited(AuthError):
    kind = "rate_limited"

    def __init__(self, detail: str, *, retry_after: float | None) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class AuthUnreachable(AuthError):
    kind = "auth_unreachable"


class BadAuthResponse(AuthError):
    kind = "bad_response"


class ProxyError(Exception):
    """An error answered by the proxy itself: `status`, and `code` in body and header."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TokenUnavailable(ProxyError):
    status = 503
    code = "token_unavailable"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = max(1, retry_after)


class UpstreamUnreachable(ProxyError):
    status = 502
    code = "upstream_unreachable"


class UpstreamTimeout(ProxyError):
    status = 504
    code = "upstream_timeout"


class BadRequest(ProxyError):
    status = 400
    code = "bad_request"


class PathNotAllowed(ProxyError):
    status = 403
    code = "path_not_allowed"


class ClientNotAllowed(ProxyError):
    status = 403
    code = "client_not_allowed"


class BodyTooLarge(ProxyError):
    status = 413
    code = "body_too_large"


class MethodNotAllowed(ProxyError):
    status = 405
    code = "method_not_allowed"


class HeadersTooLarge(ProxyError):
    status = 431
    code = "headers_too_large"


class RequestTimeout(ProxyError):
    status = 408
    code = "request_timeout"


class InternalError(ProxyError):
    status = 500
    code = "internal_error"
