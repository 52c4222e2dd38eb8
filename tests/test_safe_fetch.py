"""The guarded opener: schemes, addresses (checked at connect time), redirects and body caps."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from retrieval.safe_fetch import (
    FetchPolicy,
    RefusedURLError,
    address_allowed,
    guarded_opener,
    is_public_address,
)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata service
        ("0.0.0.0", False),
        ("::1", False),
        ("fe80::1", False),
        ("::ffff:10.0.0.1", False),  # IPv4-mapped private
        ("100.64.0.1", False),  # carrier-grade NAT
        ("224.0.0.1", False),
        ("2002:7f00:1::1", False),  # 6to4 of 127.0.0.1
        ("2002:a00:1::1", False),  # 6to4 of 10.0.0.1
        ("2002:808:808::1", True),  # 6to4 of 8.8.8.8
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", False),  # Teredo whose client is 10.0.0.1
        ("fec0::1", False),  # site-local
    ],
)
def test_is_public_address(address, public):
    assert is_public_address(address) is public


def test_allowed_networks_is_narrow():
    policy = FetchPolicy(allowed_networks=("127.0.0.1/32",))
    assert address_allowed("127.0.0.1", policy)
    assert not address_allowed("127.0.0.2", policy)
    assert not address_allowed("10.0.0.1", policy)
    assert address_allowed("10.0.0.1", FetchPolicy(allow_private_network=True))


def test_bad_cidr_is_a_clear_error():
    with pytest.raises(ValueError, match="--allow-network"):
        FetchPolicy(allowed_networks=("not-a-network",))


def test_private_address_refused_before_connecting(monkeypatch):
    """A host resolving to 10.x is refused without any connection attempt (connect would raise here)."""
    monkeypatch.setattr(
        socket, "getaddrinfo", lambda *a, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", 80))]
    )

    def no_connect(self, *args):
        raise AssertionError("connect() must not be called for a refused address")

    monkeypatch.setattr(socket.socket, "connect", no_connect)
    opener = guarded_opener(FetchPolicy())
    with pytest.raises(RefusedURLError, match="non-public address 10.0.0.7"):
        opener.open("http://rebinding.example/x.jpg", timeout=2)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/x", "data:text/plain,hello"])
def test_other_schemes_refused(url):
    with pytest.raises(RefusedURLError, match="scheme"):
        guarded_opener(FetchPolicy(allow_private_network=True)).open(url, timeout=2)


def test_loopback_refused_by_default(image_server):
    with pytest.raises(RefusedURLError, match="non-public address 127.0.0.1"):
        guarded_opener(FetchPolicy()).open(image_server.image_url(1), timeout=2)


def test_allowed_network_fetches(image_server):
    opener = guarded_opener(FetchPolicy(allowed_networks=("127.0.0.1/32",)))
    with opener.open(image_server.image_url(1), timeout=5) as r:
        assert r.read()[:2] == b"\xff\xd8"


def test_redirect_to_disallowed_address_refused(image_server):
    opener = guarded_opener(FetchPolicy(allowed_networks=("127.0.0.1/32",)))
    target = f"http://127.0.0.2:{image_server.port}/img/1.jpg"
    with pytest.raises(RefusedURLError, match="127.0.0.2"):
        opener.open(f"{image_server.base}/redirect?to={target}", timeout=5)


def test_redirect_to_file_refused(image_server, tmp_path):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"secret")
    opener = guarded_opener(FetchPolicy(allowed_networks=("127.0.0.1/32",)))
    with pytest.raises(RefusedURLError, match="redirect to scheme 'file'"):
        opener.open(f"{image_server.base}/redirect?to=file://{secret}", timeout=5)


@pytest.mark.parametrize("path", ["/huge", "/huge-declared"])
def test_body_cap(image_server, path):
    opener = guarded_opener(FetchPolicy(allowed_networks=("127.0.0.1/32",), max_bytes=1_000_000))
    with pytest.raises(RefusedURLError, match="limit"), opener.open(image_server.base + path, timeout=5) as r:
        r.read()


@pytest.mark.parametrize("how", ["read-amt", "read1", "readinto", "readline"])
def test_body_cap_holds_for_every_read(image_server, how):
    """Small reads add up: no way of reading gets more than max_bytes out of a response."""
    opener = guarded_opener(FetchPolicy(allowed_networks=("127.0.0.1/32",), max_bytes=100_000))
    got = 0
    with (
        pytest.raises(RefusedURLError, match="limit"),
        opener.open(image_server.base + "/huge", timeout=5) as r,
    ):
        while True:
            if how == "read-amt":
                n = len(r.read(8192))
            elif how == "read1":
                n = len(r.read1(8192))
            elif how == "readline":
                n = len(r.readline())
            else:
                n = r.readinto(bytearray(8192))
            if not n:
                break
            got += n
    assert got <= 100_000


def test_slow_drip_hits_the_deadline(image_server):
    """One byte every 0.25 s never trips a 2 s socket timeout; the body deadline stops it."""
    import time

    opener = guarded_opener(FetchPolicy(allowed_networks=("127.0.0.1/32",), deadline_seconds=1.0))
    start = time.monotonic()
    with (
        pytest.raises(RefusedURLError, match="deadline"),
        opener.open(image_server.base + "/drip", timeout=2) as r,
    ):
        r.read()
    assert time.monotonic() - start < 2.5


def test_use_opener_restores_previous():
    from retrieval.safe_fetch import use_opener

    before = urllib.request._opener
    with use_opener(FetchPolicy()) as opener:
        assert urllib.request._opener is opener
    assert urllib.request._opener is before
