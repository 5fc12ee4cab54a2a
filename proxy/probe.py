"""`python -m proxy.probe [URL]`: exit 0 when the admin listener says ready, 1 otherwise.

The container's HEALTHCHECK, with no curl in the image. Without URL it asks
http://<admin_listen>/readyz, a 0.0.0.0 or :: listener reached on loopback.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

from proxy.config import DEFAULTS, ENV_KEYS, parse_address


def readyz_url(admin_listen: str) -> str:
    addr = parse_address(admin_listen)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(addr.host, addr.host)
    return f"http://[{host}]:{addr.port}/readyz" if ":" in host else f"http://{host}:{addr.port}/readyz"


def main(argv: list[str]) -> int:
    if argv:
        url = argv[0]
    else:
        var = next(k for k, v in ENV_KEYS.items() if v == "admin_listen")
        url = readyz_url(os.environ.get(var) or str(DEFAULTS["admin_listen"]))
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:  # noqa: S310 - a local admin URL
            return 0 if resp.status == 200 else 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"not ready: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
