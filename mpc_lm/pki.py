"""Certificates for the TLS transport: a consortium CA for tests and pilots, and checks.

``mpc-lm certs DIR --parties a,b,c`` (or ``--config CONFIG``) writes

* ``DIR/ca.pem`` and ``DIR/ca.key``: a consortium CA (EC P-256). Keep ``ca.key``
  offline, with whoever issues certificates; parties never need it.
* ``DIR/NAME.pem`` and ``DIR/NAME.key`` per party: a certificate with subject
  CN=NAME and SAN DNS:NAME, usable as TLS client and server, signed by the CA.

A real consortium uses its own PKI instead (docs/transport.md): any CA whose
certificates carry the party name in the subject CN or a SAN DNS entry works;
point ``tls.ca`` at that CA (or at a bundle) and ``tls.parties.NAME`` at each
party's files. :func:`check_tls_files` validates what a host holds at config
load time, with errors that name the file and the fix.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

from .errors import ConfigError

CA_NAME = "mpc-lm consortium CA"


def _crypto():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as err:  # pragma: no cover - install_requires has it
        raise ConfigError(f"the TLS transport needs the 'cryptography' package ({err}); "
                          "pip install cryptography") from None
    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def make_ca(directory: Path, days: int = 825, name: str = CA_NAME):
    """Create ``ca.pem``/``ca.key`` in ``directory``; return (cert, key)."""
    x509, hashes, serialization, ec, _, NameOID = _crypto()
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(directory / "ca.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert, key


def make_party_cert(directory: Path, name: str, ca_cert, ca_key, days: int = 397,
                    file_stem: str | None = None) -> tuple[Path, Path]:
    """Create ``NAME.pem``/``NAME.key`` signed by (ca_cert, ca_key); return their paths."""
    x509, hashes, serialization, ec, EKU, NameOID = _crypto()
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([EKU.SERVER_AUTH, EKU.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    stem = file_stem or name
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


def load_ca(directory: Path):
    """(cert, key) of an existing ``ca.pem``/``ca.key`` in ``directory``."""
    x509, _, serialization, *_ = _crypto()
    cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    return cert, key


def create_consortium(directory: Path, parties: list[str], days: int = 397, force: bool = False) -> list[Path]:
    """A CA (reused if ``DIR/ca.key`` exists) and a key + certificate per party; returns files written."""
    directory = Path(directory)
    if (directory / "ca.pem").exists() and (directory / "ca.key").exists():
        ca_cert, ca_key = load_ca(directory)
        written = []
    else:
        ca_cert, ca_key = make_ca(directory)
        written = [directory / "ca.pem", directory / "ca.key"]
    for name in parties:
        if (directory / f"{name}.pem").exists() and not force:
            raise ConfigError(f"{directory / (name + '.pem')} exists; pass --force to replace it")
        written += list(make_party_cert(directory, name, ca_cert, ca_key, days=days))
    return written


# ---- checks -----------------------------------------------------------------

def cert_names(cert) -> list[str]:
    """Subject CN values and SAN DNS names of a ``cryptography`` certificate."""
    x509, *_, NameOID = _crypto()
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names += san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        pass
    return list(dict.fromkeys(str(n) for n in names))


def peer_names(peercert: dict) -> list[str]:
    """The same names from ``ssl.SSLSocket.getpeercert()`` (a verified certificate)."""
    names = [value for rdn in peercert.get("subject", ()) for key, value in rdn if key == "commonName"]
    names += [value for kind, value in peercert.get("subjectAltName", ()) if kind == "DNS"]
    return list(dict.fromkeys(names))


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read {what} {path}: {err}") from None


def _load_certs(path: Path, what: str) -> list:
    x509, *_ = _crypto()
    data = _read(path, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as err:
        raise ConfigError(f"{what} {path} is not a PEM certificate ({err})") from None
    return certs


def _signed_by(cert, cas) -> bool:
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
            return True
        except Exception:  # InvalidSignature, ValueError (issuer name), TypeError (key type)
            continue
    return False


def check_party_cert(name: str, cert_path: Path, cas: list, ca_path: Path):
    """The certificate at ``cert_path`` is valid now, signed by the CA, and names ``name``."""
    cert = _load_certs(cert_path, f"certificate of party {name!r}")[0]
    if not _signed_by(cert, cas):
        raise ConfigError(
            f"the certificate of party {name!r} ({cert_path}) is not signed by the consortium CA "
            f"tls.ca={ca_path}; issue it from that CA (mpc-lm certs) or point tls.ca at its issuer"
        )
    names = cert_names(cert)
    if name not in names:
        raise ConfigError(
            f"the certificate of party {name!r} ({cert_path}) is issued to {names}, not {name!r}: "
            "the subject CN or a SAN DNS entry must be the party's name in the config"
        )
    now = _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ConfigError(
            f"the certificate of party {name!r} ({cert_path}) is valid only from "
            f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}; renew it"
        )
    return cert


def check_party_key(name: str, key_path: Path, cert, cert_path: Path) -> None:
    _, _, serialization, *_ = _crypto()
    data = _read(key_path, f"private key of party {name!r}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"private key of party {name!r} {key_path} cannot be loaded "
                          f"(an unencrypted PEM key is needed): {err}") from None
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*fmt) != cert.public_key().public_bytes(*fmt):
        raise ConfigError(f"private key {key_path} of party {name!r} does not belong to its certificate {cert_path}")


def check_tls_files(cfg, own: str | list[str] | None = None) -> None:
    """Validate ``cfg.tls`` against the files on this host.

    The CA must exist. Every party certificate present here is checked (signed by
    the CA, carries the party's name, in its validity period); those absent are
    on other hosts. For the parties in ``own`` (this host's), the certificate
    and the key must exist and match.
    """
    tls = cfg.tls
    if tls is None:
        return
    own = [own] if isinstance(own, str) else list(own or [])
    try:
        cas = _load_certs(tls.ca, "tls.ca (the consortium CA certificate)")
    except ConfigError as err:
        raise ConfigError(f"{err}; create a consortium CA and certificates with 'mpc-lm certs DIR "
                          "--config CONFIG', or point tls.ca at your organisation's CA") from None
    for party in cfg.parties:
        files = tls.files_for(party.name)
        if files is None:
            raise ConfigError(
                f"tls: no certificate for party {party.name!r}: set tls.dir (holding NAME.pem and "
                f"NAME.key) or tls.parties.{party.name}.cert/key"
            )
        try:
            present = files.cert.is_file()
        except (OSError, ValueError):
            present = False
        if not present and party.name not in own:
            continue
        cert = check_party_cert(party.name, files.cert, cas, tls.ca)
        if party.name in own:
            check_party_key(party.name, files.key, cert, files.cert)
