"""Guarded HTTP(S) fetching: a urllib opener that refuses non-http(s) schemes, private addresses and oversized bodies.

img2dataset fetches every image through ``urllib.request.urlopen`` (the process-wide opener). It accepts
``file://`` URLs and any address, and reads whole bodies into memory. :func:`guarded_opener` builds an
opener that:

- has handlers for ``http`` and ``https`` only; every other scheme (``file``, ``ftp``, ``data``, ...)
  fails with a "refused" reason and is never read;
- resolves the host itself and checks every address *at connection time* (so redirects and DNS
  rebinding are covered: each hop of a redirect chain opens a new, checked connection), refusing
  loopback, private, link-local, multicast, reserved and unspecified addresses unless
  ``allow_private_network``;
- caps the body size (``max_bytes``) over every way of reading it (``read``, ``read1``, ``readinto``),
  refusing early on a larger Content-Length;
- gives each response a deadline (``deadline_seconds``) for its whole body, so a server dripping a byte
  every few seconds (each within the socket timeout) cannot hold a fetch for longer.

:func:`use_opener` installs it for the duration of a ``with`` block and restores the previous opener.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.client
import ipaddress
import socket
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_REDIRECTS = 5
DEFAULT_DEADLINE_SECONDS = 60.0
_CHUNK = 64 * 1024


@dataclasses.dataclass(frozen=True)
class FetchPolicy:
    """What the download stage may fetch.

    allow_private_network: allow every loopback, private, link-local and reserved address.
    allowed_networks: CIDRs allowed although non-public (e.g. "127.0.0.1/32" for a local mirror only).
    max_bytes: largest response body accepted, in bytes.
    max_redirects: longest redirect chain followed.
    deadline_seconds: longest time a response body may take to arrive, from its headers to its last byte
      (the socket timeout bounds each wait for data, not the whole transfer).
    Only http(s) is ever fetched, whatever this says.
    """

    allow_private_network: bool = False
    allowed_networks: tuple[str, ...] = ()
    max_bytes: int = DEFAULT_MAX_BYTES
    max_redirects: int = DEFAULT_MAX_REDIRECTS
    deadline_seconds: float = DEFAULT_DEADLINE_SECONDS

    def __post_init__(self) -> None:
        for cidr in self.allowed_networks:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as err:
                raise ValueError(
                    f"--allow-network {cidr!r} is not a network (e.g. 127.0.0.1/32): {err}"
                ) from err
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {self.max_bytes}")
        if self.max_redirects < 0:
            raise ValueError(f"max_redirects must be >= 0, got {self.max_redirects}")
        if not self.deadline_seconds > 0:
            raise ValueError(f"the per-URL deadline must be positive, got {self.deadline_seconds}")


class RefusedURLError(ValueError):
    """A URL the policy does not allow. Its message is written to the download status parquet.

    Not an OSError on purpose: urllib wraps those into nested URLErrors, burying the reason."""


def is_public_address(address: str) -> bool:
    """True for a globally routable unicast address.

    IPv6 forms that carry an IPv4 address are judged as that address: IPv4-mapped (::ffff:a.b.c.d), 6to4
    (2002:aabb:ccdd::/16, which relays reach) and Teredo (2001::/32: its server and client). Site-local
    fec0::/10 (deprecated, still routed inside some networks) is not public.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.sixtofour is not None:
            return is_public_address(str(ip.sixtofour))
        elif ip.teredo is not None:
            return all(is_public_address(str(part)) for part in ip.teredo)
        elif ip.is_site_local:
            return False
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


def address_allowed(address: str, policy: FetchPolicy) -> bool:
    """Whether the policy lets us connect to this resolved address."""
    if policy.allow_private_network or is_public_address(address):
        return True
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return any(ip in ipaddress.ip_network(cidr, strict=False) for cidr in policy.allowed_networks)


def _guarded_create_connection(
    policy: FetchPolicy,
    address: tuple[str, int],
    timeout: float | object = socket._GLOBAL_DEFAULT_TIMEOUT,  # type: ignore[attr-defined]
    source_address: tuple[str, int] | None = None,
) -> socket.socket:
    """socket.create_connection, but every resolved address is checked and the checked one is dialled."""
    host, port = address
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for *_, sockaddr in infos:
        if not address_allowed(sockaddr[0], policy):
            raise RefusedURLError(
                f"refused: host {host!r} resolves to non-public address {sockaddr[0]} "
                "(pass --allow-network CIDR or --allow-private-network to allow it)"
            )
    last_error: OSError | None = None
    for family, socktype, proto, _, sockaddr in infos:
        sock = socket.socket(family, socktype, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:  # type: ignore[attr-defined]
                sock.settimeout(timeout)  # type: ignore[arg-type]
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as err:
            last_error = err
            sock.close()
    raise last_error if last_error else OSError(f"could not resolve {host!r}")


class _CappedResponse(http.client.HTTPResponse):
    """An HTTPResponse that refuses a body above max_bytes, or one still arriving after deadline_seconds.

    Every read (read, read1, readinto, readline) is bounded by the bytes left under the cap; reads go
    to the socket in chunks of at most 64 KiB, one receive at a time, so the deadline is checked between them.
    """

    def __init__(
        self, sock: socket.socket, *args: object, max_bytes: int, deadline_seconds: float, **kwargs: object
    ) -> None:
        super().__init__(sock, *args, **kwargs)  # type: ignore[arg-type]
        self.max_bytes = max_bytes
        self.deadline_seconds = deadline_seconds
        self._deadline = time.monotonic() + deadline_seconds
        self._received = 0

    def begin(self) -> None:
        super().begin()
        self._deadline = time.monotonic() + self.deadline_seconds  # the body's clock starts with the headers
        if self.length is not None and self.length > self.max_bytes:
            self.close()
            raise RefusedURLError(
                f"refused: body of {self.length} bytes exceeds the limit of {self.max_bytes}"
            )

    def _check(self, got: int) -> None:
        self._received += got
        if self._received > self.max_bytes:
            self.close()
            raise RefusedURLError(f"refused: body exceeds the limit of {self.max_bytes} bytes")
        if time.monotonic() > self._deadline:
            self.close()
            raise RefusedURLError(
                f"refused: body still arriving after {self.deadline_seconds:g} s (the per-URL deadline)"
            )

    def read1(self, n: int = -1) -> bytes:
        left = self.max_bytes + 1 - self._received
        data = super().read1(min(_CHUNK, left) if n is None or n < 0 else min(n, _CHUNK, left))
        self._check(len(data))
        return data

    def read(self, amt: int | None = None) -> bytes:
        want = None if amt is None or amt < 0 else amt
        out = bytearray()
        while want is None or len(out) < want:
            chunk = self.read1(_CHUNK if want is None else want - len(out))
            if not chunk:
                break
            out += chunk
        if want is None and self.length:  # the connection closed before the declared length arrived
            raise http.client.IncompleteRead(bytes(out), self.length)
        return bytes(out)

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read1(len(b))
        memoryview(b).cast("B")[: len(data)] = data
        return len(data)

    def readline(self, limit: int = -1) -> bytes:
        left = self.max_bytes + 1 - self._received
        line = super().readline(min(limit, left) if limit >= 0 else left)
        self._check(len(line))
        return line


def _connection_class(base: type[http.client.HTTPConnection], policy: FetchPolicy) -> type:
    class GuardedConnection(base):  # type: ignore[valid-type,misc]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self._create_connection = functools.partial(_guarded_create_connection, policy)
            self.response_class = functools.partial(
                _CappedResponse, max_bytes=policy.max_bytes, deadline_seconds=policy.deadline_seconds
            )

    return GuardedConnection


class _RefuseOtherSchemes(urllib.request.BaseHandler):
    """Turns every scheme without a handler (file, ftp, data, ...) into a refusal; nothing is read."""

    handler_order = 10000

    def unknown_open(self, req: urllib.request.Request) -> None:
        raise RefusedURLError(f"refused: scheme {req.type!r} is not allowed (only http and https)")


class _LimitedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, max_redirects: int) -> None:
        self.max_redirections = max_redirects
        self.max_repeats = min(self.max_repeats, max_redirects)

    def http_error_302(self, req, fp, code, msg, headers):  # type: ignore[no-untyped-def]
        location = headers.get("location") or headers.get("uri") or ""
        newurl = urllib.parse.urljoin(req.full_url, location)
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            raise RefusedURLError(f"refused: redirect to scheme {scheme!r} ({newurl[:200]})")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def guarded_opener(policy: FetchPolicy) -> urllib.request.OpenerDirector:
    """An OpenerDirector with only http/https handlers, guarded as the module docstring says."""
    http_conn = _connection_class(http.client.HTTPConnection, policy)
    https_conn = _connection_class(http.client.HTTPSConnection, policy)

    class GuardedHTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):  # type: ignore[no-untyped-def]
            return self.do_open(http_conn, req)

    class GuardedHTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):  # type: ignore[no-untyped-def]
            return self.do_open(https_conn, req, context=self._context)

    opener = urllib.request.OpenerDirector()
    for handler in (
        _RefuseOtherSchemes(),
        GuardedHTTPHandler(),
        GuardedHTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        _LimitedRedirects(policy.max_redirects),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


@contextlib.contextmanager
def use_opener(policy: FetchPolicy) -> Iterator[urllib.request.OpenerDirector]:
    """Install the guarded opener process-wide (urllib has no other hook) and restore the previous one."""
    previous = urllib.request._opener  # type: ignore[attr-defined]
    opener = guarded_opener(policy)
    urllib.request.install_opener(opener)
    try:
        yield opener
    finally:
        urllib.request.install_opener(previous)  # type: ignore[arg-type]
