"""TLS for a server reached beyond loopback: a self-signed certificate, pinned by its SHA-256 fingerprint.

No certificate authority is involved. Like SSH's first connect, the server prints its certificate's
fingerprint, the user copies it into the extension's preferences, and the client refuses any other
certificate before the token leaves the machine. Standard library only: the extension imports this.
"""

from __future__ import annotations

import hashlib
import re
import ssl
from pathlib import Path

# The one documented command for a first set-up (README "Serving a remote machine securely").
SELF_SIGNED_COMMAND = (
    "openssl req -x509 -newkey rsa:3072 -sha256 -days 825 -nodes "
    '-keyout server.key -out server.crt -subj "/CN=blender-cfd"'
)


def fingerprint(der: bytes) -> str:
    """SHA-256 of a DER certificate as `AB:CD:…`, as `openssl x509 -noout -fingerprint -sha256` prints it."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def normalise_fingerprint(text: str) -> str:
    """A pasted fingerprint in the canonical `AB:CD:…` form. Accepts lower case, spaces or no
    separators, and openssl's `sha256 Fingerprint=` prefix; ValueError says what a valid one looks like."""
    value = text.strip().rpartition("=")[2]
    digits = re.sub(r"[\s:]", "", value).upper()
    if not re.fullmatch(r"[0-9A-F]{64}", digits):
        raise ValueError(
            f"a SHA-256 certificate fingerprint is 64 hex digits (pairs may be separated by ':'), "
            f"got {text.strip()!r}; copy the one the server printed at start"
        )
    return ":".join(digits[i : i + 2] for i in range(0, 64, 2))


def certificate_fingerprint(cert_path: str | Path) -> str:
    """The fingerprint of the first certificate in a PEM file."""
    pem = Path(cert_path).read_text(encoding="ascii")
    end = pem.index(ssl.PEM_FOOTER) + len(ssl.PEM_FOOTER)
    return fingerprint(ssl.PEM_cert_to_DER_cert(pem[:end]))


def server_context(cert_path: str | Path, key_path: str | Path) -> ssl.SSLContext:
    """The server's side: TLS 1.2 or newer with the given certificate and private key."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # No TLS 1.3 session tickets: they arrive after the handshake, while the client's reader thread
    # reads and its main thread writes the hello on the same SSL object, and that race lost the hello
    # in about one connection in three (the server then timed out waiting for it). The clients never
    # resume sessions, so the tickets bought nothing.
    context.num_tickets = 0
    context.load_cert_chain(str(cert_path), str(key_path))
    return context


def client_context() -> ssl.SSLContext:
    """The client's side: encryption without a CA; the caller checks the pinned fingerprint instead."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
