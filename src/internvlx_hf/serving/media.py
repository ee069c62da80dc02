"""What `internvlx serve` reads and fetches for a request's images, under the server's `MediaPolicy`.

A chat request names its images by URL (``{"type": "image_url", "image_url": {"url": URL}}``). A server that opens
whatever a client names reads its own file system and fetches from its own network on the client's behalf, so:

- ``data:image/...;base64,...`` URIs are always accepted (the client sends the bytes itself);
- local paths (``/srv/images/cat.png``, ``file:///srv/images/cat.png``, or ``cat.png`` relative to the folder) are
  read only inside ``allowed_local_media_path``, after resolving symbolic links and ``..``; a path outside the
  folder, a missing path, a folder (inside the allowed one too) and a special file get one and the same error text,
  so a client cannot tell what exists on the server, and every descriptor opened is closed;
- ``http(s)://`` URLs are fetched only from the hosts in ``allowed_media_domains``, and only from public addresses
  unless the address (or a network holding it, ``10.0.0.0/8``) is named there too: the address the host name
  resolves to is checked and then connected to; redirects are followed by hand, each one checked like the first URL;
  a fetch has a byte limit and one deadline for everything (name resolution, connection, TLS, the status line and
  headers, redirects, the body): when it passes, the socket is shut down, whatever was blocking on it;
- every image is refused above ``max_image_bytes`` encoded bytes and ``max_image_pixels`` pixels, and a request's
  images above ``max_request_image_bytes`` and ``max_request_pixels`` together, the pixels read from the images'
  headers before any pixel data is decoded (PIL opens lazily); only common web formats are decoded.

`read_request_images` does this for a request, on the server's worker threads (`workers.ServingWork`); the pixels are
decoded later by `decode_images`, when the request holds one of the server's decode slots. The errors are
`MediaRefused` (a `ValueError`): one line that names the image and says what the client can do.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import functools
import http.client
import io
import ipaddress
import os
import re
import socket
import ssl
import stat
import threading
import time
import urllib.parse
import urllib.request

from PIL import Image, UnidentifiedImageError

from .policy import MediaPolicy, unmapped

#: Redirects followed per fetch, each one checked like the first URL.
MAX_REDIRECTS = 3
#: The image formats a request's image may be in (PIL's names); others (EPS, which runs Ghostscript, TIFF, ...) are
#: refused before a decoder runs.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # JPEG includes MPO (multi-picture JPEGs of cameras)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_REDIRECTS = (301, 302, 303, 307, 308)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError)
# Name resolution has no timeout of its own (the system resolver's can be long): it runs here, and a fetch waits for
# it only until its deadline.
_RESOLVER = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="internvlx-resolve")


class MediaRefused(ValueError):
    """A request's image that the server will not read, fetch or decode (one line naming it); an HTTP 400.
    ``param``: the request's field that names the image, where known."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def source_kind(url: str, where: str) -> str:
    """``"data"``, ``"http"`` (http and https), ``"file"`` (a file: URL) or ``"path"``; `MediaRefused` for another
    scheme."""
    scheme = _SCHEME.match(url)
    scheme = scheme.group(1).lower() if scheme and len(scheme.group(1)) > 1 else None  # C:\... is a path
    if scheme is None:
        return "path"
    if scheme in ("data", "file"):
        return scheme
    if scheme in ("http", "https"):
        return "http"
    raise MediaRefused(f"{where}: unsupported URL scheme {scheme!r}; send the image as a data:image/...;base64,... "
                       "URI, an http(s) URL or a file path the server allows")


def image_bytes(url: str, where: str, policy: MediaPolicy) -> bytes:
    """The encoded bytes of the image a request names by ``url``, if ``policy`` allows reading it."""
    kind = source_kind(url, where)
    if kind == "data":
        return _data_uri_bytes(url, where, policy.max_image_bytes)
    if kind == "http":
        return fetch(url, where, policy)
    if kind == "file":
        parsed = urllib.parse.urlsplit(url)
        if parsed.netloc not in ("", "localhost"):
            raise MediaRefused(f"{where}: a file: URL names a file on this server (file:///path or "
                               "file://localhost/path), not on another host")
        return read_local_file(urllib.request.url2pathname(parsed.path), where, policy)
    return read_local_file(url, where, policy)


def load_request_image(url: str, where: str, policy: MediaPolicy) -> Image.Image:
    """The image a request names by ``url`` (a data: URI, an http(s) URL, a file: URL or a local path), decoded, if
    ``policy`` allows reading it; else `MediaRefused` (one line starting with ``where``). One image, on the calling
    thread; the server reads a request's images with `read_request_images`."""
    image = open_image(image_bytes(url, where, policy), where, policy)
    decode_images([image], [where])
    return image


async def read_request_images(images: list[tuple[str, str, str]], policy: MediaPolicy, work) -> list[Image.Image]:
    """A request's images, as ``(url, where, param)`` triples, read and opened: their bytes fetched and read on
    ``work``'s fetch threads (data: URIs decoded on its prepare threads), their headers read, within the per-image
    and per-request limits of ``policy``. Not decoded yet (`decode_images`). `MediaRefused` carries the ``param`` of
    the image refused."""
    total_bytes = total_pixels = 0
    opened = []
    for url, where, param in images:
        try:
            kind = source_kind(url, where)
            data = await (work.prepare if kind == "data" else work.fetch)(image_bytes, url, where, policy)
            total_bytes += len(data)
            if total_bytes > policy.max_request_image_bytes:
                raise MediaRefused(f"{where}: with this image the request's images are {total_bytes} bytes; this "
                                   f"server accepts at most {policy.max_request_image_bytes} bytes of images per "
                                   "request (--max-request-image-bytes); send fewer or smaller images")
            image = await work.prepare(open_image, data, where, policy)
            del data
            total_pixels += image.size[0] * image.size[1]
            if total_pixels > policy.max_request_pixels:
                raise MediaRefused(f"{where}: with this image the request's images have {total_pixels} pixels; this "
                                   f"server accepts at most {policy.max_request_pixels} pixels per request "
                                   "(--max-request-pixels); send fewer or smaller images")
        except MediaRefused as error:
            error.param = param
            raise
        opened.append(image)
    return opened


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
        raise MediaRefused(f"{where}: the base64 data is invalid ({error}); send the image file's bytes "
                           "base64-encoded, as 'data:image/png;base64,' + base64.b64encode(file_bytes).decode()"
                           ) from None
    if len(data) > max_bytes:
        raise _too_big(where, str(len(data)), max_bytes)
    return data


def read_local_file(path: str, where: str, policy: MediaPolicy) -> bytes:
    """The bytes of a file inside ``policy.allowed_local_media_path`` (a relative path is taken from there).

    Outside the folder, missing, a folder (the allowed one or one inside it), a special file (a FIFO, a device) or
    unreadable: one error text, the same for each, so that a client learns nothing about the server's files. The
    descriptor opened is closed on every path (a folder opens: only its type tells it from a file)."""
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
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise refused
        if info.st_size > policy.max_image_bytes:
            raise _too_big(where, str(info.st_size), policy.max_image_bytes)
        chunks, size = [], 0
        while size <= policy.max_image_bytes:
            chunk = os.read(descriptor, min(1 << 20, policy.max_image_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError:
        raise refused from None
    finally:
        os.close(descriptor)
    if size > policy.max_image_bytes:  # grew since fstat
        raise _too_big(where, f"more than {policy.max_image_bytes}", policy.max_image_bytes)
    return b"".join(chunks)


class _Deadline:
    """One fetch's deadline: when it passes, every socket of the fetch is shut down, so that whatever blocks on one
    (connecting, the TLS handshake, a status line or headers sent a byte at a time, the body) returns at once; a
    per-operation socket timeout alone lets a host that sends a byte now and then hold the fetch for ever."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def watch(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)
        return sock

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)

    def cancel(self) -> None:
        self._timer.cancel()


def _shut(sock: socket.socket) -> None:
    try:  # the plain socket's shutdown, also for an SSLSocket (whose own would drop its TLS state under the reader)
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:  # closed already, or not connected yet
        pass


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to the address that was checked, whatever the host name resolves to by then."""

    def __init__(self, host: str, port: int, address: str, deadline: _Deadline):
        super().__init__(host, port, timeout=max(deadline.remaining(), 0.001))
        self._address, self._deadline = address, deadline

    def _open(self) -> socket.socket:
        sock = self._deadline.watch(socket.socket(_family(self._address), socket.SOCK_STREAM))
        sock.settimeout(max(self._deadline.remaining(), 0.001))
        sock.connect((self._address, self.port))
        return sock

    def connect(self):
        self.sock = self._open()


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    """`_PinnedHTTPConnection` with TLS: the certificate is verified for the host name, not the address."""

    def connect(self):
        sock = self._open()
        tls = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host, do_handshake_on_connect=False)
        self.sock = self._deadline.watch(tls)  # the handshake, too, ends at the deadline
        tls.do_handshake()


def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _checked_address(host: str, port: int, where: str, policy: MediaPolicy, deadline: _Deadline) -> str:
    """The address to connect to for ``host``: the first it resolves to that the policy allows (the connection
    goes to that address, so a name that resolves elsewhere by the time of the connection changes nothing)."""
    future = _RESOLVER.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=max(deadline.remaining(), 0.001))
    except concurrent.futures.TimeoutError:
        raise socket.timeout("resolving the host name took too long") from None
    except (socket.gaierror, UnicodeError) as error:
        raise MediaRefused(f"{where}: could not resolve the host {host!r} ({error})") from None
    for info in infos:
        if policy.address_allowed(unmapped(ipaddress.ip_address(info[4][0].split("%")[0]))):
            return info[4][0]
    raise MediaRefused(f"{where}: the host {host!r} resolves to {infos[0][4][0]}, a non-public address this server "
                       "does not fetch from (the operator can allow it by naming the address in "
                       "--allowed-media-domains)")


def fetch(url: str, where: str, policy: MediaPolicy) -> bytes:
    """The body of ``url`` (http or https) if ``policy`` allows its host and address, following at most
    `MAX_REDIRECTS` redirects (each checked), within ``policy.fetch_timeout`` seconds in all and ``max_image_bytes``."""
    if not policy.allowed_media_domains:
        raise MediaRefused(f"{where}: this server fetches no image URLs; send the image as a data:image/png;base64,... "
                           "URI (the server's operator can allow hosts with --allowed-media-domains)")
    deadline = _Deadline(policy.fetch_timeout)
    try:
        return _fetch(url, where, policy, deadline)
    except MediaRefused:
        raise
    except (OSError, http.client.HTTPException, ValueError) as error:
        if deadline.expired or isinstance(error, (socket.timeout, TimeoutError)) or deadline.remaining() <= 0:
            raise MediaRefused(f"{where}: the download did not finish within {policy.fetch_timeout:g} s "
                               "(--media-fetch-timeout)") from None
        raise MediaRefused(f"{where}: could not download the image ({type(error).__name__}: "
                           f"{error or 'no details'})") from None
    finally:
        deadline.cancel()


def _fetch(url: str, where: str, policy: MediaPolicy, deadline: _Deadline) -> bytes:
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
        address = _checked_address(host, port, where, policy, deadline)
        connection_class = _PinnedHTTPSConnection if parts.scheme.lower() == "https" else _PinnedHTTPConnection
        connection = connection_class(host, port, address, deadline)
        try:
            target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
            connection.request("GET", target, headers={"User-Agent": "internvlx-hf", "Accept": "image/*"})
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
                chunk = response.read1(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    raise _too_big(where, f"more than {limit}", limit)
            if deadline.expired:  # the body may have ended because the socket was shut down
                raise socket.timeout("the download took too long")
            return b"".join(chunks)
        finally:
            connection.close()
    raise MediaRefused(f"{where}: more than {MAX_REDIRECTS} redirects")


# --- headers and pixels ---------------------------------------------------------------------------------------


def open_image(data: bytes, where: str, policy: MediaPolicy) -> Image.Image:
    """``data`` (an encoded image) opened, its pixels not decoded yet, if it is in `ACCEPTED_FORMATS` and its
    header's size is within ``policy.max_image_pixels``."""
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
        raise _corrupt(where, error) from None
    width, height = image.size
    if width * height > limit:
        raise MediaRefused(too_many.format(f"{width} x {height} = {width * height}"))
    if width < 1 or height < 1:
        raise MediaRefused(f"{where}: the image is empty ({width} x {height} pixels)")
    return image


def decode_images(images: list[Image.Image], wheres: list[str]) -> None:
    """Decode the pixels of images from `open_image` (``wheres`` name them in errors)."""
    for image, where in zip(images, wheres, strict=True):
        try:
            image.load()
        except _DECODE_ERRORS as error:
            raise _corrupt(where, error) from None


#: Pillow's allocation block for a server (bytes): above glibc's largest mmap threshold (32 MiB), so that a large
#: image's memory goes back to the system when it is freed. With Pillow's 16 MiB blocks, glibc serves them from the
#: malloc arena of the thread that decoded the image and keeps them there: each worker thread ends up holding the
#: largest image it ever decoded (12 requests of two 36-megapixel PNGs on 4 threads: 566 MB kept, against 50 MB).
SERVER_BLOCK_SIZE = 64 * 2**20


def release_freed_images() -> None:
    """Make Pillow allocate in `SERVER_BLOCK_SIZE` blocks for this process (a server's: process-wide), unless the
    operator chose a size (``PILLOW_BLOCK_SIZE``)."""
    if not os.environ.get("PILLOW_BLOCK_SIZE"):
        Image.core.set_block_size(SERVER_BLOCK_SIZE)


def return_freed_memory() -> bool:
    """Give the memory freed since the last call back to the system: glibc's ``malloc_trim(0)``, where libc has it
    (False elsewhere). Decoding and tiling large images leaves freed chunks in the malloc arenas of the threads that
    did it (the processor's numpy and torch copies of the tiles, below Pillow's blocks of `SERVER_BLOCK_SIZE`), which
    glibc keeps for reuse: resident memory stayed 1.31 GB after a burst of large images that started at 1.72 GB
    (issue 58). Called after a request that held a decode slot (its images were large)."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = libc.malloc_trim if libc is not None else None
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def _corrupt(where: str, error: BaseException) -> MediaRefused:
    return MediaRefused(f"{where}: the image data could not be decoded ({error or type(error).__name__}); the file "
                        "is probably truncated or corrupt")


__all__ = ["ACCEPTED_FORMATS", "MAX_REDIRECTS", "SERVER_BLOCK_SIZE", "MediaRefused", "decode_images", "fetch",
           "image_bytes", "load_request_image", "open_image", "read_local_file", "read_request_images",
           "release_freed_images", "return_freed_memory", "source_kind"]
