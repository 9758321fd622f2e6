"""Mutual-TLS transport between parties: CrypTen's communicator without gloo.

``rendezvous.backend: tls`` (docs/transport.md). torch.distributed's gloo has
no authentication nor encryption; here every pair of parties talks over TLS 1.3
with certificates from the consortium CA, and each side pins the name it
expects (the party name in the certificate's CN or SAN).

Design, in short:

* **Mesh.** Every party (the dealer included) listens on one TCP port and
  dials every other party. The connection a party *dials* carries what it
  sends to that peer; the one it *accepts* carries what it receives. Each TLS
  object is thus used by one thread in one direction (OpenSSL objects are not
  safe for concurrent use), and each socket has a single reader.
* **Handshake.** TLS 1.3 only, client certificate required. The dialer checks
  that the server's verified certificate names the party it meant to reach;
  the listener maps the client's certificate name to a rank, then reads a
  HELLO (rank, name, config hash) and answers an ACK. Anything else -- no
  certificate, another CA, a name that is not a party of this consortium, a
  second connection for a party already connected -- is refused and logged;
  the listener keeps waiting for the real party.
* **Framing.** A 12-byte header (kind, channel, dtype, length) and the raw
  bytes of the tensor (no pickle for tensors). Python objects (CrypTen's
  ``send_obj``/``broadcast_obj``) are pickled by the sender and read back with
  CrypTen's restricted unpickler. The channel separates the main group, the
  dealer group and the dealer-to-party-0 group; each (peer, channel) pair is a
  FIFO, which matches CrypTen's deterministic order of operations.
* **Threads.** One reader thread per peer drains its socket into per-channel
  queues, so a blocking ``sendall`` never deadlocks (the receiver always
  reads); the main thread sends directly (no hand-off) and collects from the
  queues. Collectives are built on point-to-point messages (n is 2-6): each
  party sends its contribution to every other and combines all of them in rank
  order, so every party computes bit-identical results.
* **Faults.** Every wait is bounded by ``timeouts.op_s``. A heartbeat thread
  writes to each idle peer every ``tls.heartbeat_s``; a reader that hears
  nothing for ``tls.silence_s`` declares the peer lost (a SIGSTOPped or
  unreachable party). A closed connection without a goodbye (crash, kill -9)
  is noticed at once. The first failure is raised in the main thread as
  :class:`PeerLost` naming the party, and is forwarded to the other peers
  (ABORT frame) so that every party stops promptly.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import queue
import select
import socket
import ssl
import struct
import sys
import threading
import time
from pathlib import Path

import torch

from . import pki, prg
from ._compat import import_crypten, plain_ring, plain_rings, wrap_rings
from .errors import ConfigError, RendezvousError
from .transport import Audit, PartyCommunicator

import_crypten()
from crypten.common import serial  # noqa: E402
from crypten.communicator import DistributedCommunicator  # noqa: E402

log = logging.getLogger(__name__)

TAP_ENV = "MPC_LM_TLS_PLAINTEXT_TAP"  # tests: directory for each party's pre-encryption frames

_HDR = struct.Struct("!BBBBQ")  # kind, channel, dtype code, reserved, payload length
K_TENSOR, K_OBJ, K_BARRIER, K_HEARTBEAT, K_BYE, K_ABORT, K_HELLO = 1, 2, 3, 4, 5, 6, 7
MAIN, TTP, TTP_COMM = 0, 1, 2
_SMALL = 64 * 1024  # header and payload go in one write below this
_MAX_FRAME = 1 << 40
_HANDSHAKE_S = 10.0

_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
           torch.float32, torch.float64, torch.float16, torch.bfloat16]
_CODE = {d: i + 1 for i, d in enumerate(_DTYPES)}


class PeerLost(RuntimeError):
    """A party crashed, was killed, stopped answering, or reported a failure. Names the party."""


class _Refused(Exception):
    """A connection that does not authenticate as a party of this consortium."""


class _Eof(Exception):
    pass


class Group:
    """A CrypTen group (main / dealer / dealer-to-party-0) over the mesh."""

    def __init__(self, channel: int, ranks: list[int]):
        self.channel = channel
        self.ranks = list(ranks)

    def size(self) -> int:
        return len(self.ranks)

    def __repr__(self) -> str:
        return f"Group(channel={self.channel}, ranks={self.ranks})"


class _Request:
    """What ``isend``/``irecv`` return: ``wait()`` does the (remaining) work."""

    def __init__(self, work=None):
        self._work = work

    def wait(self, timeout=None) -> bool:
        if self._work is not None:
            work, self._work = self._work, None
            work()
        return True

    def is_completed(self) -> bool:
        return self._work is None


class _Peer:
    def __init__(self, rank: int, name: str):
        self.rank, self.name = rank, name
        self.out: ssl.SSLSocket | None = None  # dialed by us: what we send
        self.inc: ssl.SSLSocket | None = None  # accepted: what we receive
        self.lock = threading.Lock()  # one writer at a time on ``out``
        self.queues = {MAIN: queue.SimpleQueue(), TTP: queue.SimpleQueue(), TTP_COMM: queue.SimpleQueue()}
        self.last_sent = 0.0
        self.bye = False  # it said goodbye: no more data will come


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = plain_ring(t).detach()  # CrypTen's GPU shares are CUDALongTensor
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.reshape(-1).contiguous().view(torch.uint8).numpy())


def _recv_exact(sock, view: memoryview) -> None:
    pos, n = 0, len(view)
    while pos < n:
        got = sock.recv_into(view[pos:], n - pos)
        if not got:
            raise _Eof()
        pos += got


def _read_frame(sock) -> tuple[int, int, int, bytes]:
    hdr = bytearray(_HDR.size)
    _recv_exact(sock, memoryview(hdr))
    kind, ch, dt, _, n = _HDR.unpack(hdr)
    if n > 1 << 20:
        raise _Refused(f"oversized handshake frame ({n} bytes)")
    payload = bytearray(n)
    _recv_exact(sock, memoryview(payload))
    return kind, ch, dt, bytes(payload)


def _frame(kind: int, ch: int = 0, payload: bytes = b"", dt: int = 0) -> bytes:
    return _HDR.pack(kind, ch, dt, 0, len(payload)) + payload


def make_contexts(ca: Path, cert: Path, key: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts: TLS 1.3 only, certificate required both ways, CA pinned."""
    contexts = []
    for protocol in (ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS_CLIENT):
        ctx = ssl.SSLContext(protocol)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False  # names are checked against the party list after the handshake
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(ca))
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
        if protocol == ssl.PROTOCOL_TLS_SERVER:
            ctx.num_tickets = 0  # no session tickets: the dialer never reads after the ACK
        contexts.append(ctx)
    return contexts[0], contexts[1]


class Mesh:
    """One authenticated, encrypted connection each way between this party and every other."""

    def __init__(self, rank: int, names: list[str], *, op_s: float, heartbeat_s: float,
                 silence_s: float, digest: str = "", tap_path: Path | None = None):
        self.rank, self.names, self.size = rank, list(names), len(names)
        self.me = self.names[rank]
        self.op_s, self.heartbeat_s, self.silence_s = op_s, heartbeat_s, silence_s
        self.digest = digest
        self.peers = {r: _Peer(r, n) for r, n in enumerate(self.names) if r != rank}
        self.failure: PeerLost | None = None
        self.closed = False
        self.refused: list[tuple[str, str]] = []  # (address, reason) of refused connections
        self._fail_lock = threading.Lock()
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._tap = open(tap_path, "wb") if tap_path else None
        self._tap_lock = threading.Lock()
        self._listener: socket.socket | None = None

    # ---- set-up -------------------------------------------------------------
    def listen(self, host: str, port: int) -> int:
        """Bind the listener; returns the port (useful with port 0)."""
        try:
            self._listener = socket.create_server((host, port), backlog=32)
        except OSError as err:
            raise RendezvousError(
                f"party {self.me!r} could not listen for TLS connections on {host}:{port} ({err}); "
                "free the port or set tls.ports in the config"
            ) from None
        self._listener.settimeout(0.2)
        return self._listener.getsockname()[1]

    def establish(self, server_ctx, client_ctx, lookup, deadline: float) -> None:
        """Accept every peer's connection and dial every peer; ``lookup(rank, deadline)`` -> (host, port)."""
        acceptor = threading.Thread(target=self._accept_loop, args=(server_ctx, deadline),
                                    name="tls-accept", daemon=True)
        acceptor.start()
        try:
            for peer in self.peers.values():
                self._dial(peer, client_ctx, lookup, deadline)
            with self._cv:
                while not all(p.inc is not None for p in self.peers.values()):
                    if self.failure is not None:
                        raise self.failure
                    left = deadline - time.monotonic()
                    if left <= 0:
                        missing = [p.name for p in self.peers.values() if p.inc is None]
                        extra = f"; refused: {self.refused}" if self.refused else ""
                        raise RendezvousError(
                            f"parties {missing} did not open an authenticated TLS connection to "
                            f"{self.me!r} within timeouts.startup_s{extra}"
                        )
                    self._cv.wait(min(left, 0.5))
        finally:
            self._stop_listening()
        threading.Thread(target=self._heartbeat_loop, name="tls-heartbeat", daemon=True).start()
        log.info("TLS mesh of %d parties established", self.size)

    def _stop_listening(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _accept_loop(self, server_ctx, deadline: float) -> None:
        while time.monotonic() < deadline and not self._stop.is_set():
            with self._cv:
                if all(p.inc is not None for p in self.peers.values()):
                    return
            listener = self._listener
            if listener is None:
                return
            try:
                raw, addr = listener.accept()
            except (socket.timeout, BlockingIOError):
                continue
            except OSError:
                return
            threading.Thread(target=self._handshake_incoming, args=(raw, addr, server_ctx),
                             name="tls-handshake", daemon=True).start()

    def _refuse(self, addr, reason: str, sock=None) -> None:
        where = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        self.refused.append((where, reason))
        log.warning("refused a connection from %s: %s", where, reason)
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _handshake_incoming(self, raw: socket.socket, addr, server_ctx) -> None:
        sock = None
        try:
            raw.settimeout(_HANDSHAKE_S)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = server_ctx.wrap_socket(raw, server_side=True)
            names = pki.peer_names(sock.getpeercert())
            claimed = [r for r in self.peers if self.names[r] in names]
            if len(claimed) != 1:
                raise _Refused(f"its certificate names {names}, which match "
                               f"{'several parties' if claimed else 'no other party'} of this consortium")
            peer = self.peers[claimed[0]]
            kind, _, _, payload = _read_frame(sock)
            hello = json.loads(payload.decode()) if kind == K_HELLO else {}
            if hello.get("rank") != peer.rank or hello.get("name") != peer.name:
                raise _Refused(f"certificate of {peer.name!r} but it introduced itself as {hello}")
            if hello.get("digest") != self.digest:
                sock.sendall(_frame(K_HELLO, payload=json.dumps({"error": "config hash differs"}).encode()))
                raise _Refused(f"{peer.name!r} uses a different consortium config")
            with self._cv:
                if peer.inc is not None:
                    raise _Refused(f"a second connection for {peer.name!r}, which is already connected")
                sock.sendall(_frame(K_HELLO, payload=b'{"ok": true}'))
                sock.settimeout(self.silence_s)
                peer.inc = sock
                self._cv.notify_all()
            threading.Thread(target=self._read_loop, args=(peer,), name=f"tls-read-{peer.name}",
                             daemon=True).start()
        except (_Refused, ssl.SSLError, OSError, _Eof, ValueError) as err:
            reason = str(err) or type(err).__name__
            self._refuse(addr, reason if not isinstance(err, _Eof) else "closed during the handshake",
                         sock or raw)

    def _dial(self, peer: _Peer, client_ctx, lookup, deadline: float) -> None:
        last = "no address published yet"
        host, port = lookup(peer.rank, deadline)
        while time.monotonic() < deadline:
            sock = None
            try:
                raw = socket.create_connection((host, port), timeout=min(_HANDSHAKE_S, max(0.1, deadline - time.monotonic())))
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock = client_ctx.wrap_socket(raw)
                names = pki.peer_names(sock.getpeercert())
                others = [n for n in names if n in self.names and n != peer.name]
                if peer.name not in names or others:
                    raise _Refused(f"the server at {host}:{port} presented a certificate for {names}, "
                                   f"not for party {peer.name!r}")
                hello = {"rank": self.rank, "name": self.me, "digest": self.digest}
                sock.sendall(_frame(K_HELLO, payload=json.dumps(hello).encode()))
                kind, _, _, payload = _read_frame(sock)
                answer = json.loads(payload.decode()) if kind == K_HELLO else {}
                if not answer.get("ok"):
                    raise _Refused(f"party {peer.name!r} refused the connection: {answer.get('error', answer)}")
                sock.settimeout(self.op_s)
                peer.out = sock
                peer.last_sent = time.monotonic()
                return
            except (_Refused, ssl.SSLError, OSError, _Eof, ValueError) as err:
                last = str(err) or type(err).__name__
                if isinstance(err, (_Refused, ssl.SSLError)):
                    log.warning("TLS connection to %r at %s:%s refused: %s", peer.name, host, port, last)
                if sock is not None:
                    sock.close()
                time.sleep(0.2)
                host, port = lookup(peer.rank, deadline)  # the address may have been re-published
        raise RendezvousError(
            f"could not open an authenticated TLS connection from {self.me!r} to party {peer.name!r} "
            f"at {host}:{port} within timeouts.startup_s: {last}"
        )

    # ---- failures -----------------------------------------------------------
    def _fail(self, peer: _Peer | None, message: str, forward: bool = True) -> PeerLost:
        with self._fail_lock:
            if self.failure is not None:
                return self.failure
            self.failure = PeerLost(message)
        if self.closed:
            return self.failure
        log.error("%s", message)
        if forward:  # tell the others at once, then unblock everything
            note = _frame(K_ABORT, payload=message.encode()[:4000])
            for p in self.peers.values():
                if p is not peer and not p.bye:
                    self._try_send_raw(p, note)
        for p in self.peers.values():
            for s in (p.out, p.inc):
                if s is not None:
                    try:
                        socket.socket.shutdown(s, socket.SHUT_RDWR)
                    except OSError:
                        pass
            for q in p.queues.values():
                q.put(None)
        return self.failure

    def _try_send_raw(self, peer: _Peer, data: bytes, wait_s: float = 0.5) -> None:
        if peer.out is None or not peer.lock.acquire(timeout=wait_s):
            return
        try:
            if select.select([], [peer.out], [], 0)[1]:
                peer.out.sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            peer.lock.release()

    def _raise(self) -> None:
        if self.failure is not None:
            raise PeerLost(str(self.failure))

    # ---- threads ------------------------------------------------------------
    def _read_loop(self, peer: _Peer) -> None:
        sock = peer.inc
        hdr = bytearray(_HDR.size)
        hview = memoryview(hdr)
        try:
            while True:
                _recv_exact(sock, hview)
                kind, ch, dt, _, n = _HDR.unpack(hdr)
                if kind == K_HEARTBEAT:
                    continue
                if kind == K_BYE:
                    peer.bye = True
                    for q in peer.queues.values():
                        q.put(None)
                    return
                if n > _MAX_FRAME or ch not in peer.queues:
                    raise ValueError(f"malformed frame (kind {kind}, channel {ch}, {n} bytes)")
                buf = torch.empty(n, dtype=torch.uint8)
                if n:
                    _recv_exact(sock, memoryview(buf.numpy()))
                if kind == K_ABORT:
                    text = bytes(buf.numpy()).decode(errors="replace")
                    self._fail(peer, f"party {peer.name!r} reported: {text}")
                    return
                peer.queues[ch].put((kind, dt, buf))
        except socket.timeout:
            self._fail(peer, f"party {peer.name!r} sent nothing, not even a heartbeat, for "
                             f"tls.silence_s={self.silence_s:g}s: it is stopped, hung or unreachable")
        except (_Eof, OSError, ValueError) as err:
            if not peer.bye and not self.closed:
                why = "closed without goodbye" if isinstance(err, _Eof) else str(err) or type(err).__name__
                self._fail(peer, f"lost the connection to party {peer.name!r} ({why}): it crashed, "
                                 "was killed, or its host went away")

    def _heartbeat_loop(self) -> None:
        beat = _frame(K_HEARTBEAT)
        while not self._stop.wait(self.heartbeat_s / 4):
            now = time.monotonic()
            for p in self.peers.values():
                if p.out is None or now - p.last_sent < self.heartbeat_s:
                    continue
                if not p.lock.acquire(blocking=False):
                    continue  # the main thread is writing: data flows
                try:
                    if select.select([], [p.out], [], 0)[1]:  # never block on a full buffer
                        p.out.sendall(beat)
                        p.last_sent = now
                except (OSError, ValueError):
                    pass  # the reader of that peer reports the loss
                finally:
                    p.lock.release()

    # ---- data ---------------------------------------------------------------
    def send(self, dst: int, kind: int, ch: int, payload, dt: int = 0) -> None:
        self._raise()
        peer = self.peers[dst]
        if peer.bye:
            raise PeerLost(f"party {peer.name!r} has finished and closed its connection; "
                           f"{self.me!r} still had data for it (the parties disagree on the protocol)")
        n = len(payload)
        hdr = _HDR.pack(kind, ch, dt, 0, n)
        with peer.lock:
            try:
                if n <= _SMALL:
                    peer.out.sendall(hdr + bytes(payload))
                else:
                    peer.out.sendall(hdr)
                    peer.out.sendall(payload)
            except socket.timeout:
                raise self._fail(peer, f"party {peer.name!r} accepted no data for timeouts.op_s="
                                       f"{self.op_s:g}s: it is stopped or overloaded") from None
            except (OSError, ValueError) as err:
                self._raise()
                raise self._fail(peer, f"lost the connection to party {peer.name!r} while sending "
                                       f"({err}): it crashed, was killed, or its host went away") from None
            peer.last_sent = time.monotonic()
        if self._tap is not None:
            with self._tap_lock:
                self._tap.write(hdr)
                self._tap.write(payload)

    def take(self, src: int, ch: int, kind: int):
        """The next frame of ``kind`` from ``src`` on ``ch``: (dtype code, payload tensor)."""
        self._raise()
        peer = self.peers[src]
        deadline = time.monotonic() + self.op_s
        while True:
            try:
                item = peer.queues[ch].get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                self._raise()
                if time.monotonic() >= deadline:
                    raise self._fail(peer, f"{self.me!r} waited timeouts.op_s={self.op_s:g}s for data "
                                           f"from party {peer.name!r}, in vain")
                continue
            self._raise()
            if item is None:
                if peer.bye:
                    raise PeerLost(f"party {peer.name!r} finished and closed its connection while "
                                   f"{self.me!r} still waited for data from it")
                continue
            got_kind, dt, buf = item
            if got_kind != kind:
                raise PeerLost(f"protocol mismatch with party {peer.name!r}: expected a frame of kind "
                               f"{kind}, got {got_kind} (the parties run different code)")
            return dt, buf

    def close(self, clean: bool, reason: str = "") -> None:
        """Say goodbye (or forward the failure) to every peer and close every socket."""
        if self.closed:
            return
        if not clean and self.failure is None and reason:
            note = _frame(K_ABORT, payload=reason.encode()[:4000])
            for p in self.peers.values():
                if not p.bye:
                    self._try_send_raw(p, note, wait_s=2.0)
        elif clean:
            for p in self.peers.values():
                self._try_send_raw(p, _frame(K_BYE), wait_s=2.0)
        self.closed = True
        self._stop.set()
        self._stop_listening()
        for p in self.peers.values():
            for s in (p.out, p.inc):
                if s is not None:
                    try:
                        s.close()
                    except OSError:
                        pass
        if self._tap is not None:
            self._tap.close()


class _TlsOps(DistributedCommunicator):
    """CrypTen's raw operations over a :class:`Mesh`.

    Sits *below* :class:`PartyCommunicator` in the method resolution order of
    :class:`TlsCommunicator`, so the accounting and audit of PartyCommunicator
    wrap these exactly as they wrap gloo's.
    """

    mesh: Mesh

    # ---- tensors ------------------------------------------------------------
    def _send_t(self, dst: int, ch: int, t: torch.Tensor) -> None:
        self.mesh.send(dst, K_TENSOR, ch, _tensor_bytes(t), _CODE.get(t.dtype, 0))

    def _recv_t(self, src: int, ch: int, like: torch.Tensor) -> torch.Tensor:
        if src is None:
            raise RuntimeError("the TLS transport needs the source rank of every receive")
        dt, buf = self.mesh.take(src, ch, K_TENSOR)
        like = plain_ring(like)
        want = like.numel() * like.element_size()
        if _CODE.get(like.dtype, 0) != dt or buf.numel() != want:
            got = _DTYPES[dt - 1] if 0 < dt <= len(_DTYPES) else f"code {dt}"
            raise PeerLost(
                f"protocol mismatch with party {self.mesh.names[src]!r}: expected {like.dtype} "
                f"{tuple(like.shape)} ({want} bytes), got {got} ({buf.numel()} bytes)")
        out = buf.view(like.dtype).view(like.shape)
        return out if like.device.type == "cpu" else out.to(like.device)

    def send(self, tensor, dst):
        self._send_t(dst, MAIN, tensor)

    def recv(self, tensor, src=None):
        return self._recv_t(src, MAIN, tensor)

    def isend(self, tensor, dst):
        self._send_t(dst, MAIN, tensor)  # never blocks for long: the peer's reader drains
        return _Request()

    def irecv(self, tensor, src=None):
        return _Request(lambda: tensor.data.copy_(self._recv_t(src, MAIN, tensor)))

    def _others(self, group=None) -> list[int]:
        return [r for r in (group or self.main_group).ranks if r != self.rank]

    def broadcast(self, input, src, group=None, batched=False):
        group = group or self.main_group
        items = input if batched else [input]
        if self.rank == src:
            for r in self._others(group):
                for t in items:
                    self._send_t(r, group.channel, t)
        else:
            for t in items:
                t.data.copy_(self._recv_t(src, group.channel, t))
        return input

    @staticmethod
    def _combine(parts: list[torch.Tensor], op, own: int) -> torch.Tensor:
        """Party r's tensors ``parts[r]`` summed (or XORed) in rank order. All but ``parts[own]`` (this party's)
        are fresh receive buffers, so the result is made in the first of them unless it is this party's."""
        result = parts[0].clone() if own == 0 else parts[0]
        for p in parts[1:]:
            if op == torch.distributed.ReduceOp.SUM:
                result += p
            elif op == torch.distributed.ReduceOp.BXOR:
                result ^= p
            else:
                raise RuntimeError(f"the TLS transport implements SUM and BXOR reductions, not {op}")
        return result

    def _exchange(self, items: list[torch.Tensor], to: list[int], frm: list[int]) -> dict[int, list]:
        for r in to:
            for t in items:
                self._send_t(r, MAIN, t)
        return {r: [self._recv_t(r, MAIN, t) for t in items] for r in frm}

    def all_reduce(self, input, op=torch.distributed.ReduceOp.SUM, batched=False):
        items, wrapped = plain_rings(list(input) if batched else [input])  # CrypTen's GPU shares: plain
        got = self._exchange(items, self._others(), self._others())
        got[self.rank] = items
        result = wrap_rings([self._combine([got[r][i] for r in range(self.world_size)], op, self.rank)
                             for i in range(len(items))], wrapped)
        return result if batched else result[0]

    def reduce(self, input, dst, op=torch.distributed.ReduceOp.SUM, batched=False):
        items, wrapped = plain_rings(list(input) if batched else [input])
        if self.rank != dst:
            self._exchange(items, [dst], [])
            return None
        got = self._exchange(items, [], self._others())
        got[self.rank] = items
        result = wrap_rings([self._combine([got[r][i] for r in range(self.world_size)], op, self.rank)
                             for i in range(len(items))], wrapped)
        return result if batched else result[0]

    def gather(self, tensor, dst):
        if self.rank != dst:
            self._exchange([tensor], [dst], [])
            return [None]
        got = self._exchange([tensor], [], self._others())
        return [tensor.clone() if r == self.rank else got[r][0] for r in range(self.world_size)]

    def all_gather(self, tensor):
        got = self._exchange([tensor], self._others(), self._others())
        return [tensor.clone() if r == self.rank else got[r][0] for r in range(self.world_size)]

    def scatter(self, scatter_list, src, size=None, device=None):
        if self.rank == src:
            for r in self._others():
                self._send_t(r, MAIN, scatter_list[r])
            return scatter_list[self.rank]
        if size is None:
            size = scatter_list[self.rank].size()
        like = torch.empty(size=size, dtype=torch.long)
        result = self._recv_t(src, MAIN, like)
        return result if device is None else result.to(device)

    def barrier(self):
        self.group_barrier(self.main_group)

    def group_barrier(self, group: Group) -> None:
        others = self._others(group)
        for r in others:
            self.mesh.send(r, K_BARRIER, group.channel, b"")
        for r in others:
            self.mesh.take(r, group.channel, K_BARRIER)

    # ---- objects ------------------------------------------------------------
    def send_obj(self, obj, dst, group=None):
        self.mesh.send(dst, K_OBJ, (group or self.main_group).channel, pickle.dumps(obj))

    def recv_obj(self, src, group=None):
        _, buf = self.mesh.take(src, (group or self.main_group).channel, K_OBJ)
        return serial.restricted_loads(buf.numpy().tobytes())

    def broadcast_obj(self, obj, src, group=None):
        group = group or self.main_group
        if self.rank == src:
            data = pickle.dumps(obj)
            for r in self._others(group):
                self.mesh.send(r, K_OBJ, group.channel, data)
            return obj
        return self.recv_obj(src, group)


class TlsCommunicator(PartyCommunicator, _TlsOps):
    """:class:`PartyCommunicator` (accounting, audit) over the mutual-TLS mesh."""

    def __init__(self, *, mesh: Mesh, world_size: int, init_ttp: bool, name: str,
                 audit: Audit | None = None):
        # Not calling PartyCommunicator.__init__: it builds gloo process groups.
        self.mesh = mesh
        self._init_state(rank=mesh.rank, world_size=world_size, name=name, audit=audit, backend="tls")
        total = world_size + 1 if init_ttp else world_size
        self.main_group = Group(MAIN, list(range(world_size)))
        self.ttp_group = Group(TTP, list(range(total)))
        self.ttp_comm_group = Group(TTP_COMM, [0, total - 1])
        self.ttp_initialized = init_ttp

    @property
    def closed(self) -> bool:
        return self.mesh.closed

    def _group_size(self, group) -> int:
        return (group or self.main_group).size()

    def get_rank(self):
        return self.rank

    def get_world_size(self):
        return self.world_size

    def get_ttp_rank(self):
        return self.world_size

    def get_distributed_backend(self):
        return "tls"

    def close(self, clean: bool, reason: str = "") -> None:
        """Shut down: party 0 tells the dealer to stop, then everyone says goodbye."""
        try:
            if clean and self.rank == 0 and self.ttp_initialized and self.mesh.failure is None:
                self.send_obj("terminate", self.get_ttp_rank(), self.ttp_group)
        except PeerLost as err:
            log.debug("shutdown: %s", err)
            clean = False
        self.mesh.close(clean, reason)
        if DistributedCommunicator.instance is self:
            DistributedCommunicator.instance = None


# ---- CrypTen glue -------------------------------------------------------------

_original_is_initialized = DistributedCommunicator.__dict__["is_initialized"].__func__


def _is_initialized(cls) -> bool:
    inst = cls.instance
    inst = getattr(inst, "wrapped", inst)  # the offline phase's dry communicator wraps the real one
    if isinstance(inst, TlsCommunicator):
        return not inst.closed
    return _original_is_initialized(cls)


def _patch_crypten() -> None:
    """``crypten.communicator.get()`` asks ``torch.distributed.is_initialized()``; TLS has no process group."""
    DistributedCommunicator.is_initialized = classmethod(_is_initialized)


def is_tls(comm) -> bool:
    return isinstance(comm, TlsCommunicator)


def init_ttp_client(comm: TlsCommunicator) -> None:
    """CrypTen's ``TTPClient._init`` without torch.distributed: the dealer's seed comes over TLS."""
    from .dealer import install_client

    seed = comm._recv_t(comm.get_ttp_rank(), TTP, torch.empty(prg.seed_size(), dtype=torch.long))
    comm.group_barrier(comm.ttp_group)
    install_client(comm.ttp_group, comm.ttp_comm_group, seed)


def setup_dealer_generators(server, comm: TlsCommunicator) -> None:
    """The dealer's half (``TTPServer._setup_generators``): one fresh seed per party, over TLS, and that
    party's streams from it (mpc_lm/prg.py)."""
    seeds = [prg.new_seed() for _ in range(comm.world_size)]
    for rank, seed in enumerate(seeds):
        comm._send_t(rank, TTP, seed)
    server.generators, server.generators_cuda = map(list, zip(*(prg.generators(s) for s in seeds)))
    comm.group_barrier(comm.ttp_group)


# ---- set-up from a config -----------------------------------------------------

def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _local_address_towards(host: str, port: int) -> str:
    """The address of this host's interface that routes to ``host`` (no packet is sent)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def connect(cfg, name: str, store, audit: Audit | None = None) -> TlsCommunicator:
    """Build this party's TLS mesh (addresses exchanged through ``store``) and its communicator."""
    tls = cfg.tls
    if tls is None:
        raise ConfigError("rendezvous.backend is 'tls' but the config has no tls: section")
    pki.check_tls_files(cfg, own=name)
    files = tls.files_for(name)
    try:
        server_ctx, client_ctx = make_contexts(tls.ca, files.cert, files.key)
    except (ssl.SSLError, OSError) as err:
        raise ConfigError(f"cannot load the TLS files of party {name!r} ({files.cert}, {files.key}, "
                          f"tls.ca {tls.ca}): {err}") from None
    rank = cfg.rank_of(name)
    total = cfg.world_size + (1 if cfg.dealer else 0)
    names = [cfg.party_at(r).name for r in range(total)]
    rdv = cfg.rendezvous
    tap_dir = os.environ.get(TAP_ENV)
    mesh = Mesh(rank, names, op_s=cfg.timeouts.op_s, heartbeat_s=tls.heartbeat_s,
                silence_s=tls.silence_s, digest=cfg.digest(),
                tap_path=Path(tap_dir) / f"{name}.plain" if tap_dir else None)
    listen_host = tls.listen_host or ("127.0.0.1" if _is_loopback(rdv.host) else "0.0.0.0")
    port = mesh.listen(listen_host, tls.port_for(name, rank, rdv.port))
    adv_host, adv_port = tls.advertised(name)
    if adv_host is None:
        adv_host = rdv.host if rank == 0 else (
            "127.0.0.1" if _is_loopback(rdv.host) else _local_address_towards(rdv.host, rdv.port))
    store.set(f"addr/{rank}", json.dumps([adv_host, adv_port or port]))
    log.info("TLS listener on %s:%d, advertised as %s:%d", listen_host, port, adv_host, adv_port or port)

    def lookup(r: int, deadline: float) -> tuple[str, int]:
        while not store.check([f"addr/{r}"]):
            if time.monotonic() > deadline:
                raise RendezvousError(f"party {names[r]!r} did not publish its TLS address within "
                                      "timeouts.startup_s")
            time.sleep(0.05)
        host, p = json.loads(store.get(f"addr/{r}"))
        return str(host), int(p)

    deadline = time.monotonic() + cfg.timeouts.startup_s
    try:
        mesh.establish(server_ctx, client_ctx, lookup, deadline)
    except BaseException:
        mesh.close(clean=False)
        raise
    _patch_crypten()
    return TlsCommunicator(mesh=mesh, world_size=cfg.world_size, init_ttp=cfg.dealer is not None,
                           name=name, audit=audit)


def shutdown(comm: TlsCommunicator, clean: bool) -> None:
    """Called by :func:`mpc_lm.runtime._shutdown` in its ``finally``: forward the error in flight."""
    err = sys.exc_info()[1]
    reason = "" if err is None else (str(err).splitlines() or [type(err).__name__])[0][:500]
    if not clean and not reason:
        reason = "it stopped with an error (see its log)"
    comm.close(clean, reason)
