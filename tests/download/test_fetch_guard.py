"""The URL guard as the download stage runs it, inside img2dataset's spawned workers: DNS rebinding, proxies,
a worker without its policy, rejection reasons that a URL cannot choose, and bodies and images too large."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

import fake_dns
import pipeline_configs
from components.download import img2dataset_pool, url_guard
from components.download import stage as download
from components.download.url_guard import ENV_VAR
from conftest import LoopbackWeb
from test_download_stage import config, isolated_guard, retrieved  # noqa: F401 (a fixture)

PUBLIC = fake_dns.PUBLIC


@pytest.fixture
def fake_network(tmp_path, monkeypatch):
    """The stage's workers start on a fake_dns network: call it with the answers; it returns the FakeNetwork whose
    connected() lists the addresses the workers connected to."""
    log = tmp_path / "connected.log"
    monkeypatch.setenv(fake_dns.LOG_ENV, str(log))
    monkeypatch.setattr(img2dataset_pool, "_start_worker", fake_dns.start_worker)

    def answer(answers: dict) -> fake_dns.FakeNetwork:
        monkeypatch.setenv(fake_dns.ANSWERS_ENV, json.dumps(answers))
        return fake_dns.FakeNetwork(answers, log)

    return answer


@pytest.fixture
def other_web():
    server = LoopbackWeb()
    yield server
    server.close()


def reasons(manifest) -> dict[str, str]:
    return {r["id"]: r["reason"] for r in manifest.rejected_table().to_pylist()}


def test_dns_rebinding_never_reaches_the_address_a_second_lookup_gives(tmp_path, web, web_elsewhere, isolated_guard,
                                                                       fake_network):
    """Names that resolve to a public address first and to loopback after: the worker connects to the address it
    vetted (refused by the test network), never to the loopback server, directly or on a redirect's hop."""
    network = fake_network({"direct.rebind.test": [PUBLIC, "127.0.0.1"],
                            "hop.rebind.test": [PUBLIC, PUBLIC, "127.0.0.1"]})
    urls = {"direct": f"http://direct.rebind.test:{web.port}/good.jpg",
            "hop": web_elsewhere.redirect(f"http://hop.rebind.test:{web.port}/good.jpg")}
    manifest = download.run(config(allowed_networks=["127.0.0.2/32"], max_transient_fraction=1.0),  # failures kept
                            {"retrieved": retrieved(tmp_path, urls)}, str(tmp_path / "out"))
    assert web.requests == []  # 127.0.0.1 is outside allowed_networks: nothing may reach it
    assert len(web_elsewhere.requests) == 1  # the redirect was followed...
    assert set(network.connected()) == {PUBLIC, "127.0.0.2"}  # ...to the vetted address only
    assert reasons(manifest) == {"direct": "connection_error", "hop": "connection_error"}


def test_proxies_in_the_environment_are_never_used(tmp_path, web, other_web, isolated_guard, monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, other_web.base)
    manifest = download.run(config(allowed_networks=["127.0.0.1/32"]), {"retrieved": retrieved(tmp_path, {
        "good": web.url("/good.jpg")})}, str(tmp_path / "out"))
    assert other_web.requests == []
    assert web.requests == ["/good.jpg"] and manifest.rows_out == 1


def test_download_proxy_carries_every_fetch_and_what_urls_say_is_still_checked(tmp_path, web, other_web, isolated_guard,
                                                                                monkeypatch, capfd):
    """With download.proxy the proxy resolves the names (these resolve nowhere else), on loopback though no network
    is allowed; address literals, a redirect to one included, are refused here; the environment's proxy is unused."""
    monkeypatch.setenv("http_proxy", other_web.base)
    urls = {
        "named": "http://images.example.test/good.jpg",
        "missing": "http://images.example.test/missing.jpg",
        "redirect-metadata": "http://images.example.test/redirect?to=http%3A%2F%2F169.254.169.254%2Flatest%2F",
        "literal": "http://10.0.0.9/a.jpg",
    }
    manifest = download.run(config(proxy=web.base, allowed_networks=[]), {"retrieved": retrieved(tmp_path, urls)},
                            str(tmp_path / "out"))
    assert sorted(web.requests) == sorted(urls[k] for k in ("named", "missing", "redirect-metadata"))
    assert other_web.requests == []
    assert manifest.rows_out == 1
    assert reasons(manifest) == {"missing": "http_404", "redirect-metadata": "unsafe_redirect", "literal": "unsafe_address"}
    assert "download.proxy" in capfd.readouterr().err


def test_download_workers_without_the_policy_fail_instead_of_downloading(web, restore_opener, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    error = None
    with img2dataset_pool.Img2datasetPool(config(allowed_networks=["127.0.0.1/32"]).download) as pool:
        [finish] = pool.submit([[("0/0", web.url("/good.jpg"))]], 1)
        try:
            finish()
        except Exception as err:  # noqa: BLE001
            error = err
    assert web.requests == []
    assert isinstance(error, url_guard.GuardMissing) and "refusing to download unguarded" in str(error)


def test_a_url_cannot_choose_its_rejection_reason(tmp_path, web, isolated_guard, fake_network):
    """Reasons come from the exception's type and HTTP status, never from text that holds the URL."""
    fake_network({"private.test": ["10.0.0.5"]})
    urls = {
        "named-private": "http://private.test/a.jpg#HTTP Error 404: timed out",  # refused as it connects
        "missing": web.url("/missing.jpg#unsafe redirect, connection refused"),
        "redirect-private": web.redirect("http://10.0.0.1/HTTP Error 404 timed out.jpg"),
        "redirect-named-private": web.redirect("http://private.test/b.jpg#HTTP Error 503"),
    }
    manifest = download.run(config(allowed_networks=["127.0.0.1/32"]), {"retrieved": retrieved(tmp_path, urls)},
                            str(tmp_path / "out"))
    assert reasons(manifest) == {"named-private": "unsafe_address", "missing": "http_404",
                                 "redirect-private": "unsafe_redirect", "redirect-named-private": "unsafe_redirect"}
    details = {r["id"]: r["detail"] for r in manifest.rejected_table().to_pylist()}
    assert details["named-private"] == f"{urls['named-private']}: cnpipe-fetch: unsafe_address (10.0.0.5)"


def png_bomb(side: int = 12000) -> bytes:
    """A 12000x12000 PNG of 18 kB: 144 million pixels once decoded."""
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


def noise_jpeg(side: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_bodies_over_the_cap_and_decompression_bombs_are_refused_before_decoding(tmp_path, web, isolated_guard):
    cap = 100_000
    web.files["/bomb.png"] = ("image/png", png_bomb())
    web.files["/big.jpg"] = web.files["/big-streamed.jpg"] = ("image/jpeg", noise_jpeg(400))
    web.streamed.add("/big-streamed.jpg")  # no Content-Length: the cap holds as the body is read
    assert len(web.files["/bomb.png"][1]) < cap < len(web.files["/big.jpg"][1])
    urls = {name: web.url(f"/{name}") for name in ("good.jpg", "bomb.png", "big.jpg", "big-streamed.jpg")}
    manifest = download.run(config(allowed_networks=["127.0.0.1/32"], max_body_bytes=cap),
                            {"retrieved": retrieved(tmp_path, urls)}, str(tmp_path / "out"))
    assert reasons(manifest) == {"bomb.png": "decompression_bomb", "big.jpg": "file_too_large",
                                 "big-streamed.jpg": "file_too_large"}
    assert manifest.rows_out == 1


@pytest.mark.parametrize("setting, value", [
    ("max_body_bytes", 0), ("max_image_area", 0), ("proxy", "proxy.corp:3128"), ("proxy", "socks5://proxy.corp:1080"),
    ("proxy", "http://proxy.corp"), ("proxy", "http://user:secret@proxy.corp:3128"), ("proxy", "http://proxy.corp:3128/x"),
    ("proxy", "http://proxy.corp:99999")])
def test_fetch_limits_and_proxy_are_checked_before_any_download(tmp_path, setting, value):
    cfg = pipeline_configs.embedded()
    setattr(cfg.download, setting, value)
    with pytest.raises(pipeline_configs.ConfigError, match=f"download.{setting}"):
        download.run(cfg, {}, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("proxy", ["", "http://proxy.corp:3128", "https://10.1.2.3:8443/", "http://[fd00::1]:3128"])
def test_valid_proxies_pass_the_settings_check(proxy):
    cfg = pipeline_configs.embedded()
    cfg.download.proxy = proxy
    download.check_settings(cfg)
