"""The consortium config: one YAML file that every party loads.

The schema is strict (frozen models, unknown keys refused) and validated at
load time, so a typo fails on every party before any process waits on another.
Ranks are derived from the file (parties in listed order, dealer last), and the
file's canonical hash is compared at rendezvous: a party holding a different
config is refused. See docs/config.md for the documented schema.
"""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, InsecureConfigError


class Role(str, Enum):
    MODEL_OWNER = "model_owner"
    DATA_OWNER = "data_owner"
    COMPUTE = "compute"
    DEALER = "dealer"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rendezvous(_Strict):
    """Where the first computing party hosts torch.distributed's TCP store."""

    host: str = "127.0.0.1"
    port: int = Field(29500, ge=1, le=65535)
    backend: Literal["gloo"] = "gloo"


class Timeouts(_Strict):
    """Every wait is bounded. Seconds."""

    startup_s: float = Field(120.0, gt=0, description="all parties must join within this")
    op_s: float = Field(300.0, gt=0, description="one communication step may wait this long")
    run_s: float = Field(3600.0, gt=0, description="the launcher stops a run after this")
    shutdown_s: float = Field(10.0, gt=0, description="grace period before a party is killed")


class Security(_Strict):
    """Who produces correlated randomness.

    ``ttp``: a separate dealer process (CrypTen's TTP); no computing party can
    reconstruct secrets. ``tfp``: party 0 generates the Beaver triples itself and
    can therefore reconstruct *every* secret; allowed only with
    ``insecure_development_mode: true``.
    """

    provider: Literal["ttp", "tfp"] = "ttp"
    insecure_development_mode: bool = False


class Party(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    role: Role
    device: str = "cpu"
    input: Path | None = Field(None, description="data owner: text file, one sequence per line")
    output: Path | None = Field(None, description="data owner: JSONL file it alone receives")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value != "cpu" and not (value == "cuda" or value.startswith("cuda:")):
            raise ValueError(f"device {value!r} is not 'cpu', 'cuda' or 'cuda:N'")
        return value

    @model_validator(mode="after")
    def _io_only_for_data_owners(self) -> "Party":
        if self.role != Role.DATA_OWNER and (self.input or self.output):
            raise ValueError(
                f"party {self.name!r} has role {self.role.value}; only data_owner parties take "
                "'input'/'output' (remove them or change the role)"
            )
        return self


class ModelSpec(_Strict):
    """The model owner's checkpoint. Only the model owner opens ``path``."""

    path: str = Field(description="local HF directory, or 'builtin:demo-minilm-sentiment'")
    task: Literal["sequence-classification", "embedding"] = "sequence-classification"
    tokenizer: str | None = Field(None, description="public tokenizer directory (default: path)")


class Approximations(_Strict):
    """Non-linear functions under MPC; each is documented in docs/approximations.md."""

    precision_bits: int = Field(16, ge=8, le=24)
    gelu: Literal["poly", "erf", "sigmoid"] = "poly"
    exp_iterations: int = Field(8, ge=4, le=12)
    reciprocal_iterations: int = Field(10, ge=3, le=20)
    inv_sqrt_iterations: int = Field(3, ge=1, le=10)
    max_method: Literal["log_reduction", "pairwise"] = "log_reduction"


class Job(_Strict):
    kind: Literal["classify", "embed"] = "classify"
    seq_len: int = Field(32, ge=2, le=8192, description="padded length bucket (public)")
    batch_size: int = Field(8, ge=1, le=4096)
    truncate: bool = Field(False, description="cut sequences longer than seq_len instead of failing")


class ConsortiumConfig(_Strict):
    name: str = "consortium"
    parties: list[Party]
    model: ModelSpec
    job: Job = Job()
    rendezvous: Rendezvous = Rendezvous()
    timeouts: Timeouts = Timeouts()
    security: Security = Security()
    approx: Approximations = Approximations()
    run_dir: Path = Path("runs")

    @model_validator(mode="after")
    def _roles(self) -> "ConsortiumConfig":
        names = [p.name for p in self.parties]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"party names must be unique; repeated: {dup}")
        count = {role: sum(p.role == role for p in self.parties) for role in Role}
        if count[Role.MODEL_OWNER] != 1:
            raise ValueError(
                f"exactly one party must have role model_owner; found {count[Role.MODEL_OWNER]}"
            )
        if count[Role.DATA_OWNER] < 1:
            raise ValueError("at least one party must have role data_owner; found none")
        if count[Role.DEALER] > 1:
            raise ValueError(f"at most one party may have role dealer; found {count[Role.DEALER]}")
        if self.security.provider == "ttp" and count[Role.DEALER] == 0:
            raise ValueError(
                "security.provider is 'ttp' but no party has role dealer: add a party with "
                "role: dealer (it holds only randomness)"
            )
        if self.security.provider == "tfp" and count[Role.DEALER]:
            raise ValueError("security.provider 'tfp' uses no dealer: remove the dealer party")
        for p in self.parties:
            if p.role == Role.DATA_OWNER and p.input is None:
                raise ValueError(f"data owner {p.name!r} needs 'input' (a text file, one sequence per line)")
        return self

    # ---- derived views -------------------------------------------------
    @property
    def computing_parties(self) -> list[Party]:
        """Parties holding shares, in rank order (the dealer excluded)."""
        return [p for p in self.parties if p.role != Role.DEALER]

    @property
    def dealer(self) -> Party | None:
        return next((p for p in self.parties if p.role == Role.DEALER), None)

    @property
    def world_size(self) -> int:
        """Number of share-holding ranks (CrypTen's world size; the dealer is extra)."""
        return len(self.computing_parties)

    def rank_of(self, name: str) -> int:
        for rank, party in enumerate(self.computing_parties):
            if party.name == name:
                return rank
        dealer = self.dealer
        if dealer is not None and dealer.name == name:
            return self.world_size
        raise ConfigError(
            f"no party named {name!r} in config {self.name!r}; parties are "
            f"{[p.name for p in self.parties]}"
        )

    def party(self, name: str) -> Party:
        for p in self.parties:
            if p.name == name:
                return p
        raise ConfigError(f"no party named {name!r}; parties are {[p.name for p in self.parties]}")

    def party_at(self, rank: int) -> Party:
        if rank == self.world_size and self.dealer is not None:
            return self.dealer
        return self.computing_parties[rank]

    @property
    def model_owner(self) -> Party:
        return next(p for p in self.parties if p.role == Role.MODEL_OWNER)

    @property
    def data_owners(self) -> list[Party]:
        return [p for p in self.parties if p.role == Role.DATA_OWNER]

    def digest(self) -> str:
        """Canonical hash every party compares at rendezvous."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid consortium config {source}:"]
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see docs/config.md for the schema)"
        got = e.get("input")
        shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
        lines.append(f"  - {where}: {msg}{shown}")
    return "\n".join(lines)


def _resolve_paths(cfg: ConsortiumConfig, base: Path) -> ConsortiumConfig:
    """Make relative paths relative to the config file, not the working directory."""

    def fix(p: Path | None) -> Path | None:
        return None if p is None or p.is_absolute() else (base / p).resolve()

    parties = [
        p.model_copy(update={"input": fix(p.input), "output": fix(p.output)}) for p in cfg.parties
    ]
    model = cfg.model
    if not model.path.startswith("builtin:") and not Path(model.path).is_absolute():
        model = model.model_copy(update={"path": str((base / model.path).resolve())})
    if model.tokenizer and not Path(model.tokenizer).is_absolute():
        model = model.model_copy(update={"tokenizer": str((base / model.tokenizer).resolve())})
    run_dir = cfg.run_dir if cfg.run_dir.is_absolute() else (base / cfg.run_dir).resolve()
    return cfg.model_copy(update={"parties": parties, "model": model, "run_dir": run_dir})


def check_security(cfg: ConsortiumConfig) -> None:
    """Refuse the TFP provider unless the insecure development mode is named."""
    if cfg.security.provider == "tfp" and not cfg.security.insecure_development_mode:
        raise InsecureConfigError(
            "security.provider: tfp lets party 0 generate the Beaver triples and so "
            "reconstruct every secret (text, weights, outputs). Use provider: ttp with a "
            "dealer party (the default), or, for development only, set "
            "security.insecure_development_mode: true."
        )


def parse_config(data: dict, source: str = "<dict>", base: Path | None = None) -> ConsortiumConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"consortium config {source} must be a YAML mapping, got {type(data).__name__}")
    try:
        cfg = ConsortiumConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
    cfg = _resolve_paths(cfg, base or Path.cwd())
    check_security(cfg)
    return cfg


def load_config(path: str | Path) -> ConsortiumConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"consortium config {path} does not exist (pass the path of a YAML file)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"consortium config {path} is not valid YAML: {err}") from None
    return parse_config(data, source=str(path), base=path.resolve().parent)
