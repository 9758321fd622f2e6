"""Helpers for the TLS transport tests: ports, certificates, configs, a recording TCP proxy.

Ports: the TLS tests use 29900-29999 (blocks of 8: rendezvous, listeners, proxies).
"""

from __future__ import annotations

import itertools
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from conftest import write_config

ROOT = Path(__file__).resolve().parent.parent
_BLOCKS = itertools.count((os.getpid() % 12) * 8)


def _free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def port_block(n: int = 8) -> int:
    """First port of ``n`` consecutive free ports in 29900-29999."""
    for _ in range(40):
        base = 29900 + (next(_BLOCKS) * 8) % 96
        if all(_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no free block of ports in 29900-29999")


def tls_config(tmp_path: Path, model_path, certs: Path, *, base: int | None = None, tls_extra=None,
               timeouts=None, **kw) -> Path:
    """A consortium config (vendor, hospital, dealer) on the TLS transport."""
    base = port_block() if base is None else base
    tls = {"ca": str(certs / "ca.pem"), "dir": str(certs), "heartbeat_s": 0.5, "silence_s": 6,
           "ports": {"vendor": base + 1, "hospital": base + 2, "dealer": base + 3}, **(tls_extra or {})}
    return write_config(tmp_path, model_path, rendezvous={"host": "127.0.0.1", "port": base, "backend": "tls"},
                        tls=tls, timeouts=timeouts, **kw)


def edit_config(path: Path, fn) -> Path:
    data = yaml.safe_load(path.read_text())
    fn(data)
    path.write_text(yaml.safe_dump(data))
    return path


def party(cfg: Path, name: str, log: Path, netns: str | None = None, env_extra=None) -> subprocess.Popen:
    """Start ``mpc-lm party CFG --name NAME`` in its own session, output to ``log``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "mpc_lm.cli", "party", str(cfg), "--name", name]
    if netns:
        cmd = ["ip", "netns", "exec", netns] + cmd
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, stdin=subprocess.DEVNULL)


def wait_for_text(paths: list[Path], text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(p.exists() and text in p.read_text(errors="replace") for p in paths):
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in all of {paths} within {timeout}s:\n" +
                         "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-2000:]}" for p in paths if p.exists()))


class Wiretap:
    """A TCP proxy on 127.0.0.1:``listen`` to ``target`` that records every byte it forwards."""

    def __init__(self, listen: int, target: int):
        self.captured = bytearray()
        self._lock = threading.Lock()
        self._srv = socket.create_server(("127.0.0.1", listen))
        self._srv.settimeout(0.2)
        self._target = target
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._srv.accept()
            except (socket.timeout, OSError):
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self._target), timeout=5)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([a, b], [], [], 0.2)
                for s in ready:
                    data = s.recv(1 << 20)
                    if not data:
                        return
                    with self._lock:
                        self.captured += data
                    peer[s].sendall(data)
        except OSError:
            pass
        finally:
            a.close()
            b.close()

    def close(self) -> None:
        self._stop.set()
        self._srv.close()
