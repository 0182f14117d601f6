"""Whether a server answers, asked with a few-second budget: used before downloads and before online W&B,
which both can otherwise hang for minutes on a machine without network."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Sequence
from urllib.parse import urlparse


def _answers(sock: socket.socket, url) -> None:
    """Raise OSError unless the server speaks: https completes a TLS handshake, http sends back a byte of a
    reply (a server that accepts the connection and then says nothing must not pass for a live one)."""
    if url.scheme == "https":
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # liveness only; the client verifies
        context.wrap_socket(sock, server_hostname=url.hostname).close()
        return
    sock.sendall(f"HEAD / HTTP/1.0\r\nHost: {url.hostname}\r\n\r\n".encode())
    if not sock.recv(1):
        raise OSError("closed without a reply")


def reachable(urls: Sequence[str], timeout: float = 5.0, answers: bool = False) -> bool:
    """True when a TCP connection to one of the urls' hosts opens within `timeout` seconds (DNS included:
    the probe runs in a daemon thread, since name lookup ignores socket timeouts); answers=True: and the
    server replies within that time too (_answers)."""
    if not urls:
        return False
    done, lock = threading.Event(), threading.Lock()
    state = {"ok": False, "pending": len(urls)}

    def probe(url: str) -> None:
        u = urlparse(url)
        ok = False
        try:
            with socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)),
                                          timeout=timeout) as sock:
                if answers:
                    _answers(sock, u)
                ok = True
        except (OSError, ValueError):
            pass
        with lock:  # done at the first success, or once every probe has failed (refused: at once)
            state["ok"] |= ok
            state["pending"] -= 1
            if ok or not state["pending"]:
                done.set()

    for url in urls:
        threading.Thread(target=probe, args=(url,), daemon=True).start()
    done.wait(timeout)
    with lock:
        return state["ok"]
