"""Start every party of a config on this machine and supervise them.

Like torchrun's agent: parse -> validated config -> one process per party ->
a supervisor loop. When one party fails, the others are stopped (SIGTERM,
then SIGKILL after ``timeouts.shutdown_s``) and the report names the first
failure as the root cause, with the end of its log. Every wait is bounded
by ``timeouts.run_s``. Each party's log goes to ``RUN/logs/NAME.log``. The
parties share this machine's cores (:func:`thread_env`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConsortiumConfig, Role, load_config
from .errors import ConfigError, PartyFailure
from .progress import ENV as PROGRESS_ENV

_POLL_S = 0.1


@dataclass
class RunResult:
    run_dir: Path
    config: ConsortiumConfig
    wall_s: float
    results: dict[str, dict] = field(default_factory=dict)


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _first_error_line(path: Path) -> str:
    for line in reversed(path.read_text(errors="replace").splitlines() if path.exists() else []):
        if "error:" in line and line.startswith("mpc-lm party"):
            return line
    return ""


THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def thread_env(cfg: ConsortiumConfig, environ: dict, party=None) -> dict:
    """Torch threads for ``party`` when all parties run on this machine: the computing parties work at
    the same time (each its own share of every product), so torch's default of every core per process
    oversubscribes the machine N times and the threads wait on each other; each gets cores // computing
    parties (at least 1). The dealer keeps every core: it computes while the parties wait (the offline
    phase) and waits while they compute (the online phase). A user's ``OMP_NUM_THREADS`` stands."""
    if environ.get("OMP_NUM_THREADS") or (party is not None and party.role == Role.DEALER):
        return {}
    n = str(max(1, _cores() // max(1, len(cfg.computing_parties))))
    return {name: n for name in THREAD_ENV}


def _start(cfg: ConsortiumConfig, config_path: Path, run_dir: Path, env: dict, entry=None) -> dict[str, tuple]:
    procs = {}
    for party in cfg.parties:
        log_path = run_dir / "logs" / f"{party.name}.log"
        log_file = log_path.open("w")
        cmd = [*(entry or [sys.executable, "-m", "mpc_lm.cli", "party"]), str(config_path), "--name", party.name,
               "--result", str(run_dir / f"{party.name}.json")]
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                env={**env, **thread_env(cfg, env, party)}, start_new_session=True,
                                stdin=subprocess.DEVNULL)
        procs[party.name] = (proc, log_path, log_file)
    return procs


def _stop_all(procs: dict, grace_s: float) -> None:
    for proc, _, _ in procs.values():
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    for proc, _, _ in procs.values():
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=5)
    for _, _, log_file in procs.values():
        log_file.close()


def _root_cause(procs: dict, failed: list[tuple[str, int]]) -> tuple[str, int]:
    """The party whose own error started it: others only relay ("reported") or lost contact."""
    time.sleep(0.5)  # let parties that fail together finish writing their logs
    failed = failed + [(n, p.poll()) for n, (p, _, _) in procs.items()
                       if p.poll() not in (None, 0) and n not in dict(failed)]
    for name, code in failed:
        line = _first_error_line(procs[name][1])
        if line and "reported:" not in line and "lost contact" not in line:
            return name, code
    # With the TLS transport a failing party tells the others before it writes its own
    # error line, so they may exit first: give the rest a moment to write theirs.
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        for name, (p, log_path, _) in procs.items():
            line = _first_error_line(log_path)
            if line and "reported:" not in line and "lost contact" not in line:
                return name, p.poll()
        time.sleep(0.2)
    return failed[0]


def _supervise(cfg: ConsortiumConfig, procs: dict, on_tick=None) -> None:
    deadline = time.monotonic() + cfg.timeouts.run_s
    while True:
        codes = {name: p.poll() for name, (p, _, _) in procs.items()}
        failed = [(name, c) for name, c in codes.items() if c not in (None, 0)]
        if failed:
            name, code = _root_cause(procs, failed)
            log_path = procs[name][1]
            _stop_all(procs, cfg.timeouts.shutdown_s)
            reason = _first_error_line(log_path) or f"exit code {code}"
            raise PartyFailure(
                f"party {name!r} failed first ({reason}); all other parties were stopped.\n"
                f"--- end of {log_path} ---\n{_tail(log_path)}"
            )
        if all(c == 0 for c in codes.values()):
            _stop_all(procs, 0)
            if on_tick:
                on_tick()
            return
        if time.monotonic() > deadline:
            running = [n for n, c in codes.items() if c is None]
            _stop_all(procs, cfg.timeouts.shutdown_s)
            raise PartyFailure(
                f"the run exceeded timeouts.run_s={cfg.timeouts.run_s:g}s; parties still running "
                f"{running} were stopped (raise timeouts.run_s for longer jobs)"
            )
        if on_tick:
            on_tick()
        time.sleep(_POLL_S)


def launch(config_path: str | Path, on_tick=None, extra_env: dict | None = None, entry=None) -> RunResult:
    """Run all parties of ``config_path`` locally; raise on the first failure.

    ``on_tick(run_dir)`` is called while waiting (e.g. to draw progress from
    ``run_dir / "progress"``, see :mod:`mpc_lm.progress`). ``entry``: the command that runs one
    party, before ``CONFIG --name NAME --result PATH`` (default ``python -m mpc_lm.cli party``).
    """
    config_path = Path(config_path).resolve()
    cfg = load_config(config_path)
    host, port = cfg.rendezvous.host, cfg.rendezvous.port
    if not _port_free(host, port):
        raise ConfigError(
            f"rendezvous.port {port} on {host} is in use (another run, or another program); "
            "choose a free port in the config"
        )
    if cfg.model.path.startswith("builtin:"):
        from .convert import resolve_model_path

        resolve_model_path(cfg.model)  # build the demo once, outside the parties' timeouts
    run_dir = cfg.run_dir / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", PROGRESS_ENV: str(run_dir / "progress"), **(extra_env or {})}
    started = time.perf_counter()
    procs = _start(cfg, config_path, run_dir, env, entry)
    try:
        _supervise(cfg, procs, (lambda: on_tick(run_dir)) if on_tick else None)
    except BaseException:
        _stop_all(procs, cfg.timeouts.shutdown_s)
        raise
    result = RunResult(run_dir, cfg, round(time.perf_counter() - started, 3))
    for party in cfg.parties:
        path = run_dir / f"{party.name}.json"
        if path.is_file():
            result.results[party.name] = json.loads(path.read_text())
    return result
