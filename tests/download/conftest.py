"""A loopback web for the download family's tests: good and broken images, a 404, an HTML page, an image
whose X-Robots-Tag opts out of AI use, `/redirect?to=URL` (302) and `/photo/<anything>.jpg` (distinct URLs
of one good image, each answered after `photo_delay_s`), paths made to fail (`failing`: an outage), with a log
of every request it received. It also
answers as an HTTP proxy would (a request line that holds the whole URL), and over TLS when given a context."""
from __future__ import annotations

import io
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image


def jpeg(width: int, height: int, color=(200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class LoopbackWeb:
    def __init__(self, host: str = "127.0.0.1", tls=None):
        self.files = {
            "/good.jpg": ("image/jpeg", jpeg(120, 90)),
            "/tiny.jpg": ("image/jpeg", jpeg(10, 10)),
            "/page.jpg": ("image/jpeg", b"<!doctype html><html><body>an HTML page named .jpg</body></html>"),
            "/opted-out.jpg": ("image/jpeg", jpeg(100, 100, (0, 90, 200))),
        }
        self.headers = {"/opted-out.jpg": {"X-Robots-Tag": "noai"}}
        self.streamed: set[str] = set()  # paths answered without Content-Length: the body ends as the connection closes
        self.requests: list[str] = []  # each request's target: a path, or the whole URL when asked as a proxy
        self.hosts: list[str] = []  # each request's Host header
        self.photo_delay_s = 0.0
        self.failing: dict[str, str] = {}  # path -> "drop" (connection closed, no answer) or an HTTP status to answer
        web = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                web.requests.append(self.path)
                web.hosts.append(self.headers.get("Host", ""))
                path = self.path
                if path.startswith("http://"):  # asked as a proxy
                    parts = urllib.parse.urlsplit(path)
                    path = parts.path + (f"?{parts.query}" if parts.query else "")
                failure = web.failing.get(path)
                if failure == "drop":
                    self.close_connection = True
                    return
                if failure:
                    self.send_error(int(failure))
                    return
                if path.startswith("/redirect?"):
                    target = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)["to"][0]
                    self.send_response(302)
                    self.send_header("Location", target)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if path.startswith("/photo/") and path.endswith(".jpg"):
                    time.sleep(web.photo_delay_s)
                    kind, body = web.files["/good.jpg"]
                elif path not in web.files:
                    self.send_error(404)
                    return
                else:
                    kind, body = web.files[path]
                self.send_response(200)
                self.send_header("Content-Type", kind)
                if path not in web.streamed:
                    self.send_header("Content-Length", str(len(body)))
                for name, value in web.headers.get(path, {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer((host, 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.port = self.server.server_address[1]
        self.base = f"{'https' if tls else 'http'}://{host}:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path

    def redirect(self, target: str) -> str:
        return self.url("/redirect?to=" + urllib.parse.quote(target, safe=""))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def web():
    server = LoopbackWeb()
    yield server
    server.close()


@pytest.fixture
def web_elsewhere():
    """A second server on another loopback address (127.0.0.2): inside 127.0.0.0/8, outside 127.0.0.1/32."""
    server = LoopbackWeb("127.0.0.2")
    yield server
    server.close()


@pytest.fixture
def restore_opener():
    """url_guard.install replaces urllib's global opener; put the default back afterwards."""
    yield
    urllib.request.install_opener(None)
