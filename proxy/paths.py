"""Judging a request path against `allowed_paths`.

The path is judged as the partner API will understand it, not as it was spelled: %-decoded
(%2F and %5C too, repeatedly, so a double-encoded `%252e%252e` cannot hide a dot segment),
backslashes read as slashes, dot segments removed (RFC 3986 §5.2.4). Servers that drop
`;params` from each segment before resolving dot segments (Tomcat, Jetty, Spring) read
`/a/..;/b` as `/b`, so the path is judged that way too, and must pass both ways. The request
itself is forwarded as received; only the verdict uses the normal forms.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

from proxy.errors import BadRequest, PathNotAllowed

_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
#: decoding rounds before giving up on a path that keeps decoding into new escapes
_MAX_ROUNDS = 4


_PARAMS = re.compile(r";[^/]*")


def normalise(raw_path: str) -> str:
    """The path as judged; raises BadRequest when it cannot be decoded."""
    return remove_dot_segments(decode(raw_path))


def decode(raw_path: str) -> str:
    """%-decoded to UTF-8 (repeatedly), backslashes as slashes; dot segments still in."""
    if _BAD_ESCAPE.search(raw_path):
        raise BadRequest("the request path has a malformed %-escape")
    path = raw_path
    for _ in range(_MAX_ROUNDS):
        if not _ESCAPE.search(path):
            break
        try:
            path = unquote_to_bytes(path).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("the request path does not decode to UTF-8") from None
    else:
        if _ESCAPE.search(path):
            raise BadRequest("the request path is encoded too many times")
    if "\x00" in path:
        raise BadRequest("the request path contains NUL")
    return path.replace("\\", "/")


def remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 on an absolute path."""
    out: list[str] = []
    segments = path.split("/")
    for i, seg in enumerate(segments):
        if seg == "..":
            if len(out) > 1:
                out.pop()
        elif seg != ".":
            out.append(seg)
        if seg in (".", "..") and i == len(segments) - 1:
            out.append("")  # "/a/b/.." is "/a/", keeping the trailing slash
    result = "/".join(out)
    return result if result.startswith("/") else "/" + result


def check(raw_path: str, allowed: tuple[str, ...]) -> str:
    """The normalised path if `allowed` admits it, read with and without `;params`; raises
    PathNotAllowed or BadRequest."""
    if "%" not in raw_path and "\\" not in raw_path and "/." not in raw_path and ";" not in raw_path:
        path = raw_path  # nothing to decode, no dot segment, no params: already normal (most requests)
        if allowed and not path.startswith(allowed):
            raise PathNotAllowed("this path is outside the paths the proxy forwards")
        return path
    decoded = decode(raw_path)
    path = remove_dot_segments(decoded)
    if allowed and not (path.startswith(allowed) and remove_dot_segments(_PARAMS.sub("", decoded)).startswith(allowed)):
        raise PathNotAllowed("this path is outside the paths the proxy forwards")
    return path
