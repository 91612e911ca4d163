"""clip-retrieval's API (knn_service.KnnApi) on aiohttp, for `serve-index`: one event loop instead of a thread per
connection, and llhttp's C parser instead of http.server's email parser. On 2 cores it spends about half the CPU
per query of the threaded server (bench/knn_index.py), so more of the cores are left for searching. Searches still
go through the index's batching thread; a text query is embedded in the loop's thread pool.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import threading

from aiohttp import web

from components.laion_retrieval.knn_service import KnnApi, Search


def _json(status: int, payload) -> web.Response:
    return web.Response(status=status, body=json.dumps(payload).encode(), content_type="application/json")


def make_app(api: KnnApi) -> web.Application:
    async def get(request: web.Request) -> web.Response:
        return _json(*api.get(request.path))

    async def post(request: web.Request) -> web.Response:
        search = api.parse(request.path, await request.read())
        if not isinstance(search, Search):
            return _json(*search)
        try:
            query = search.embedding
            if query is None:
                query = await asyncio.get_running_loop().run_in_executor(None, api.embed_text, search.text)
            found = await asyncio.wrap_future(search.searcher.submit(query, search.k))
        except (ValueError, KeyError, TypeError) as err:
            return _json(400, {"error": str(err)})
        return _json(200, found[: search.n])

    app = web.Application()
    app.router.add_get("/{tail:.*}", get)
    app.router.add_post("/{tail:.*}", post)
    return app


class Server:
    """A running server: its port, and shutdown() as http.server's (it serves from a daemon thread)."""

    def __init__(self, api: KnnApi, host: str, port: int):
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(make_app(api), access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, host, port, backlog=128)
        self.loop.run_until_complete(site.start())
        self.server_address = self.runner.addresses[0]  # (host, port): the port bound for port 0
        threading.Thread(target=self.loop.run_forever, daemon=True, name="knn-http").start()

    def shutdown(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)


def serve(api: KnnApi, host: str = "127.0.0.1", port: int = 0, allow_public_bind: bool = False) -> Server:
    if not allow_public_bind and not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"refusing to bind {host}: the kNN service binds loopback unless allow_public_bind is set")
    return Server(api, host, port)
