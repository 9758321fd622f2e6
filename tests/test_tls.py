"""The mutual-TLS transport (docs/transport.md): certificates, config checks, impostors,
encrypted inference, what a wiretap sees, and parties on separate network namespaces.

Ports 29900-29999 (tests/_tls_helpers.py).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from _tls_helpers import ROOT, Wiretap, edit_config, party, port_block, tls_config
from conftest import TEXTS, write_config
from mpc_lm import pki
from mpc_lm import tls_transport as T
from mpc_lm.config import load_config
from mpc_lm.errors import ConfigError, InsecureConfigError, RendezvousError

PARTIES = ["vendor", "hospital", "dealer"]


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    pki.create_consortium(d, PARTIES)
    return d


@pytest.fixture(scope="session")
def rogue(tmp_path_factory, certs) -> dict[str, tuple[Path, Path]]:
    """Would-be impostors' (certificate, key) pairs."""
    d = tmp_path_factory.mktemp("rogue")
    pki.make_ca(d / "self", name="vendor")  # self-signed, claims to be vendor
    other_ca = pki.make_ca(d / "other")  # another CA issuing a 'vendor' certificate
    pki.make_party_cert(d / "other", "vendor", *other_ca)
    pki.make_party_cert(d / "mallory", "mallory", *pki.load_ca(certs))  # our CA, not a party
    return {"self-signed": (d / "self/ca.pem", d / "self/ca.key"),
            "other CA": (d / "other/vendor.pem", d / "other/vendor.key"),
            "not a party": (d / "mallory/mallory.pem", d / "mallory/mallory.key"),
            "no certificate": (None, None)}


# ---- certificates and config ----------------------------------------------------------

def test_certs_command_creates_a_consortium_pki(tmp_path):
    from mpc_lm.cli import main

    assert main(["certs", str(tmp_path / "pki"), "--parties", "a,b"]) == 0
    files = sorted(p.name for p in (tmp_path / "pki").iterdir())
    assert files == ["a.key", "a.pem", "b.key", "b.pem", "ca.key", "ca.pem"]
    assert all((tmp_path / "pki" / f).stat().st_mode & 0o077 == 0 for f in files if f.endswith(".key"))
    cas = pki._load_certs(tmp_path / "pki/ca.pem", "ca")
    cert = pki.check_party_cert("a", tmp_path / "pki/a.pem", cas, tmp_path / "pki/ca.pem")
    pki.check_party_key("a", tmp_path / "pki/a.key", cert, tmp_path / "pki/a.pem")
    with pytest.raises(ConfigError, match="exists; pass --force"):
        pki.create_consortium(tmp_path / "pki", ["a"])


def _tls_cfg(tmp_path, model, certs, **kw):
    return tls_config(tmp_path, model, certs, base=29990, **kw)  # never started: any port


def test_tls_config_loads_and_resolves_relative_paths(tmp_path, tiny_models, certs):
    shutil.copytree(certs, tmp_path / "pki")
    path = _tls_cfg(tmp_path, tiny_models["bert"], certs)
    edit_config(path, lambda d: d["tls"].update(ca="pki/ca.pem", dir="pki"))
    cfg = load_config(path)
    assert cfg.rendezvous.backend == "tls" and cfg.tls.ca == (tmp_path / "pki/ca.pem").resolve()
    assert cfg.tls.files_for("hospital").key == (tmp_path / "pki/hospital.key").resolve()


@pytest.mark.parametrize("case, expected", [
    ("missing CA", "tls.ca .* does not exist"),
    ("not signed by the CA", "not signed by the consortium CA"),
    ("name mismatch", r"issued to \['hospital'\], not 'vendor'"),
    ("no tls section", "no tls: section"),
    ("unknown party", r"tls.ports names unknown parties \['mallory'\]"),
    ("silence below heartbeat", "at least twice tls.heartbeat_s"),
    ("not a certificate", "is not a PEM certificate"),
])
def test_bad_tls_config_is_refused_at_load(tmp_path, tiny_models, certs, rogue, case, expected):
    pkd = tmp_path / "pki"
    shutil.copytree(certs, pkd)
    path = _tls_cfg(tmp_path, tiny_models["bert"], pkd)
    if case == "missing CA":
        (pkd / "ca.pem").unlink()
    elif case == "not signed by the CA":
        shutil.copy(rogue["other CA"][0], pkd / "vendor.pem")
    elif case == "name mismatch":
        shutil.copy(pkd / "hospital.pem", pkd / "vendor.pem")
    elif case == "no tls section":
        edit_config(path, lambda d: d.pop("tls"))
    elif case == "unknown party":
        edit_config(path, lambda d: d["tls"]["ports"].update(mallory=1))
    elif case == "silence below heartbeat":
        edit_config(path, lambda d: d["tls"].update(heartbeat_s=5, silence_s=6))
    elif case == "not a certificate":
        (pkd / "dealer.pem").write_text("hello")
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


def test_own_key_is_required_when_the_party_starts(tmp_path, tiny_models, certs):
    pkd = tmp_path / "pki"
    shutil.copytree(certs, pkd)
    (pkd / "hospital.key").unlink()
    cfg = load_config(_tls_cfg(tmp_path, tiny_models["bert"], pkd))  # fine: other hosts hold keys
    with pytest.raises(ConfigError, match="private key of party 'hospital' .* does not exist"):
        pki.check_tls_files(cfg, own="hospital")
    shutil.copy(pkd / "vendor.key", pkd / "hospital.key")
    with pytest.raises(ConfigError, match="does not belong to its certificate"):
        pki.check_tls_files(cfg, own="hospital")


def test_gloo_is_refused_off_loopback_unless_insecure_mode(tmp_path, tiny_models):
    path = write_config(tmp_path, tiny_models["bert"], rendezvous={"host": "10.1.2.3", "port": 29999})
    with pytest.raises(InsecureConfigError, match="not a loopback address.*backend: tls"):
        load_config(path)
    edit_config(path, lambda d: d["security"].update(insecure_development_mode=True))
    assert load_config(path).rendezvous.backend == "gloo"


# ---- impostors, at the transport level (in-process, fast) -------------------------

def _mesh(names, rank, certs, store, deadline_s=15.0, digest="d"):
    sctx, cctx = T.make_contexts(certs / "ca.pem", certs / f"{names[rank]}.pem", certs / f"{names[rank]}.key")
    mesh = T.Mesh(rank, names, op_s=10, heartbeat_s=0.5, silence_s=5, digest=digest)
    port = mesh.listen("127.0.0.1", 0)
    store.set(f"addr/{rank}", json.dumps(["127.0.0.1", port]))

    def lookup(r, deadline):
        while not store.check([f"addr/{r}"]):
            if time.monotonic() > deadline:
                raise RendezvousError("no address")
            time.sleep(0.01)
        host, p = json.loads(store.get(f"addr/{r}"))
        return host, p

    errors = []

    def run():
        try:
            mesh.establish(sctx, cctx, lookup, time.monotonic() + deadline_s)
        except Exception as err:  # noqa: BLE001 - reported to the test
            errors.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return mesh, port, thread, errors


def _impostor_client(port, cert, key, claim=1):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # an impostor trusts anyone
    if cert:
        ctx.load_cert_chain(cert, key)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as s:
            s.sendall(T._frame(T.K_HELLO, payload=json.dumps(
                {"rank": claim, "name": "hospital", "digest": "d"}).encode()))
            return T._read_frame(s)  # an ACK would mean it was let in
    except (ssl.SSLError, OSError, T._Eof) as err:
        return err


def test_impostors_are_refused_and_the_real_party_gets_in(certs, rogue):
    import torch.distributed as dist

    store = dist.HashStore()
    names = ["vendor", "hospital"]
    vendor, port, vthread, verr = _mesh(names, 0, certs, store)
    for label, (cert, key) in rogue.items():
        outcome = _impostor_client(port, cert, key)
        assert isinstance(outcome, Exception), f"{label}: impostor was let in: {outcome}"
    deadline = time.monotonic() + 10
    while len(vendor.refused) < len(rogue) and time.monotonic() < deadline:
        time.sleep(0.05)
    reasons = [r for _, r in vendor.refused]
    assert len(reasons) == len(rogue), reasons
    assert any("certificate verify failed" in r or "unknown ca" in r.lower() for r in reasons), reasons
    assert any("['mallory']" in r and "no other party" in r for r in reasons), reasons
    assert any("did not return a certificate" in r for r in reasons), reasons
    assert sum("certificate verify failed" in r for r in reasons) == 2, reasons  # self-signed, other CA
    hospital, _, hthread, herr = _mesh(names, 1, certs, store)
    vthread.join(20), hthread.join(20)
    assert not verr and not herr, (verr, herr)
    a = T.TlsCommunicator(mesh=vendor, world_size=2, init_ttp=False, name="vendor")
    b = T.TlsCommunicator(mesh=hospital, world_size=2, init_ttp=False, name="hospital")
    x = torch.arange(1000, dtype=torch.long)
    a.send(x, 1)
    assert torch.equal(b.recv(torch.empty_like(x), 0), x)
    # once the mesh is complete the listener is closed: even a real certificate gets no connection
    assert isinstance(_impostor_client(port, certs / "hospital.pem", certs / "hospital.key"), Exception)
    a.close(True), b.close(True)


def test_a_server_with_the_wrong_name_is_refused(certs, rogue):
    """A forged address in the (unauthenticated) store leads the dialer to a rogue server."""
    import torch.distributed as dist

    srv_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    srv_ctx.load_cert_chain(*rogue["not a party"])  # signed by our CA, but named mallory
    listener = socket.create_server(("127.0.0.1", 0))
    fake_port = listener.getsockname()[1]

    def serve():
        try:
            while True:
                conn, _ = listener.accept()
                try:
                    srv_ctx.wrap_socket(conn, server_side=True).recv(1)
                except (ssl.SSLError, OSError):
                    pass
        except OSError:
            return

    threading.Thread(target=serve, daemon=True).start()
    store = dist.HashStore()
    store.set("addr/0", json.dumps(["127.0.0.1", fake_port]))  # the attacker's entry for vendor
    hospital, _, thread, errors = _mesh(["vendor", "hospital"], 1, certs, store, deadline_s=3)
    thread.join(20)
    listener.close()
    assert errors and isinstance(errors[0], RendezvousError)
    msg = str(errors[0])
    assert "to party 'vendor'" in msg and "certificate for ['mallory']" in msg
    hospital.close(False)


# ---- encrypted inference over mutual TLS, with a wiretap ------------------------------

def _frames(data: bytes):
    pos = 0
    while pos + T._HDR.size <= len(data):
        kind, ch, dt, _, n = T._HDR.unpack_from(data, pos)
        yield kind, ch, dt, data[pos + T._HDR.size: pos + T._HDR.size + n]
        pos += T._HDR.size + n


def test_encrypted_inference_over_mutual_tls_leaks_nothing_on_the_wire(tmp_path, tiny_models, certs, rogue):
    from mpc_lm import report
    from mpc_lm.launch import launch

    base = port_block()
    taps = {n: Wiretap(base + 4 + i, base + 1 + i) for i, n in enumerate(PARTIES)}
    cfg = tls_config(tmp_path, tiny_models["bert"], certs, base=base, tls_extra={
        "advertise": {n: f"127.0.0.1:{base + 4 + i}" for i, n in enumerate(PARTIES)}})
    stop = threading.Event()
    impostor_tries = []

    def impostor():  # keeps knocking on the parties' listeners with a self-signed 'vendor' cert
        while not stop.is_set():
            for i in range(3):
                impostor_tries.append(_impostor_client(base + 1 + i, *rogue["self-signed"]))
            time.sleep(0.05)

    knocker = threading.Thread(target=impostor, daemon=True)
    knocker.start()
    try:
        run = launch(cfg, extra_env={T.TAP_ENV: str(tmp_path)})
    finally:
        stop.set()
        knocker.join(10)
        for tap in taps.values():
            tap.close()
    assert not any(isinstance(t, tuple) for t in impostor_tries), "an impostor was let in"
    logs = "".join((run.run_dir / "logs" / f"{n}.log").read_text() for n in PARTIES)
    assert "TLS mesh of 3 parties established" in logs
    summary = report.build(run, check=True)
    fid = summary["fidelity"]["hospital"]
    assert fid["n"] == len(TEXTS) and fid["max_abs_logit_error"] < 0.05 and fid["top1_agreement"] == 1.0
    traffic = run.results["vendor"]["traffic_total"]
    # offline phase (default): the dealer's shares arrive in a few large chunks
    assert traffic["online"]["bytes_sent"] > 1e6
    assert traffic["dealer"]["rounds"] >= 3 and traffic["dealer"]["bytes_received"] > 1e5

    wire = b"".join(bytes(t.captured) for t in taps.values())
    plain = {n: (tmp_path / f"{n}.plain").read_bytes() for n in PARTIES}
    assert len(wire) >= sum(len(p) for p in plain.values()), "the wiretap missed traffic"
    needles = []
    for name, data in plain.items():
        for kind, ch, dt, payload in _frames(data):
            if kind == T.K_TENSOR and len(payload) == 16 and ch == T.TTP:
                needles.append(("dealer key", payload))  # the dealer's AES-128 key for a party's stream
            elif kind == T.K_TENSOR and len(payload) == 8 and ch == T.MAIN and len(needles) < 8:
                needles.append(("pairwise seed", payload))  # CrypTen's zero-sharing seeds
            elif kind == T.K_TENSOR and len(payload) >= 64:
                needles.append(("share", payload[len(payload) // 2: len(payload) // 2 + 16]))
            elif kind == T.K_OBJ and b"additive" in payload:
                needles.append(("dealer request", payload[:32]))
    assert {"dealer key", "share", "dealer request"} <= {k for k, _ in needles}
    step = max(1, len(needles) // 300)
    sample = [n for n in needles if n[0] != "share"] + [n for n in needles if n[0] == "share"][::step]
    everything_sent = b"".join(plain.values())
    for label, needle in sample:
        assert needle in everything_sent  # positive control: in clear before encryption
        assert needle not in wire, f"a {label} appears in clear on the wire"
    assert b"additive" not in wire and b"hospital" not in wire[1000:]
    # the token ids of the data owner's first text, as sent by nobody but searched anyway
    from transformers import AutoTokenizer

    from mpc_lm.convert import resolve_tokenizer_path
    from mpc_lm.inputs import tokenize

    tok = AutoTokenizer.from_pretrained(str(resolve_tokenizer_path(load_config(cfg).model)))
    ids = tokenize(tok, [TEXTS[0]], 16, False).ids[0]
    assert ids[:6].to(torch.int64).numpy().tobytes() not in wire


# ---- separate network namespaces: one "host" per party --------------------------------

def _netns_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root for ip netns"
    if shutil.which("ip") is None:
        return "no ip command (iproute2)"
    probe = f"mpcprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@pytest.fixture
def three_hosts():
    """Three network namespaces on a bridge: 10.77.X.1-3/24, each its own loopback and IP."""
    reason = _netns_available()
    if reason:
        pytest.skip(reason)
    tag = os.getpid() % 10000
    net = f"10.{77 + tag % 100}.{tag // 100 % 250}"
    bridge, spaces, cmds = f"mpcbr{tag}", [f"mpcns{tag}_{i}" for i in range(3)], []

    def sh(*args):
        cmds.append(" ".join(args))
        subprocess.run(args, check=True, capture_output=True)

    try:
        sh("ip", "link", "add", bridge, "type", "bridge")
        sh("ip", "link", "set", bridge, "up")
        for i, ns in enumerate(spaces):
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", f"mpcv{tag}h{i}", "type", "veth", "peer", "name", f"mpcv{tag}p{i}")
            sh("ip", "link", "set", f"mpcv{tag}h{i}", "master", bridge)
            sh("ip", "link", "set", f"mpcv{tag}h{i}", "up")
            sh("ip", "link", "set", f"mpcv{tag}p{i}", "netns", ns)
            sh("ip", "-n", ns, "addr", "add", f"{net}.{i + 1}/24", "dev", f"mpcv{tag}p{i}")
            sh("ip", "-n", ns, "link", "set", f"mpcv{tag}p{i}", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as err:
        _teardown(bridge, spaces)
        pytest.skip(f"cannot build network namespaces ({' '.join(err.cmd)}: {err.stderr.decode().strip()})")
    yield [(ns, f"{net}.{i + 1}") for i, ns in enumerate(spaces)]
    _teardown(bridge, spaces)


def _teardown(bridge, spaces):
    for ns in spaces:
        subprocess.run(["ip", "netns", "pids", ns], capture_output=True)
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    subprocess.run(["ip", "link", "del", bridge], capture_output=True)


def test_parties_on_separate_network_namespaces(tmp_path, tiny_models, certs, three_hosts):
    from mpc_lm.reference import plaintext_outputs

    (vendor_ns, vendor_ip), (hospital_ns, _), (dealer_ns, _) = three_hosts
    cfg = tls_config(tmp_path, tiny_models["bert"], certs, base=29900,
                     tls_extra={"ports": {}, "silence_s": 10, "heartbeat_s": 1})
    edit_config(cfg, lambda d: d["rendezvous"].update(host=vendor_ip))
    loaded = load_config(cfg)
    assert loaded.rendezvous.backend == "tls"
    procs = {n: party(cfg, n, tmp_path / f"{n}.log", netns=ns)
             for n, ns in (("vendor", vendor_ns), ("hospital", hospital_ns), ("dealer", dealer_ns))}
    try:
        for n, p in procs.items():
            p.wait(timeout=240)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    logs = {n: (tmp_path / f"{n}.log").read_text() for n in procs}
    assert all(p.returncode == 0 for p in procs.values()), logs
    assert "advertised as 10." in logs["hospital"] and "TLS mesh of 3 parties established" in logs["dealer"]
    rows = [json.loads(x) for x in (tmp_path / "hospital.jsonl").read_text().splitlines()]
    secure = torch.tensor([r["logits"] for r in rows])
    plain = plaintext_outputs(loaded.model, TEXTS, loaded.job.seq_len)
    assert (secure - plain).abs().max().item() < 0.05
    # gloo on the same non-loopback address is refused before anything starts
    edit_config(cfg, lambda d: d["rendezvous"].update(backend="gloo"))
    with pytest.raises(InsecureConfigError):
        load_config(cfg)
