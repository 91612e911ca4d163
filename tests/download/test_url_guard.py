"""The download guard: no URL may reach inside the network (private, loopback, link-local and cloud
metadata, shared, IPv6 loopback/ULA, unspecified), no scheme but http(s) (file only when allowed), checked
before download, at connect time and on every redirect of urllib (which img2dataset uses)."""
from __future__ import annotations

import json
import socket
import ssl
import time
import urllib.error
import urllib.request

import pytest

import fake_dns
from components.download import url_guard
from conftest import LoopbackWeb
from components.download.url_guard import UnsafeUrl, UrlPolicy

INTERNAL = [
    "http://10.1.2.3/a.jpg",
    "http://10.255.255.254:8080/",
    "http://172.16.5.4/x.png",
    "http://192.168.1.20/x.jpg",
    "http://127.0.0.1:8080/",
    "http://127.45.6.7/",
    "https://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://169.254.1.1/",
    "http://100.100.100.200/latest/meta-data/",  # shared address space 100.64/10 (Alibaba Cloud metadata)
    "http://[::1]/",
    "http://[::1]:9000/image.jpg",
    "http://[fd00::1]/",  # IPv6 unique local
    "http://[fe80::1]/",  # IPv6 link-local
    "http://[::ffff:127.0.0.1]/",  # IPv4-mapped loopback
    "http://[::ffff:169.254.169.254]/",
    "http://0.0.0.0/",
    "http://[::]/",
    "http://224.0.0.1/",  # multicast
    "http://240.0.0.1/",  # reserved
    "http://localhost/",  # a name that resolves to loopback
    "http://localhost:5000/admin",
]

BAD_SCHEMES = [
    "ftp://example.com/a.jpg",
    "file:///etc/passwd",
    "gopher://example.com/1",
    "data:image/png;base64,iVBORw0KGgo=",
    "javascript:alert(1)",
    "//example.com/no-scheme.jpg",
]


@pytest.mark.parametrize("url", INTERNAL)
def test_internal_addresses_are_refused(url):
    with pytest.raises(UnsafeUrl) as err:
        UrlPolicy().check(url)
    assert err.value.reason == "unsafe_address"


@pytest.mark.parametrize("url", BAD_SCHEMES)
def test_other_schemes_are_refused(url):
    with pytest.raises(UnsafeUrl) as err:
        UrlPolicy().check(url)
    assert err.value.reason == "unsupported_scheme"


@pytest.mark.parametrize("url", ["http:///no-host.jpg", "http://[::1/broken"])
def test_malformed_urls_are_refused(url):
    with pytest.raises(UnsafeUrl) as err:
        UrlPolicy().check(url)
    assert err.value.reason == "invalid_url"


@pytest.mark.parametrize("url", ["http://93.184.216.34/a.jpg", "https://8.8.8.8:443/x", "http://[2606:4700:4700::1111]/"])
def test_public_addresses_pass(url):
    UrlPolicy().check(url)  # IP literals: no DNS needed


def test_file_urls_only_when_allowed():
    UrlPolicy(allow_file_urls=True).check("file:///data/images/a.jpg")
    with pytest.raises(UnsafeUrl, match="allow_file_urls"):
        UrlPolicy(allow_file_urls=False).check("file:///data/images/a.jpg")


def test_allowed_networks_exempt_exactly_those_networks():
    loopback = UrlPolicy(allowed_networks=["127.0.0.0/8"])
    loopback.check("http://127.0.0.1:8080/a.jpg")
    loopback.check("http://127.9.9.9/")
    for url in ("http://10.1.2.3/", "http://169.254.169.254/", "http://[::1]/", "http://192.168.0.1/"):
        with pytest.raises(UnsafeUrl):
            loopback.check(url)
    private = UrlPolicy(allowed_networks=["10.0.0.0/8", "::1/128"])
    private.check("http://10.1.2.3/")
    private.check("http://[::1]/")
    with pytest.raises(UnsafeUrl):
        private.check("http://127.0.0.1/")
    with pytest.raises(UnsafeUrl):
        UrlPolicy(allowed_networks=["127.0.0.1/32"]).check("http://127.0.0.2/")


def test_policy_travels_through_the_environment(monkeypatch, web, restore_opener):
    policy = UrlPolicy(allow_file_urls=True, allowed_networks=["127.0.0.0/8"])
    assert UrlPolicy(**json.loads(policy.to_env())) == policy
    monkeypatch.setenv(url_guard.ENV_VAR, policy.to_env())
    url_guard.install_from_env()
    assert urllib.request.urlopen(web.url("/good.jpg"), timeout=5).read() == web.files["/good.jpg"][1]
    with pytest.raises(urllib.error.URLError, match="^cnpipe-fetch: unsafe_redirect"):
        urllib.request.urlopen(web.redirect("http://169.254.169.254/"), timeout=5)


def test_connect_time_guard_refuses_without_connecting(web, restore_opener):
    url_guard.install(UrlPolicy())  # loopback not allowed
    with pytest.raises(urllib.error.URLError, match="^cnpipe-fetch: unsafe_address"):
        urllib.request.urlopen(web.url("/good.jpg"), timeout=5)
    started = time.monotonic()
    with pytest.raises(urllib.error.URLError, match="^cnpipe-fetch: unsafe_address"):
        urllib.request.urlopen("http://10.255.255.1/a.jpg", timeout=30)  # would hang until the timeout if tried
    assert time.monotonic() - started < 5
    assert web.requests == []


def test_redirects_are_checked_against_the_policy(web, web_elsewhere, restore_opener):
    url_guard.install(UrlPolicy(allowed_networks=["127.0.0.0/8"]))
    good = web.files["/good.jpg"][1]
    assert urllib.request.urlopen(web.url("/good.jpg"), timeout=5).read() == good  # direct loopback: allowed
    assert urllib.request.urlopen(web.redirect(web.url("/good.jpg")), timeout=5).read() == good  # loopback -> loopback
    assert web.requests[-2:] == ["/redirect?to=" + urllib.parse.quote(web.url("/good.jpg"), safe=""), "/good.jpg"]

    started = time.monotonic()
    with pytest.raises(urllib.error.URLError) as err:
        urllib.request.urlopen(web.redirect("http://169.254.169.254/latest/meta-data/"), timeout=30)
    assert str(err.value) == "cnpipe-fetch: unsafe_redirect (169.254.169.254)"
    assert time.monotonic() - started < 5  # refused, not attempted
    for target in ("http://10.0.0.1/", "http://[::1]/", "http://100.100.100.200/"):
        with pytest.raises(urllib.error.URLError, match="^cnpipe-fetch: unsafe_redirect"):
            urllib.request.urlopen(web.redirect(target), timeout=5)
    with pytest.raises(urllib.error.URLError, match="^cnpipe-fetch: unsafe_redirect"):
        urllib.request.urlopen(web.redirect("ftp://example.com/a.jpg"), timeout=5)
    with pytest.raises(urllib.error.URLError, match="^cnpipe-fetch: http_302$"):  # urllib itself never follows these
        urllib.request.urlopen(web.redirect("file:///etc/passwd"), timeout=5)


def test_redirect_out_of_the_allowed_network_never_connects(web, web_elsewhere, restore_opener):
    url_guard.install(UrlPolicy(allowed_networks=["127.0.0.1/32"]))
    with pytest.raises(urllib.error.URLError, match="^cnpipe-fetch: unsafe_redirect"):
        urllib.request.urlopen(web.redirect(web_elsewhere.url("/good.jpg")), timeout=5)
    assert web_elsewhere.requests == []
    url_guard.install(UrlPolicy(allowed_networks=["127.0.0.0/8"]))  # the same redirect inside the allowed network
    assert urllib.request.urlopen(web.redirect(web_elsewhere.url("/good.jpg")), timeout=5).read() == web.files["/good.jpg"][1]
    assert web_elsewhere.requests == ["/good.jpg"]


def test_up_front_check_looks_nothing_up_and_the_connect_time_check_resolves(monkeypatch, restore_opener):
    """The stage vets every URL before download without DNS (a lookup per URL, one after another, would stall a
    batch of thousands); a host name is resolved, and refused if internal, when a worker connects."""
    lookups = []

    def resolver(host, *args, **kwargs):
        lookups.append(host)
        return [(2, 1, 6, "", ("10.0.0.7", 80))]  # the name points inside the network

    monkeypatch.setattr(url_guard.socket, "getaddrinfo", resolver)
    policy = UrlPolicy()
    policy.check("http://images.example.com/a.jpg", resolve=False)
    for url in ("http://10.1.2.3/a.jpg", "http://localhost:5000/", "http://a.localhost/", "http://[::1]/"):
        with pytest.raises(UnsafeUrl) as err:
            policy.check(url, resolve=False)
        assert err.value.reason == "unsafe_address"
    assert lookups == []
    url_guard.install(policy)
    with pytest.raises(urllib.error.URLError, match=r"^cnpipe-fetch: unsafe_address \(10.0.0.7\)$"):
        urllib.request.urlopen("http://images.example.com/a.jpg", timeout=5)
    assert lookups == ["images.example.com"]


def test_a_host_name_is_resolved_once_and_connected_to_at_the_vetted_address(tmp_path, monkeypatch, web, restore_opener):
    """DNS rebinding: the first lookup gives a public address, any later one loopback. The connection goes to the
    address that was vetted (refused by the test network), and loopback never sees a request."""
    network = fake_dns.FakeNetwork({"rebind.test": [fake_dns.PUBLIC, "127.0.0.1"],
                                    "both.test": [[fake_dns.PUBLIC, "127.0.0.1"]]}, tmp_path / "connected.log")
    monkeypatch.setattr(socket, "getaddrinfo", network.getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", network.create_connection)
    url_guard.install(UrlPolicy())
    with pytest.raises(urllib.error.URLError, match=r"^cnpipe-fetch: connection_error \(ConnectionRefusedError\)$"):
        urllib.request.urlopen(f"http://rebind.test:{web.port}/good.jpg", timeout=5)
    assert web.requests == [] and network.connected() == [fake_dns.PUBLIC] and network.lookups == {"rebind.test": 1}
    with pytest.raises(urllib.error.URLError, match=r"^cnpipe-fetch: unsafe_address \(127.0.0.1\)$"):
        urllib.request.urlopen(f"http://both.test:{web.port}/good.jpg", timeout=5)  # every answer is vetted
    assert web.requests == [] and network.connected() == [fake_dns.PUBLIC]


def self_signed(tmp_path, name: str) -> tuple[str, str]:
    """A certificate (its own CA) for `name`, and its key: PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_https_keeps_the_host_name_for_sni_the_certificate_and_the_host_header(tmp_path, monkeypatch, restore_opener):
    """The socket is connected to the vetted address, TLS still checks the certificate against the URL's name."""
    cert, key = self_signed(tmp_path, "tls.test")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = LoopbackWeb(tls=context)
    try:
        monkeypatch.setenv("SSL_CERT_FILE", cert)  # the default context trusts this certificate only
        network = fake_dns.FakeNetwork({"tls.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}, tmp_path / "connected.log")
        monkeypatch.setattr(socket, "getaddrinfo", network.getaddrinfo)
        monkeypatch.setattr(socket, "create_connection", network.create_connection)
        url_guard.install(UrlPolicy(allowed_networks=["127.0.0.1/32"]))
        body = urllib.request.urlopen(f"https://tls.test:{server.port}/good.jpg", timeout=5).read()
        assert body == server.files["/good.jpg"][1]
        assert server.hosts == [f"tls.test:{server.port}"] and network.connected() == ["127.0.0.1"]
        with pytest.raises(urllib.error.URLError, match=r"^cnpipe-fetch: tls_error"):  # the same address, another name
            urllib.request.urlopen(f"https://other.test:{server.port}/good.jpg", timeout=5)
    finally:
        server.close()


@pytest.mark.parametrize("value", [None, ""], ids=["missing", "empty"])
def test_without_a_policy_in_the_environment_nothing_is_fetched(monkeypatch, web, restore_opener, value):
    if value is None:
        monkeypatch.delenv(url_guard.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(url_guard.ENV_VAR, value)
    url_guard.install_from_env()
    with pytest.raises(urllib.error.URLError, match="^cnpipe-fetch: no_url_policy$"):
        urllib.request.urlopen(web.url("/good.jpg"), timeout=5)
    assert web.requests == []
    with pytest.raises(url_guard.GuardMissing, match="refusing to download unguarded"):
        url_guard.require_policy()
    monkeypatch.setenv(url_guard.ENV_VAR, "{not json")
    with pytest.raises(url_guard.GuardMissing, match=url_guard.ENV_VAR):
        url_guard.install_from_env()


def test_proxies_come_from_the_policy_only(monkeypatch, web, restore_opener):
    """HTTP_PROXY in the environment is ignored; with policy.proxy the proxy gets every request, private ones
    included (it resolves and vets), while an address literal is still refused here."""
    proxy = LoopbackWeb()
    try:
        monkeypatch.setenv("http_proxy", proxy.base)
        url_guard.install(UrlPolicy(allowed_networks=["127.0.0.1/32"]))
        assert urllib.request.urlopen(web.url("/good.jpg"), timeout=5).read() == web.files["/good.jpg"][1]
        assert proxy.requests == [] and web.requests == ["/good.jpg"]
        url_guard.install(UrlPolicy(proxy=web.base))
        assert urllib.request.urlopen("http://images.example.test/good.jpg", timeout=5).read() == web.files["/good.jpg"][1]
        assert web.requests[-1] == "http://images.example.test/good.jpg" and proxy.requests == []
        with pytest.raises(urllib.error.URLError, match=r"^cnpipe-fetch: unsafe_address \(169.254.169.254\)$"):
            urllib.request.urlopen("http://169.254.169.254/latest/", timeout=5)
    finally:
        proxy.close()


def test_body_cap_and_image_header_check(web, restore_opener):
    web.files["/huge.png"] = ("image/png", _png_of(30000, 20000))
    web.files["/stream.jpg"] = web.files["/good.jpg"]
    web.streamed.add("/stream.jpg")
    size = len(web.files["/good.jpg"][1])
    url_guard.install(UrlPolicy(allowed_networks=["127.0.0.1/32"], max_body_bytes=size))
    assert urllib.request.urlopen(web.url("/stream.jpg"), timeout=5).read() == web.files["/good.jpg"][1]  # exactly the cap
    with pytest.raises(urllib.error.URLError, match="^cnpipe-fetch: decompression_bomb"):
        urllib.request.urlopen(web.url("/huge.png"), timeout=5).read()  # 600 million pixels: over Pillow's own limit too
    url_guard.install(UrlPolicy(allowed_networks=["127.0.0.1/32"], max_body_bytes=size - 1))
    with pytest.raises(urllib.error.URLError, match=r"^cnpipe-fetch: file_too_large \(Content-Length"):
        urllib.request.urlopen(web.url("/good.jpg"), timeout=5)
    with pytest.raises(urllib.error.URLError, match=r"^cnpipe-fetch: file_too_large \(over"):
        urllib.request.urlopen(web.url("/stream.jpg"), timeout=5).read()
    url_guard.install(UrlPolicy(allowed_networks=["127.0.0.1/32"], max_image_area=120 * 90 - 1))
    with pytest.raises(urllib.error.URLError, match=r"^cnpipe-fetch: decompression_bomb \(.*10799 pixels"):
        urllib.request.urlopen(web.url("/good.jpg"), timeout=5).read()
    with pytest.raises(urllib.error.URLError, match="^cnpipe-fetch: not_an_image"):
        urllib.request.urlopen(web.url("/page.jpg"), timeout=5).read()
    web.files["/empty.jpg"] = ("image/jpeg", b"")
    with pytest.raises(urllib.error.URLError, match="^cnpipe-fetch: empty_image"):
        urllib.request.urlopen(web.url("/empty.jpg"), timeout=5).read()


def test_what_img2dataset_reads_is_the_body_as_sent_or_the_decoding_policys_image(web, restore_opener):
    """A plain JPEG is read as it came; a 16-bit PNG (which OpenCV would saturate) as a PNG of decode_rgb's 8-bit RGB,
    and the conversion is recorded under the URL asked for, for the worker to report."""
    import io

    import numpy as np
    from PIL import Image

    from cnpipe.images import decode_rgb

    buffer = io.BytesIO()
    Image.fromarray(np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))).save(buffer, format="PNG")
    web.files["/sixteen.png"] = ("image/png", buffer.getvalue())
    url_guard.install(UrlPolicy(allowed_networks=["127.0.0.1/32"]))
    url_guard.take_conversions()
    assert urllib.request.urlopen(web.url("/good.jpg"), timeout=5).read() == web.files["/good.jpg"][1]
    assert url_guard.take_conversions() == {}
    read = urllib.request.urlopen(web.url("/sixteen.png"), timeout=5).read()
    assert Image.open(io.BytesIO(read)).format == "PNG" and Image.open(io.BytesIO(read)).mode == "RGB"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(read))), np.asarray(decode_rgb(buffer.getvalue())))
    assert url_guard.take_conversions() == {web.url("/sixteen.png"): {"converted_16bit": 1}}
    redirect = web.redirect(web.url("/sixteen.png"))
    assert urllib.request.urlopen(redirect, timeout=5).read() == read
    assert url_guard.take_conversions() == {redirect: {"converted_16bit": 1}}  # under the URL img2dataset asked for


def _png_of(width: int, height: int) -> bytes:
    """A valid PNG header and a stub of data: Pillow reads the size without decoding anything."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
