"""`MediaPolicy`: what a request's images may make the server read and fetch, and how big they may be.

Plain Python (no Pillow): the command line builds one before anything heavy is imported, and `media` applies it.
Like vLLM's ``--allowed-local-media-path`` and ``--allowed-media-domains``, nothing is read and nothing is fetched
unless the operator allowed it.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field

from .limits import (DEFAULT_FETCH_TIMEOUT, DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS,
                     DEFAULT_MAX_REQUEST_IMAGE_BYTES, DEFAULT_MAX_REQUEST_PIXELS)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class MediaPolicy:
    """What the server may read and fetch for a request's images, and how big they may be.

    ``allowed_local_media_path``: the one folder local paths may name (None: no local path is read).
    ``allowed_media_domains``: the host names, IP addresses and networks (``10.0.0.0/8``) URLs may be fetched from
    (empty: no URL is fetched); a non-public address (loopback, private, link-local, ...) is reached only when it is
    named here as an address or network. ``max_image_bytes``, ``max_image_pixels``: per image;
    ``max_request_image_bytes``, ``max_request_pixels``: a request's images together (the pixels from the headers,
    before any image is decoded). ``fetch_timeout``: seconds per URL, in all (status line and headers included).
    """

    allowed_local_media_path: str | None = None
    allowed_media_domains: tuple[str, ...] = ()
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_request_image_bytes: int = DEFAULT_MAX_REQUEST_IMAGE_BYTES
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS
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
            network = parse_network(entry)
            if network is not None:
                networks.append(network)
            elif host_name(entry):
                hosts.add(host_name(entry))
            else:
                raise ValueError(f"allowed media domain {entry!r}: not a host name, an IP address or a network; "
                                 "give host names as in URLs (images.example.com), without a scheme or a path")
        for name in ("max_image_bytes", "max_image_pixels", "max_request_image_bytes", "max_request_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.fetch_timeout > 0:
            raise ValueError(f"fetch_timeout must be > 0 seconds, got {self.fetch_timeout!r}")
        object.__setattr__(self, "allowed_media_domains", tuple(self.allowed_media_domains))
        object.__setattr__(self, "_hosts", frozenset(hosts))
        object.__setattr__(self, "_networks", tuple(networks))

    def host_allowed(self, host: str) -> bool:
        """Whether URLs naming ``host`` (a name, or an IP literal) may be fetched at all."""
        address = parse_address(host)
        if address is not None:
            return any(address in network for network in self._networks)
        return host_name(host) in self._hosts

    def address_allowed(self, address: Address) -> bool:
        """Whether the server may connect to ``address``: a public one, or one the policy names."""
        if any(address in network for network in self._networks):
            return True
        return address.is_global and not address.is_multicast


def host_name(text: str) -> str:
    """A host name as compared: lower case, without a trailing dot (empty for what cannot be one)."""
    name = text.strip().lower().rstrip(".")
    return name if re.fullmatch(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?", name) and ".." not in name else ""


def parse_address(text: str) -> Address | None:
    """The IP address ``text`` spells (``[::1]`` too), IPv4-mapped IPv6 addresses as the IPv4 address; else None."""
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    return unmapped(address)


def unmapped(address: Address) -> Address:
    """``::ffff:127.0.0.1`` is 127.0.0.1: an IPv4-mapped IPv6 address is checked as the IPv4 address it reaches."""
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


def parse_network(text: str) -> Network | None:
    if parse_address(text) is None and "/" not in text:
        return None
    try:
        return ipaddress.ip_network(text.strip().strip("[]"), strict=False)
    except ValueError:
        return None


__all__ = ["MediaPolicy", "host_name", "parse_address", "parse_network", "unmapped"]
