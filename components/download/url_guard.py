"""Refuse URLs that point inside the network: private, loopback, link-local (cloud metadata at
169.254.169.254 included), shared (100.64.0.0/10), multicast and reserved addresses, and schemes other than http(s)
(file only when allowed). Checked before download (what the URL itself says: no DNS lookups, which would run one
by one over millions of URLs), then resolved at connect time and on every redirect, in the downloading workers.
"""
from __future__ import annotations

import ipaddress
import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

ENV_VAR = "CNPIPE_URL_POLICY"


class UnsafeUrl(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class UrlPolicy:
    allow_file_urls: bool = False
    allowed_networks: list[str] = field(default_factory=list)

    def _allowed(self, address: ipaddress._BaseAddress) -> bool:
        return any(address in ipaddress.ip_network(n, strict=False) for n in self.allowed_networks)

    def check(self, url: str, resolve: bool = True) -> None:
        """Raise UnsafeUrl(reason) unless `url` may be fetched. With resolve=False only what the URL says is
        checked (scheme, an address literal, localhost); any other host name passes, to be resolved at connect time."""
        try:
            parts = urllib.parse.urlsplit(url)
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
        addresses = _stated_addresses(parts.hostname)
        if addresses is None:
            if not resolve:
                return
            try:
                infos = socket.getaddrinfo(parts.hostname, parts.port or 80, proto=socket.IPPROTO_TCP)
            except (socket.gaierror, UnicodeError, ValueError) as err:
                raise UnsafeUrl("dns_failure", f"{parts.hostname}: {err}") from None
            addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
        for address in addresses:
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            # not is_global adds shared address space 100.64.0.0/10 (Alibaba Cloud's metadata is 100.100.100.200)
            internal = (address.is_private or address.is_loopback or address.is_link_local or address.is_multicast
                        or address.is_reserved or address.is_unspecified or not address.is_global)
            if internal and not self._allowed(address):
                raise UnsafeUrl("unsafe_address", f"{parts.hostname} resolves to {address}")

    def to_env(self) -> str:
        return json.dumps({"allow_file_urls": self.allow_file_urls, "allowed_networks": self.allowed_networks})


def _stated_addresses(host: str) -> list | None:
    """The address a host name states without DNS: an IP literal, or loopback for localhost (RFC 6761)."""
    if host == "localhost" or host.endswith(".localhost"):
        return [ipaddress.ip_address("127.0.0.1")]
    try:
        return [ipaddress.ip_address(host.split("%")[0])]
    except ValueError:
        return None


class _GuardedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, policy: UrlPolicy):
        self.policy = policy

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        try:
            self.policy.check(newurl)
        except UnsafeUrl as err:
            raise urllib.error.URLError(f"unsafe redirect to {newurl}: {err}") from None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _guarded(handler_cls, policy: UrlPolicy):
    class Guarded(handler_cls):
        def do_open(self, http_class, req, **kwargs):
            try:
                policy.check(req.full_url)
            except UnsafeUrl as err:
                raise urllib.error.URLError(f"refused {req.full_url}: {err}") from None
            return super().do_open(http_class, req, **kwargs)

    return Guarded


def install(policy: UrlPolicy) -> None:
    """Make urllib (which img2dataset uses) check every connection and redirect against `policy`."""
    handlers = [_GuardedRedirects(policy), _guarded(urllib.request.HTTPHandler, policy)()]
    handlers.append(_guarded(urllib.request.HTTPSHandler, policy)())
    urllib.request.install_opener(urllib.request.build_opener(*handlers))


def install_from_env() -> None:
    if os.environ.get(ENV_VAR):
        install(UrlPolicy(**json.loads(os.environ[ENV_VAR])))

