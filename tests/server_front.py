"""A TCP front for a server on 127.0.0.1, for the served teacher's fault tests.

The session's one vLLM server stays up; the client talks to it through this front, which can
die as a server does when it is killed (every open connection reset, then connections
refused) and come back on the same port, or answer chosen /v1/completions requests with an
HTTP error (a 503 from an overloaded server) instead of forwarding them.
"""

from __future__ import annotations

import socket
import struct
import threading


class Front:
    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.port = _free_port()
        self.completions = 0  # /v1/completions requests forwarded (urllib sends one per connection)
        self.kill_after: int | None = None  # die at the completions request after this many
        self.fail: dict[int, int] = {}  # completions request number -> an HTTP status answered instead
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def kill(self) -> None:
        """As a killed server: stop listening, reset every open connection."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._open = self._open, []
        if listener is not None:
            listener.close()
        for s in sockets:
            try:  # linger 0: the close sends RST, as the kernel does for a dead process's sockets
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
            except OSError:
                pass

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    return
            threading.Thread(target=self._forward, args=(client,), daemon=True).start()

    def _forward(self, client: socket.socket) -> None:
        try:
            first = client.recv(65536)
        except OSError:
            first = b""
        with self._lock:
            status = None
            if first.startswith(b"POST /v1/completions"):
                self.completions += 1
                status = self.fail.get(self.completions)
            dying = self.kill_after is not None and self.completions > self.kill_after
            if not dying:
                self._open.append(client)
        if status is not None:
            _answer(client, status, first)
            return
        if dying:
            self.kill()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            return
        try:
            upstream = socket.create_connection(self.target)
            upstream.sendall(first)
        except OSError:
            client.close()
            return
        with self._lock:
            self._open.append(upstream)
        pipes = [threading.Thread(target=_pipe, args=(a, b), daemon=True) for a, b in ((client, upstream),
                                                                                     (upstream, client))]
        for p in pipes:
            p.start()
        for p in pipes:
            p.join()
        for s in (client, upstream):
            try:
                s.close()
            except OSError:
                pass


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _read_request(client: socket.socket, data: bytes) -> None:
    """The rest of a request that begins with `data` (its headers and its Content-Length of
    body), so that closing sends no RST."""
    while b"\r\n\r\n" not in data:
        chunk = client.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = client.recv(65536)
        if not chunk:
            return
        body += chunk


def _answer(client: socket.socket, status: int, first: bytes) -> None:
    try:
        _read_request(client, first)
        body = b'{"error": {"message": "injected by the test front"}}'
        client.sendall(f"HTTP/1.1 {status} Error\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                       f"Connection: close\r\n\r\n".encode() + body)
    except OSError:
        pass
    finally:
        client.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
