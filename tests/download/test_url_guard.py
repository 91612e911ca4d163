"""The download guard: no URL may reach inside the network (private, loopback, link-local and cloud
metadata, shared, IPv6 loopback/ULA, unspecified), no scheme but http(s) (file only when allowed), checked
before download, at connect time and on every redirect of urllib (which img2dataset uses)."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from components.download import url_guard
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
    with pytest.raises(urllib.error.URLError, match="unsafe redirect"):
        urllib.request.urlopen(web.redirect("http://169.254.169.254/"), timeout=5)


def test_connect_time_guard_refuses_without_connecting(web, restore_opener):
    url_guard.install(UrlPolicy())  # loopback not allowed
    with pytest.raises(urllib.error.URLError, match="refused"):
        urllib.request.urlopen(web.url("/good.jpg"), timeout=5)
    started = time.monotonic()
    with pytest.raises(urllib.error.URLError, match="unsafe_address"):
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
    assert "unsafe redirect to http://169.254.169.254/latest/meta-data/" in str(err.value)
    assert time.monotonic() - started < 5  # refused, not attempted
    for target in ("http://10.0.0.1/", "http://[::1]/", "http://100.100.100.200/"):
        with pytest.raises(urllib.error.URLError, match="unsafe redirect"):
            urllib.request.urlopen(web.redirect(target), timeout=5)
    with pytest.raises(urllib.error.URLError, match="not allowed"):  # urllib itself never follows these
        urllib.request.urlopen(web.redirect("file:///etc/passwd"), timeout=5)


def test_redirect_out_of_the_allowed_network_never_connects(web, web_elsewhere, restore_opener):
    url_guard.install(UrlPolicy(allowed_networks=["127.0.0.1/32"]))
    with pytest.raises(urllib.error.URLError, match="unsafe redirect"):
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
    with pytest.raises(urllib.error.URLError, match="unsafe_address: images.example.com resolves to 10.0.0.7"):
        urllib.request.urlopen("http://images.example.com/a.jpg", timeout=5)
    assert lookups == ["images.example.com"]
