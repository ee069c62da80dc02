"""Who can reach the server: the warning for listening beyond this machine without a key, and the host names a
request may give in its ``Host`` header (against DNS rebinding).

A server on 127.0.0.1 is out of other machines' reach, but not out of a web page's: a page on ``evil.example`` whose
name the attacker then resolves to 127.0.0.1 sends its requests to the local server, with ``Host: evil.example``
(DNS rebinding; Ollama fixed the same hole by checking ``Host``). So a server listening on a loopback address
answers only requests for loopback names and addresses unless told otherwise (``--allowed-hosts``, Starlette's
``TrustedHostMiddleware`` patterns: ``name``, ``*.name`` for its subdomains, ``*`` for any), and a server listening
beyond this machine answers any name unless given a list.
"""

from __future__ import annotations

from collections.abc import Sequence

from .limits import API_KEY_ENV
from .policy import host_name, parse_address, parse_network

#: The names and addresses a server on a loopback address answers by default.
LOOPBACK_HOSTS = ("localhost", "*.localhost", "127.0.0.0/8", "::1")


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` keeps the server to this machine (127.0.0.0/8, ::1, localhost)."""
    name = host.strip().strip("[]")
    if host_name(name) == "localhost":
        return True
    address = parse_address(name)
    return address is not None and address.is_loopback


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning for listening on ``host`` without an API key where clients beyond this machine can connect
    (None on a loopback address, or with a key)."""
    if api_key or is_loopback(host):
        return None
    return (f"listening on {host}, beyond this machine, without an API key: any client that reaches it can use the "
            f"model and the media it may read or fetch; set --api-key KEY (or {API_KEY_ENV})")


def check_host_pattern(pattern: str) -> str:
    """``pattern`` as compared (lower case), or ValueError naming what it may be."""
    text = pattern.strip()
    if text == "*":
        return text
    if parse_network(text) is not None:
        return str(parse_network(text)) if "/" in text else str(parse_address(text))
    name = text[2:] if text.startswith("*.") else text
    if not host_name(name):
        raise ValueError(f"allowed host {pattern!r}: not a host name, *.name (its subdomains), an IP address, a "
                         "network or *; give names as in URLs (api.example.com), without a scheme, a port or a path")
    return ("*." if text.startswith("*.") else "") + host_name(name)


def allowed_host_patterns(listen_host: str, allowed_hosts: Sequence[str] | None = None) -> tuple[str, ...] | None:
    """The ``Host`` names a server listening on ``listen_host`` answers (None: any). ``allowed_hosts``: the
    operator's list, added to the loopback names (``*`` alone: any name); without it, a server on a loopback address
    answers `LOOPBACK_HOSTS` and any other server any name."""
    patterns = [check_host_pattern(pattern) for pattern in allowed_hosts or ()]
    if "*" in patterns:
        return None
    if not patterns and not is_loopback(listen_host):
        return None
    return tuple(dict.fromkeys([*LOOPBACK_HOSTS, *patterns]))


def host_allowed(header: str, patterns: Sequence[str]) -> bool:
    """Whether a ``Host`` header (``name``, ``name:port``, ``[v6]:port``) names one of ``patterns``."""
    value = header.strip()
    if value.startswith("["):
        value = value[1:value.find("]")] if "]" in value else ""
    elif value.count(":") == 1:
        value = value.rpartition(":")[0]
    address = parse_address(value) if value else None
    name = host_name(value) if address is None else ""
    for pattern in patterns:
        if pattern == "*":
            return True
        network = parse_network(pattern)
        if network is not None:
            if address is not None and address in network:
                return True
        elif name and (name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:]))):
            return True
    return False


__all__ = ["LOOPBACK_HOSTS", "allowed_host_patterns", "check_host_pattern", "exposure_warning", "host_allowed",
           "is_loopback"]
