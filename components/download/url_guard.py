"""The opener that img2dataset's fetches go through (urllib's global one: img2dataset calls urlopen), installed in
the stage's process and in every download worker. It refuses what could reach inside the network or exhaust memory:

- Schemes other than http(s) (file only when allowed) and private, loopback, link-local (cloud metadata at
  169.254.169.254 included), shared (100.64.0.0/10), multicast, reserved and unspecified addresses, except
  `allowed_networks`. What a URL says (scheme, an address literal, localhost) is checked before anything is looked up:
  the stage vets every URL so, without a lookup per URL. A host name is then resolved once per connection, every
  answer vetted, and the socket connected to a vetted address, on every hop of a redirect: no second lookup is left
  for DNS rebinding to answer differently. The connection keeps the host name (Host header, TLS SNI and certificate).
- Proxies: only `proxy` (download.proxy), never HTTP(S)_PROXY from the environment. Through a proxy, what each URL
  says is still checked here, but the proxy resolves the host names: refusing the internal addresses it resolves is
  the proxy's job. (A host that NO_PROXY exempts is fetched directly, and vetted as without a proxy.)
- A body over `max_body_bytes` (by Content-Length, else as it is read: `file_too_large`, hub_load's name for a file
  over its cap), and an image whose header (read by Pillow, nothing decoded) states more than `max_image_area` pixels
  or is no image Pillow knows, before img2dataset decodes it. What img2dataset then gets is faithful.for_img2dataset's:
  the body as sent, or a lossless PNG of cnpipe.images' decode where OpenCV would decode it otherwise (conversions
  kept in `conversions` by URL, for the worker to report), with decode_rgb's reason for a body that is no usable image.

Every failure is a FetchFailed whose message is a fixed reason token (`cnpipe-fetch: http_404`) computed from the
exception's type or HTTP status, never the URL's text: the stage reads its rejection reasons from it.
"""
from __future__ import annotations

import dataclasses
import functools
import http.client
import ipaddress
import json
import os
import re
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

ENV_VAR = "CNPIPE_URL_POLICY"
TOKEN = "cnpipe-fetch: "
_TOKEN = re.compile(re.escape(TOKEN) + r"([a-z0-9_]+)(?: \(|$)")


class UnsafeUrl(ValueError):
    def __init__(self, reason: str, detail: str, address=None):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.address = address


class GuardMissing(RuntimeError):
    """No URL policy where one must be: nothing may be downloaded unguarded."""


class FetchFailed(urllib.error.URLError):
    """A failed fetch as img2dataset records it (str(err)): a reason token, and a detail that never holds the URL."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.detail = detail

    def __str__(self) -> str:
        return TOKEN + self.reason + (f" ({self.detail})" if self.detail else "")


def reason_in(message: str | None) -> str | None:
    """The reason a FetchFailed message starts with; None for any other text."""
    match = _TOKEN.match(message or "")
    return match.group(1) if match else None


# (exception types, reason) in order: socket.timeout is TimeoutError, ssl errors and InvalidURL are OSError/HTTPException
_REASONS = (
    (TimeoutError, "timeout"),
    (socket.gaierror, "dns_failure"),
    ((ssl.SSLError, ssl.CertificateError), "tls_error"),
    ((http.client.InvalidURL, UnicodeError), "invalid_url"),
    ((OSError, http.client.HTTPException), "connection_error"),
)


# getaddrinfo's answers that the name does not exist (NXDOMAIN, no address records); EAI_AGAIN and the rest say
# that the lookup itself failed (dns_failure, which the stage retries)
_NO_SUCH_HOST = {code for code in (getattr(socket, "EAI_NONAME", None), getattr(socket, "EAI_NODATA", None)) if code}


def reason_of(err: BaseException) -> tuple[str, str]:
    """(reason, detail) of an exception raised while fetching, from its type and HTTP status alone."""
    if isinstance(err, FetchFailed):
        return err.reason, err.detail
    if isinstance(err, UnsafeUrl):
        return err.reason, str(err.address or "")
    if isinstance(err, urllib.error.HTTPError):
        return f"http_{err.code}", ""
    if isinstance(err, urllib.error.URLError):  # urllib's wrapper of the exception, or its own refusal in words
        return reason_of(err.reason) if isinstance(err.reason, BaseException) else ("download_error", "URLError")
    if isinstance(err, socket.gaierror) and err.errno in _NO_SUCH_HOST:
        return "unknown_host", type(err).__name__  # the name does not exist: final, unlike a lookup that failed
    for types, reason in _REASONS:
        if isinstance(err, types):
            return reason, type(err).__name__
    return "download_error", type(err).__name__


@dataclass
class UrlPolicy:
    allow_file_urls: bool = False
    allowed_networks: list[str] = field(default_factory=list)
    proxy: str = ""  # http(s)://host:port that every fetch goes through; it vets the addresses it resolves
    max_body_bytes: int = 32 * 2**20
    max_image_area: int = 89_478_485

    @classmethod
    def from_config(cls, cfg) -> "UrlPolicy":
        """From a DownloadConfig."""
        return cls(cfg.allow_file_urls, list(cfg.allowed_networks), cfg.proxy, cfg.max_body_bytes, cfg.max_image_area)

    def check(self, url: str, resolve: bool = True) -> None:
        """Raise UnsafeUrl(reason) unless `url` may be fetched. With resolve=False only what the URL says is checked
        (scheme, an address literal, localhost); any other host name passes, to be vetted as it is connected to."""
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as err:
            raise UnsafeUrl("invalid_url", str(err)) from None
        if parts.scheme == "file":
            if not self.allow_file_urls:
                raise UnsafeUrl("unsupported_scheme", "file URLs are off (download.allow_file_urls)")
            return
        if parts.scheme not in ("http", "https"):
            raise UnsafeUrl("unsupported_scheme", parts.scheme or "no scheme")
        if not parts.hostname:
            raise UnsafeUrl("invalid_url", "no host")
        if _stated_address(parts.hostname) is not None or resolve:
            try:
                self.addresses(parts.hostname, port)
            except (socket.gaierror, UnicodeError) as err:
                raise UnsafeUrl("dns_failure", f"{parts.hostname}: {err}") from None

    def addresses(self, host: str, port: int) -> list[str]:
        """The addresses to connect to for `host`: resolved once (an address literal or localhost is not looked up),
        and every one vetted, UnsafeUrl if any is internal."""
        stated = _stated_address(host)
        if stated is not None:
            found = [str(stated)]
        else:
            found = [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
        for text in found:
            address = ipaddress.ip_address(text.split("%")[0])
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            # not is_global adds shared address space 100.64.0.0/10 (Alibaba Cloud's metadata is 100.100.100.200)
            internal = (address.is_private or address.is_loopback or address.is_link_local or address.is_multicast
                        or address.is_reserved or address.is_unspecified or not address.is_global)
            if internal and not any(address in ipaddress.ip_network(n, strict=False) for n in self.allowed_networks):
                raise UnsafeUrl("unsafe_address", f"{host} resolves to {address}", address)
        return found

    def is_proxy(self, host: str, port: int) -> bool:
        if not self.proxy:
            return False
        parts = urllib.parse.urlsplit(self.proxy)
        return (host.lower(), port) == ((parts.hostname or "").lower(), parts.port)

    def to_env(self) -> str:
        return json.dumps(dataclasses.asdict(self))


def _stated_address(host: str):
    """The address a host name states without DNS: an IP literal, or loopback for localhost (RFC 6761)."""
    if host == "localhost" or host.endswith(".localhost"):
        return ipaddress.ip_address("127.0.0.1")
    try:
        return ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return None


# ---------------------------------------------------------------- the opener

def _connect(policy: UrlPolicy, address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None) -> socket.socket:
    """http.client's socket creation: one lookup, every answer vetted, the socket connected to a vetted address."""
    host, port = address
    if policy.is_proxy(host, port):
        return socket.create_connection(address, timeout, source_address)
    error = None
    for ip in policy.addresses(host, port):
        try:
            return socket.create_connection((ip, port), timeout, source_address)
        except OSError as err:
            error = err
    raise error or OSError(f"no address for {host}")


class _VettedConnections:
    """For urllib's HTTP(S) handlers: each connection (each hop of a redirect) connects through _connect."""

    def __init__(self, policy: UrlPolicy):
        super().__init__()
        self.policy = policy

    def do_open(self, http_class, req, **kwargs):
        def connection(host, **conn_args):
            conn = http_class(host, **conn_args)
            conn._create_connection = functools.partial(_connect, self.policy)
            return conn

        return super().do_open(connection, req, **kwargs)


class _HTTPHandler(_VettedConnections, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_VettedConnections, urllib.request.HTTPSHandler):
    pass


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.redirected = True  # GuardedOpener.open vets it as any URL, and names its refusal unsafe_redirect
        return new


class GuardedOpener(urllib.request.OpenerDirector):
    """urllib's opener with the handlers img2dataset needs, guarded; policy None refuses everything."""

    def __init__(self, policy: UrlPolicy | None):
        super().__init__()
        self.policy = policy
        policy = policy or UrlPolicy()
        proxies = {"http": policy.proxy, "https": policy.proxy} if policy.proxy else {}  # {}: none from the environment
        for handler in (urllib.request.ProxyHandler(proxies), urllib.request.UnknownHandler(), _HTTPHandler(policy),
                        _HTTPSHandler(policy), urllib.request.HTTPDefaultErrorHandler(), _RedirectHandler(),
                        urllib.request.HTTPErrorProcessor(), *([urllib.request.FileHandler()] if policy.allow_file_urls else [])):
            self.add_handler(handler)

    def open(self, fullurl, data=None, timeout=socket._GLOBAL_DEFAULT_TIMEOUT):
        req = fullurl if isinstance(fullurl, urllib.request.Request) else urllib.request.Request(fullurl, data)
        try:
            if self.policy is None:
                raise FetchFailed("no_url_policy")
            self.policy.check(req.full_url, resolve=False)  # a host name's addresses are vetted as it is connected to
            response = super().open(req, data, timeout)
            length = (response.headers.get("Content-Length") or "").strip()
            if length.isdigit() and int(length) > self.policy.max_body_bytes:
                response.close()
                raise FetchFailed("file_too_large", f"Content-Length {length} > {self.policy.max_body_bytes}")
        except Exception as err:
            if isinstance(err, urllib.error.HTTPError):
                err.close()
            reason, detail = reason_of(err)
            if isinstance(err, UnsafeUrl) and getattr(req, "redirected", False):
                reason = "unsafe_redirect"
            raise FetchFailed(reason, detail) from err
        body = response if isinstance(response, CappedBody) else CappedBody(response, self.policy)
        body.asked_url = req.full_url  # the outermost open (a redirect's hop opens inside it) names the URL asked for
        return body


# conversions faithful.for_img2dataset made in this process, by the URL img2dataset asked for: set by its download
# threads, taken by the worker after each task (img2dataset's output has no column for them)
conversions: dict[str, dict[str, int]] = {}


def take_conversions() -> dict[str, dict[str, int]]:
    """The conversions recorded since the last call, forgotten here."""
    taken = dict(conversions)
    for url in taken:
        conversions.pop(url, None)
    return taken


class CappedBody:
    """A response whose body is read up to max_body_bytes; read whole (as img2dataset reads it), it must also be an
    image whose header states at most max_image_area pixels, so that nothing larger is ever decoded, and what the
    read returns is faithful.for_img2dataset's bytes."""

    def __init__(self, response, policy: UrlPolicy):
        self._response = response
        self._policy = policy
        self.asked_url = ""  # what conversions are recorded under (not the response's own url: a redirect's target)
        self._seen = 0

    def __getattr__(self, name):
        return getattr(self._response, name)

    def __enter__(self) -> "CappedBody":
        return self

    def __exit__(self, *exc) -> None:
        self._response.close()

    def read(self, amt: int | None = None) -> bytes:
        cap, whole, started = self._policy.max_body_bytes, amt is None or amt < 0, self._seen > 0
        left = cap + 1 - self._seen
        try:
            body = self._read_up_to(left) if whole else self._response.read(min(amt, left))
        except Exception as err:
            raise FetchFailed(*reason_of(err)) from err
        self._seen += len(body)
        if self._seen > cap:
            self._response.close()
            raise FetchFailed("file_too_large", f"over {cap} bytes")
        if whole and not started:
            body = self._faithful(body)
        return body

    def _faithful(self, body: bytes) -> bytes:
        from cnpipe.images import ImageRejected
        from components.download import faithful

        try:
            body, notes = faithful.for_img2dataset(body, self._policy.max_image_area)
        except ImageRejected as err:
            raise FetchFailed(err.reason, err.detail) from err
        except Exception as err:  # what decode_rgb raises unnamed (metadata Pillow chokes on): no image to keep
            raise FetchFailed("corrupt_image", type(err).__name__) from err
        if notes:
            conversions[self.asked_url] = dict(notes)
        return body

    def _read_up_to(self, size: int) -> bytes:
        chunks = []
        while size > 0 and (chunk := self._response.read(min(size, 2**20))):
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)


# ---------------------------------------------------------------- installing it

def install(policy: UrlPolicy | None) -> None:
    """Make urllib (which img2dataset uses) fetch through GuardedOpener(policy)."""
    urllib.request.install_opener(GuardedOpener(policy))


def install_from_env() -> UrlPolicy | None:
    """Install the policy the stage put in CNPIPE_URL_POLICY. Fails closed: without one, every fetch is refused
    (and require_policy raises GuardMissing), never made unguarded."""
    text = os.environ.get(ENV_VAR, "")
    try:
        policy = UrlPolicy(**json.loads(text)) if text else None
    except (ValueError, TypeError) as err:
        raise GuardMissing(f"{ENV_VAR} holds no URL policy: {err}") from None
    install(policy)
    return policy


def require_policy() -> UrlPolicy:
    """The policy urllib's opener enforces in this process; GuardMissing if none (then nothing may be downloaded)."""
    opener = urllib.request._opener  # what urlopen uses
    policy = opener.policy if isinstance(opener, GuardedOpener) else None
    if policy is None:
        raise GuardMissing(f"download worker {os.getpid()} has no URL policy ({ENV_VAR} did not reach it): "
                           "refusing to download unguarded")
    return policy
