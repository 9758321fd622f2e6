"""One TCP connection between the two computing parties, for their openings (gloo backend).

gloo hands every message to its own worker thread, which writes the socket and wakes the caller
when the peer's message has arrived: on a 2-core machine a small pairwise exchange takes ~220 us that
way, against 25-70 us when the party's own thread writes and reads a socket
(docs/performance.md, lever 25). :class:`PairSocket` is that socket: the first computing party
listens on the rendezvous host (where it already hosts torch.distributed's store), the second
connects and proves with a one-time token read from the store that it is the party the store
admitted; the first refuses anything else. It is as protected as gloo's own connections, which
are set up through the same store (gloo is loopback only unless the insecure development mode is
named: docs/security.md).

:meth:`PairSocket.exchange` sends this party's buffers while it receives the other party's into
preallocated tensors, on a non-blocking socket polled from the calling thread. Every wait is
bounded by ``timeouts.op_s``; a peer that stopped is seen at once (end of stream), not at the
timeout.
"""

from __future__ import annotations

import hmac
import secrets
import select
import socket
import time

import torch

#: Store keys (under the communicator's store prefix).
_ADDRESS_KEY, _TOKEN_KEY = "pair_socket/port", "pair_socket/token"
#: Bytes handed to one ``send`` call: large enough for few system calls, small enough that the
#: party goes on to read the other's bytes while its own are still being written.
SEND_CHUNK = 1 << 20


def _view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's storage (numpy's view: no tensor operations)."""
    return memoryview(t.numpy()).cast("B")


class PairSocket:
    """A connected, non-blocking TCP socket between computing parties 0 and 1."""

    def __init__(self, sock: socket.socket, rank: int, timeout_s: float):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self.sock = sock
        self.peer = 1 - rank
        self.timeout_s = timeout_s
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)

    @classmethod
    def connect(cls, store, rank: int, host: str, timeout_s: float) -> "PairSocket":
        """Rank 0 listens on ``host`` (an ephemeral port) and publishes the port and a fresh token in
        ``store``; rank 1 reads both, connects and sends the token. Bounded by ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        if rank == 0:
            token = secrets.token_bytes(32)
            with socket.create_server((host, 0)) as server:
                store.set(_TOKEN_KEY, token.hex())
                store.set(_ADDRESS_KEY, str(server.getsockname()[1]))
                return cls(_accept_peer(server, token, deadline), rank, timeout_s)
        port = int(store.get(_ADDRESS_KEY).decode())  # the store's own timeout bounds this wait
        token = bytes.fromhex(store.get(_TOKEN_KEY).decode())
        sock = socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic()))
        sock.sendall(token)
        return cls(sock, rank, timeout_s)

    def close(self) -> None:
        self.sock.close()

    def exchange(self, mine: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
        """Send ``mine`` (contiguous CPU tensors) and receive the other party's into ``theirs`` (same
        sizes), both directions at once."""
        try:
            self._exchange(mine, theirs)
        except (BrokenPipeError, ConnectionResetError) as err:
            raise self._closed() from err

    def _closed(self) -> ConnectionError:
        return ConnectionError(
            f"the other computing party (rank {self.peer}) closed the connection during an exchange of "
            "openings: it stopped (see its log)")

    def _exchange(self, mine, theirs) -> None:
        outs = [v for v in map(_view, mine) if len(v)]
        ins = [v for v in map(_view, theirs) if len(v)]
        sock, deadline = self.sock, None
        oi = oo = ii = io = 0  # index of the buffer being sent / received, and the offset in it
        while oi < len(outs) or ii < len(ins):
            moved = False
            while oi < len(outs):
                try:
                    n = sock.send(outs[oi][oo : oo + SEND_CHUNK])
                except BlockingIOError:
                    break
                moved, oo = True, oo + n
                if oo == len(outs[oi]):
                    oi, oo = oi + 1, 0
            while ii < len(ins):
                try:
                    n = sock.recv_into(ins[ii][io:])
                except BlockingIOError:
                    break
                if n == 0:
                    raise self._closed()
                moved, io = True, io + n
                if io == len(ins[ii]):
                    ii, io = ii + 1, 0
            if moved or (oi == len(outs) and ii == len(ins)):
                continue
            if deadline is None:
                deadline = time.monotonic() + self.timeout_s
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"the other computing party (rank {self.peer}) did not answer an exchange of openings "
                    f"within timeouts.op_s={self.timeout_s:g}s")
            self._poll.modify(sock.fileno(), (select.POLLIN if ii < len(ins) else 0)
                              | (select.POLLOUT if oi < len(outs) else 0))
            self._poll.poll(min(left, 1.0) * 1000)


def _accept_peer(server: socket.socket, token: bytes, deadline: float) -> socket.socket:
    """The first connection to ``server`` that sends ``token`` within the deadline; others are closed."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the second computing party did not open its exchange socket in time")
        server.settimeout(left)
        try:
            conn, _ = server.accept()
        except socket.timeout:
            continue
        conn.settimeout(max(0.1, min(5.0, deadline - time.monotonic())))
        try:
            got = b""
            while len(got) < len(token):
                part = conn.recv(len(token) - len(got))
                if not part:
                    break
                got += part
        except OSError:
            got = b""
        if hmac.compare_digest(got, token):
            conn.settimeout(None)
            return conn
        conn.close()  # not the party the store admitted
