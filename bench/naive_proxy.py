"""The aiohttp proxy anyone writes first: the Python baseline of bench/run.py.

It buffers whole bodies both ways and sets a static bearer header. Not part of ndovu-proxy.
    python bench/naive_proxy.py PORT UPSTREAM_URL TOKEN [CA_FILE]
"""

import ssl
import sys

import aiohttp
from aiohttp import web

PORT, UPSTREAM, TOKEN = int(sys.argv[1]), sys.argv[2].rstrip("/"), sys.argv[3]
# an https upstream's CA (bench/run.py makes its own); the session's default pool keeps connections
TLS = ssl.create_default_context(cafile=sys.argv[4]) if len(sys.argv) > 4 else True
HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "host", "authorization", "content-length"}


async def session_ctx(app: web.Application):
    app["session"] = aiohttp.ClientSession(auto_decompress=False, connector=aiohttp.TCPConnector(ssl=TLS))
    yield
    await app["session"].close()


async def handle(request: web.Request) -> web.Response:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    headers["Authorization"] = f"Bearer {TOKEN}"
    body = await request.read()
    async with request.app["session"].request(
        request.method, UPSTREAM + request.path_qs, headers=headers, data=body or None, allow_redirects=False
    ) as resp:
        data = await resp.read()
        out = {k: v for k, v in resp.headers.items() if k.lower() not in HOP}
        return web.Response(status=resp.status, body=data, headers=out)


app = web.Application(client_max_size=64 * 1024 * 1024)
app.cleanup_ctx.append(session_ctx)
app.router.add_route("*", "/{tail:.*}", handle)
web.run_app(app, host="127.0.0.1", port=PORT, access_log=None, print=None)
