"""What `internvlx serve` reads and fetches for a request's images: nothing unless the operator allowed it.

A chat request names its images by URL (``{"type": "image_url", "image_url": {"url": URL}}``). A server that opens
whatever a client names reads its own file system and fetches from its own network on the client's behalf, so
`load_request_image` takes a `MediaPolicy` and, like vLLM's ``--allowed-local-media-path`` and
``--allowed-media-domains``:

- ``data:image/...;base64,...`` URIs are always accepted (the client sends the bytes itself);
- local paths (``/srv/images/cat.png``, ``file:///srv/images/cat.png``, or ``cat.png`` relative to the folder) are
  read only inside ``allowed_local_media_path``, after resolving symbolic links and ``..``; a path outside the
  folder, a missing path, a folder and a special file get one and the same error text, so a client cannot tell
  what exists on the server;
- ``http(s)://`` URLs are fetched only from the hosts in ``allowed_media_domains``, and only from public addresses
  unless the address (or a network holding it, ``10.0.0.0/8``) is named there too: the address the host name
  resolves to is checked and then connected to (a name that resolves to 127.0.0.1 reaches 127.0.0.1 only where
  127.0.0.1 is allowed); redirects are followed by hand, each one checked like the first URL; a fetch has a
  timeout and a byte limit;
- every image, whatever its source, is refused above ``max_image_bytes`` encoded bytes (checked before base64
  decoding and while downloading) and above ``max_image_pixels`` pixels, read from the image's header before its
  pixel data is decoded (PIL opens lazily); only common web formats are decoded (``ACCEPTED_FORMATS``).

The errors are `MediaRefused` (a `ValueError`): one line that names the image and says what the client can do.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import os
import re
import socket
import ssl
import stat
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

# The defaults live with the other limits in plain Python, so `internvlx serve --help` shows them without Pillow.
from .serving_requests import DEFAULT_FETCH_TIMEOUT, DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS  # noqa: F401

#: Redirects followed per fetch, each one checked like the first URL.
MAX_REDIRECTS = 3
#: The image formats a request's image may be in (PIL's names); others (EPS, which runs Ghostscript, TIFF, ...) are
#: refused before a decoder runs.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # JPEG includes MPO (multi-picture JPEGs of cameras)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_REDIRECTS = (301, 302, 303, 307, 308)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError)


class MediaRefused(ValueError):
    """A request's image that the server will not read, fetch or decode (one line naming it); an HTTP 400."""


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class MediaPolicy:
    """What the server may read and fetch for a request's images, and how big an image may be.

    ``allowed_local_media_path``: the one folder local paths may name (None: no local path is read).
    ``allowed_media_domains``: the host names, IP addresses and networks (``10.0.0.0/8``) URLs may be fetched from
    (empty: no URL is fetched); a non-public address (loopback, private, link-local, ...) is reached only when it is
    named here as an address or network. ``max_image_bytes``, ``max_image_pixels``: per image.
    ``fetch_timeout``: seconds per URL, in all.
    """

    allowed_local_media_path: str | None = None
    allowed_media_domains: tuple[str, ...] = ()
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT
    _hosts: frozenset[str] = field(init=False, repr=False, compare=False)
    _networks: tuple[Network, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.allowed_local_media_path is not None:
            folder = os.path.realpath(os.path.expanduser(os.fspath(self.allowed_local_media_path)))
            if not os.path.isdir(folder):
                raise ValueError(f"allowed local media path {str(self.allowed_local_media_path)!r}: no such folder; "
                                 "name the folder whose images clients may ask about")
            object.__setattr__(self, "allowed_local_media_path", folder)
        hosts, networks = set(), []
        for entry in self.allowed_media_domains:
            network = _parse_network(entry)
            if network is not None:
                networks.append(network)
            elif _host_name(entry):
                hosts.add(_host_name(entry))
            else:
                raise ValueError(f"allowed media domain {entry!r}: not a host name, an IP address or a network; "
                                 "give host names as in URLs (images.example.com), without a scheme or a path")
        for name, value in (("max_image_bytes", self.max_image_bytes), ("max_image_pixels", self.max_image_pixels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.fetch_timeout > 0:
            raise ValueError(f"fetch_timeout must be > 0 seconds, got {self.fetch_timeout!r}")
        object.__setattr__(self, "allowed_media_domains", tuple(self.allowed_media_domains))
        object.__setattr__(self, "_hosts", frozenset(hosts))
        object.__setattr__(self, "_networks", tuple(networks))

    def host_allowed(self, host: str) -> bool:
        """Whether URLs naming ``host`` (a name, or an IP literal) may be fetched at all."""
        address = _parse_address(host)
        if address is not None:
            return any(address in network for network in self._networks)
        return _host_name(host) in self._hosts

    def address_allowed(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Whether the server may connect to ``address``: a public one, or one the policy names."""
        if any(address in network for network in self._networks):
            return True
        return address.is_global and not address.is_multicast


def _host_name(text: str) -> str:
    """A host name as compared: lower case, without a trailing dot (empty for what cannot be one)."""
    name = text.strip().lower().rstrip(".")
    return name if re.fullmatch(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?", name) and ".." not in name else ""


def _parse_address(text: str):
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    return _unmapped(address)


def _unmapped(address):
    """``::ffff:127.0.0.1`` is 127.0.0.1: an IPv4-mapped IPv6 address is checked as the IPv4 address it reaches."""
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


def _parse_network(text: str) -> Network | None:
    if _parse_address(text) is None and "/" not in text:
        return None
    try:
        return ipaddress.ip_network(text.strip().strip("[]"), strict=False)
    except ValueError:
        return None


def load_request_image(url: str, where: str, policy: MediaPolicy) -> Image.Image:
    """The image a request names by ``url`` (a data: URI, an http(s) URL, a file: URL or a local path), decoded,
    if ``policy`` allows reading it; else `MediaRefused` (one line starting with ``where``)."""
    scheme = _SCHEME.match(url)
    scheme = scheme.group(1).lower() if scheme and len(scheme.group(1)) > 1 else None  # C:\... is a path
    if scheme == "data":
        return decode_image(_data_uri_bytes(url, where, policy.max_image_bytes), where, policy)
    if scheme in ("http", "https"):
        return decode_image(fetch(url, where, policy), where, policy)
    if scheme == "file":
        parsed = urllib.parse.urlsplit(url)
        if parsed.netloc not in ("", "localhost"):
            raise MediaRefused(f"{where}: a file: URL names a file on this server (file:///path or "
                               "file://localhost/path), not on another host")
        return decode_image(read_local_file(urllib.request.url2pathname(parsed.path), where, policy), where, policy)
    if scheme is not None:
        raise MediaRefused(f"{where}: unsupported URL scheme {scheme!r}; send the image as a data:image/...;base64,... "
                           "URI, an http(s) URL or a file path the server allows")
    return decode_image(read_local_file(url, where, policy), where, policy)


# --- the bytes: data URIs, local files, URLs ------------------------------------------------------------------


def _too_big(where: str, size: str, limit: int) -> MediaRefused:
    return MediaRefused(f"{where}: the image is {size} bytes; this server accepts images of at most {limit} bytes "
                        "(--max-image-bytes); send a smaller or more compressed image")


def _data_uri_bytes(uri: str, where: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:[<media type>][;base64],<data>`` URI, refused by size before they are decoded."""
    header, comma, payload = uri.partition(",")
    if not comma:
        raise MediaRefused(f"{where}: a data URI needs a comma before its data, as in 'data:image/png;base64,iVBOR...'")
    if not header.lower().endswith(";base64"):
        data = urllib.parse.unquote_to_bytes(payload)
        if len(data) > max_bytes:
            raise _too_big(where, str(len(data)), max_bytes)
        return data
    if len(payload) // 4 * 3 > 2 * max_bytes + 3:  # far over (even with a line break every other character)
        raise _too_big(where, f"about {len(payload) // 4 * 3}", max_bytes)
    compact = re.sub(r"\s+", "", payload)
    size = len(compact) * 3 // 4 - len(compact) + len(compact.rstrip("="))  # 4 characters per 3 bytes, less padding
    if size > max_bytes:  # before decoding
        raise _too_big(where, str(size), max_bytes)
    if "-" in compact or "_" in compact:  # the URL-safe alphabet
        compact = compact.translate(str.maketrans("-_", "+/"))
    try:
        data = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError) as error:
        raise MediaRefused(f"{where}: the base64 data is invalid ({error}); send the image file's bytes base64-encoded, "
                           "as 'data:image/png;base64,' + base64.b64encode(file_bytes).decode()") from None
    if len(data) > max_bytes:
        raise _too_big(where, str(len(data)), max_bytes)
    return data


def read_local_file(path: str, where: str, policy: MediaPolicy) -> bytes:
    """The bytes of a file inside ``policy.allowed_local_media_path`` (a relative path is taken from there).

    Outside the folder, missing, a folder, a special file (a FIFO, a device) or unreadable: one error text, the
    same for each, so that a client learns nothing about the server's files."""
    root = policy.allowed_local_media_path
    if root is None:
        raise MediaRefused(f"{where}: this server reads no local files; send the image as a "
                           "data:image/png;base64,... URI (the server's operator can allow a folder with "
                           "--allowed-local-media-path)")
    refused = MediaRefused(f"{where}: not an image file this server may read; a local path must name an existing "
                           "file inside the folder the server allows (--allowed-local-media-path), or send the image "
                           "as a data:image/png;base64,... URI")
    if "\x00" in path:
        raise refused
    resolved = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, resolved]) != root or resolved == root:
        raise refused
    try:  # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: the resolved name is not a link now
        descriptor = os.open(resolved, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        raise refused from None
    with os.fdopen(descriptor, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise refused
        if info.st_size > policy.max_image_bytes:
            raise _too_big(where, str(info.st_size), policy.max_image_bytes)
        data = file.read(policy.max_image_bytes + 1)
    if len(data) > policy.max_image_bytes:  # grew since fstat
        raise _too_big(where, f"more than {policy.max_image_bytes}", policy.max_image_bytes)
    return data


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to the address that was checked, whatever the host name resolves to by then."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self):
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """`_PinnedHTTPConnection` with TLS: the certificate is verified for the host name, not the address."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self):
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _checked_address(host: str, port: int, where: str, policy: MediaPolicy) -> str:
    """The address to connect to for ``host``: the first it resolves to that the policy allows (the connection
    goes to that address, so a name that resolves elsewhere by the time of the connection changes nothing)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise MediaRefused(f"{where}: could not resolve the host {host!r} ({error})") from None
    for info in infos:
        if policy.address_allowed(_unmapped(ipaddress.ip_address(info[4][0].split("%")[0]))):
            return info[4][0]
    raise MediaRefused(f"{where}: the host {host!r} resolves to {infos[0][4][0]}, a non-public address this server "
                       "does not fetch from (the operator can allow it by naming the address in "
                       "--allowed-media-domains)")


def fetch(url: str, where: str, policy: MediaPolicy) -> bytes:
    """The body of ``url`` (http or https) if ``policy`` allows its host and address, following at most
    `MAX_REDIRECTS` redirects (each checked), within ``policy.fetch_timeout`` seconds and ``max_image_bytes``."""
    if not policy.allowed_media_domains:
        raise MediaRefused(f"{where}: this server fetches no image URLs; send the image as a data:image/png;base64,... "
                           "URI (the server's operator can allow hosts with --allowed-media-domains)")
    deadline = time.monotonic() + policy.fetch_timeout
    limit = policy.max_image_bytes
    for _ in range(MAX_REDIRECTS + 1):
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        except ValueError as error:
            raise MediaRefused(f"{where}: not a valid URL ({error})") from None
        host = parts.hostname or ""
        if parts.scheme.lower() not in ("http", "https") or not host:
            raise MediaRefused(f"{where}: only http(s) URLs with a host are fetched, got {url[:100]!r}")
        if parts.username is not None or parts.password is not None:
            raise MediaRefused(f"{where}: URLs with a user name or password are not fetched")
        if not policy.host_allowed(host):
            raise MediaRefused(f"{where}: the host {host!r} is not one this server fetches from "
                               "(--allowed-media-domains); send the image as a data:image/png;base64,... URI")
        address = _checked_address(host, port, where, policy)
        remaining = deadline - time.monotonic()
        connection_class = _PinnedHTTPSConnection if parts.scheme.lower() == "https" else _PinnedHTTPConnection
        connection = connection_class(host, port, address, timeout=max(remaining, 0.001))
        try:
            target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
            connection.request("GET", target, headers={"User-Agent": "internvlx-hf", "Accept": "image/*"})
            sock = connection.sock  # getresponse() forgets it when the server closes after the body
            response = connection.getresponse()
            if response.status in _REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise MediaRefused(f"{where}: the URL answered HTTP {response.status} without a Location")
                url = urllib.parse.urljoin(url, location)
                continue
            if response.status != 200:
                raise MediaRefused(f"{where}: the URL answered HTTP {response.status} {response.reason}; check that "
                                   "it points at an image file")
            length = response.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) > limit:
                raise _too_big(where, length, limit)
            chunks, size = [], 0
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout("the download took too long")
                sock.settimeout(remaining)
                chunk = response.read1(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    raise _too_big(where, f"more than {limit}", limit)
            return b"".join(chunks)
        except (socket.timeout, TimeoutError):
            raise MediaRefused(f"{where}: the download did not finish within {policy.fetch_timeout:g} s "
                               "(--media-fetch-timeout)") from None
        except (OSError, http.client.HTTPException) as error:
            raise MediaRefused(f"{where}: could not download the image ({type(error).__name__}: "
                               f"{error or 'no details'})") from None
        finally:
            connection.close()
    raise MediaRefused(f"{where}: more than {MAX_REDIRECTS} redirects")


# --- decoding -------------------------------------------------------------------------------------------------


def decode_image(data: bytes, where: str, policy: MediaPolicy) -> Image.Image:
    """``data`` (an encoded image) decoded, if it is in `ACCEPTED_FORMATS` and its header's size is within
    ``policy.max_image_pixels`` (checked before the pixel data is decoded)."""
    if len(data) > policy.max_image_bytes:
        raise _too_big(where, str(len(data)), policy.max_image_bytes)
    limit = policy.max_image_pixels
    if Image.MAX_IMAGE_PIXELS:  # PIL refuses more than twice its MAX_IMAGE_PIXELS itself, from the header too
        limit = min(limit, 2 * Image.MAX_IMAGE_PIXELS)
    too_many = (f"{where}: the image has {{}} pixels; this server accepts images of at most {limit} pixels "
                "(--max-image-pixels); send a smaller image")
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError:
        raise MediaRefused(too_many.format(f"more than {limit}")) from None
    except UnidentifiedImageError:
        raise MediaRefused(f"{where}: not a readable image (accepted formats: {', '.join(ACCEPTED_FORMATS)}); send a "
                           "PNG or JPEG file's bytes") from None
    except _DECODE_ERRORS as error:
        raise MediaRefused(f"{where}: the image data could not be decoded ({error or type(error).__name__}); the "
                           "file is probably truncated or corrupt") from None
    width, height = image.size
    if width * height > limit:
        raise MediaRefused(too_many.format(f"{width} x {height} = {width * height}"))
    if width < 1 or height < 1:
        raise MediaRefused(f"{where}: the image is empty ({width} x {height} pixels)")
    try:
        image.load()
    except _DECODE_ERRORS as error:
        raise MediaRefused(f"{where}: the image data could not be decoded ({error or type(error).__name__}); the "
                           "file is probably truncated or corrupt") from None
    return image


__all__ = ["ACCEPTED_FORMATS", "DEFAULT_FETCH_TIMEOUT", "DEFAULT_MAX_IMAGE_BYTES", "DEFAULT_MAX_IMAGE_PIXELS",
           "MAX_REDIRECTS", "MediaPolicy", "MediaRefused", "decode_image", "fetch", "load_request_image",
           "read_local_file"]
