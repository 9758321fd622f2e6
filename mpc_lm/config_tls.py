"""The ``tls:`` section of the consortium config (mutual TLS between parties).

Used when ``rendezvous.backend: tls`` (docs/transport.md)::

    tls:
      ca: certs/ca.pem            # the consortium CA (or a PEM bundle of trusted certificates)
      dir: certs                  # NAME.pem / NAME.key for every party NAME (convention)
      parties:                    # optional per-party paths (override dir)
        vendor: {cert: /etc/vendor/mpc.pem, key: /etc/vendor/mpc.key}
      ports: {vendor: 29601}      # optional listener ports (default rendezvous.port + 1 + rank)
      advertise: {vendor: 10.0.0.5}   # optional address the others dial ("host" or "host:port")

Relative paths are relative to the config file. The files are checked at load
time (:func:`mpc_lm.pki.check_tls_files`): the CA must exist and every
certificate present on this host must be signed by it and carry its party's
name; a party's own key and certificate must exist when it starts.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsPartyFiles(_Strict):
    cert: Path = Field(description="PEM certificate whose subject CN or SAN is the party's name")
    key: Path = Field(description="PEM private key of that certificate (keep it private: 0600)")


class TlsSettings(_Strict):
    """Mutual TLS 1.3 between every pair of parties; each side pins the other's name."""

    ca: Path = Field(description="PEM file: the consortium CA, or a bundle of trusted certificates")
    dir: Path | None = Field(None, description="directory holding NAME.pem and NAME.key per party")
    parties: dict[str, TlsPartyFiles] = Field(default_factory=dict)
    ports: dict[str, int] = Field(default_factory=dict, description="listener port per party "
                                  "(default rendezvous.port + 1 + rank; 0: any free port)")
    advertise: dict[str, str] = Field(default_factory=dict, description="address the other parties "
                                      "dial for this party, 'host' or 'host:port' (default: the local "
                                      "address that reaches the rendezvous host)")
    listen_host: str | None = Field(None, description="address the listener binds (default 127.0.0.1 "
                                    "when the rendezvous host is loopback, else 0.0.0.0)")
    heartbeat_s: float = Field(1.0, gt=0, le=60, description="a party sends a heartbeat to each idle peer this often")
    silence_s: float = Field(15.0, gt=0, le=3600, description="a peer silent this long (no data, no "
                             "heartbeat) is declared lost: a stopped or unreachable party")

    @field_validator("ports")
    @classmethod
    def _ports(cls, value: dict[str, int]) -> dict[str, int]:
        bad = {n: p for n, p in value.items() if not 0 <= p <= 65535}
        if bad:
            raise ValueError(f"tls.ports must be 0..65535; got {bad}")
        return value

    @field_validator("advertise")
    @classmethod
    def _advertise(cls, value: dict[str, str]) -> dict[str, str]:
        for name, addr in value.items():
            host, port = addr.split(":") if addr.count(":") == 1 else (addr, None)
            bad_port = port is not None and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536)
            if not host.strip() or bad_port:
                raise ValueError(f"tls.advertise.{name} must be 'host' or 'host:port'; got {addr!r}")
        return value

    @model_validator(mode="after")
    def _heartbeat_below_silence(self) -> "TlsSettings":
        if self.silence_s < 2 * self.heartbeat_s:
            raise ValueError(
                f"tls.silence_s ({self.silence_s:g}) must be at least twice tls.heartbeat_s "
                f"({self.heartbeat_s:g}), or healthy peers would be declared lost"
            )
        return self

    # ---- derived --------------------------------------------------------
    def files_for(self, name: str) -> TlsPartyFiles | None:
        if name in self.parties:
            return self.parties[name]
        if self.dir is not None:
            return TlsPartyFiles(cert=self.dir / f"{name}.pem", key=self.dir / f"{name}.key")
        return None

    def port_for(self, name: str, rank: int, rendezvous_port: int) -> int:
        if name in self.ports:
            return self.ports[name]
        port = rendezvous_port + 1 + rank
        return port if port <= 65535 else 0

    def advertised(self, name: str) -> tuple[str | None, int | None]:
        addr = self.advertise.get(name)
        if addr is None:
            return None, None
        if addr.count(":") == 1:
            host, port = addr.rsplit(":", 1)
            return host, int(port)
        return addr.strip("[]"), None

    def resolve_paths(self, base: Path) -> "TlsSettings":
        def fix(p: Path | None) -> Path | None:
            return p if p is None or p.is_absolute() else (base / p).resolve()

        return self.model_copy(update={
            "ca": fix(self.ca), "dir": fix(self.dir),
            "parties": {n: TlsPartyFiles(cert=fix(f.cert), key=fix(f.key)) for n, f in self.parties.items()},
        })
