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

from .config_tls import TlsSettings
from .errors import ConfigError, InsecureConfigError


class Role(str, Enum):
    MODEL_OWNER = "model_owner"
    DATA_OWNER = "data_owner"
    COMPUTE = "compute"
    DEALER = "dealer"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rendezvous(_Strict):
    """Where the first computing party hosts torch.distributed's TCP store.

    ``backend``: ``gloo`` (torch.distributed, unauthenticated and unencrypted: loopback
    only unless ``security.insecure_development_mode``) or ``tls`` (mutual TLS between
    parties, needs the ``tls:`` section; docs/transport.md).
    """

    host: str = "127.0.0.1"
    port: int = Field(29500, ge=1, le=65535)
    backend: Literal["gloo", "tls"] = "gloo"
    exchange_openings: bool = Field(
        True, description="gloo with two computing parties: each opening is one pairwise exchange (half the "
        "latency of gloo's all-reduce; same bytes): of any size over the parties' own socket (exchange_socket), "
        "up to 1 MiB over gloo's isend/irecv; false: gloo's all-reduce, as stock CrypTen (docs/transport.md). "
        "TLS always exchanges.")
    exchange_socket: bool = Field(
        True, description="gloo with exchange_openings: the exchange runs over one TCP connection between the "
        "two computing parties, written and read by each party's own thread (25-70 us per opening up to 48 KiB "
        "against 220-330 us through gloo's worker thread on loopback), and every larger opening too (about 2x faster "
        "than gloo's all-reduce at 1-16 MiB), GPU tensors through host memory; false: gloo's isend/irecv up to "
        "1 MiB (CPU tensors), its all-reduce otherwise "
        "(docs/transport.md).")


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
    prg: Literal["aes", "torch"] = Field(
        "aes", description="the streams each computing party shares with the dealer: aes (AES-128-CTR under a "
                           "128-bit key per party, mpc_lm/prg.py) or torch (CrypTen's: torch's generators "
                           "under a 64-bit seed)")


class Party(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    role: Role
    device: str = "cpu"
    input: Path | None = Field(None, description="data owner: text file, one sequence per line")
    output: Path | None = Field(None, description="data owner: JSONL file it alone receives")
    train_data: Path | None = Field(None, description="data owner, job.kind train: JSONL of "
                                    '{"text": ..., "label": int} training examples (docs/training.md)')
    eval_data: Path | None = Field(None, description="data owner, job.kind train: held-out JSONL, same format")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value != "cpu" and not (value == "cuda" or value.startswith("cuda:")):
            raise ValueError(f"device {value!r} is not 'cpu', 'cuda' or 'cuda:N'")
        return value

    @model_validator(mode="after")
    def _io_only_for_data_owners(self) -> "Party":
        if self.role != Role.DATA_OWNER and (self.input or self.output or self.train_data or self.eval_data):
            raise ValueError(
                f"party {self.name!r} has role {self.role.value}; only data_owner parties take "
                "'input'/'output'/'train_data'/'eval_data' (remove them or change the role)"
            )
        return self


class ModelSpec(_Strict):
    """The model owner's checkpoint. Only the model owner opens ``path``."""

    path: str = Field(description="local HF directory, or 'builtin:demo-minilm-sentiment'")
    task: Literal["sequence-classification", "embedding", "causal-lm"] = "sequence-classification"
    tokenizer: str | None = Field(None, description="public tokenizer directory (default: path)")


class Approximations(_Strict):
    """Non-linear functions under MPC; each is documented in docs/accuracy.md."""

    precision_bits: int = Field(16, ge=8, le=24)
    gelu: Literal["poly", "erf", "sigmoid"] = "poly"
    exp: Literal["clipped", "limit"] = Field(
        "clipped", description="softmax exponential: clipped = the square of a degree-8 Chebyshev series of "
        "e^(x/2), zero below x = -12, the clip and padding mask read from comparison tables and applied with the "
        "square (4 rounds; needs comparison: tables and 2 computing parties, else limit); limit = (1 + x/2^n)^(2^n) "
        "with n = exp_iterations, then the mask's product (n + 1 rounds)")
    exp_iterations: int = Field(8, ge=4, le=12, description="n of the limit exponential")
    reciprocal_iterations: int = Field(1, ge=1, le=20, description="Newton steps after the constant bucketed guess "
                                       "(1 with 16 guess steps per octave, or 2 with 4, reach the fixed-point "
                                       "floor, ~2e-3 relative at 1/128)")
    inv_sqrt_iterations: int = Field(1, ge=1, le=10, description="Newton steps after the constant bucketed guess "
                                     "(1 with 16 guess steps per octave, or 2 with 4)")
    guess_steps_per_octave: int = Field(16, ge=1, le=16, description="thresholds per octave of the first guess of "
                                        "1/x and 1/sqrt(x): more cost comparison bytes (few with comparison "
                                        "tables: all thresholds share one opening), save Newton rounds")
    first_guess: Literal["linear", "constant"] = Field(
        "linear", description="first guess of 1/x and 1/sqrt(x) from the bucket thresholds: linear = a line per "
        "bucket, read in the round that converts the bits, no Newton step (LayerNorm C + 2 rounds after the "
        "variance, the softmax's normalisation C + 2; needs comparison: tables, 2 computing parties and a dealer, "
        "and a range whose guesses stay >= 2^-8, else constant); constant = the bucket's middle value, then the "
        "*_iterations Newton steps")
    fuse_norm_linear: bool = Field(
        True, description="with first_guess: linear, a LayerNorm and the linear layer that reads it in 5 rounds "
        "instead of 6: the product with the weight travels beside the variances' comparison and the row's "
        "1/sqrt(var) is applied to both at the end (encoders: every QKV, FF1 and the classifier's pooler; "
        "docs/performance.md, lever 12); false: the LayerNorm, then the product")
    comparison: Literal["tables", "lanes16", "packed32", "crypten"] = Field(
        "tables", description="tables: the widths of lanes16, each sign read from comparison tables the dealer "
        "deals (one opening + one AND round for 16-bit lanes, + two for 32-bit; ~20 bytes per element instead of "
        "~80; 2 computing parties; falls back to lanes16 where no tables are dealt); packed32: two 32-bit lanes "
        "per ring word (2 computing parties, inputs within +-2^15; 7 rounds, ~2.5x fewer bytes); lanes16: packed32, "
        "except that the comparisons whose result may flip within 2^-6 of the threshold (GELU/tanh pieces, "
        "pairwise steps of the row max) read bits 10..25 of the shares in four 16-bit lanes per word (|x| < 512; "
        "6 rounds, ~2.2x fewer bytes than packed32); crypten: CrypTen's 64-bit circuit (any party count and range)")
    ring_products: Literal["auto", "digits", "int64"] = Field(
        "auto", description="how CPU ring products are computed (exact and bit-identical either way; only the "
        "speed differs): digits = three float64 BLAS digit products (fast where int64 multiplies are not "
        "vectorised), int64 = torch's int64 matmul (fast with AVX-512), auto = the faster of the two, timed "
        "once per process when it starts (mpc_lm/ring.py, docs/performance.md lever 17)")
    max_arity: Literal[2, 4] = Field(4, description="softmax row max: 2 = binary tournament (C+1 rounds "
                                     "per level), 4 = groups of four (C+2 rounds per level, half the levels)")
    mode: Literal["mpc_lm", "crypten"] = Field(
        "mpc_lm", description="'crypten': CrypTen's stock functions under crypten.cfg defaults "
        "(softmax, inv_sqrt, erf/sigmoid GELU, tanh, relu, reciprocal); the fields above other "
        "than precision_bits and gelu are then unused. For the benchmark (docs/bench.md).")


class Preprocessing(_Strict):
    """When the dealer's correlated randomness is made (docs/performance.md).

    ``offline`` (default): each computation is planned by a dry run (no communication),
    party 0 fetches all its dealer shares in a few large chunks, then the online phase
    runs without waiting on the dealer. ``on_demand``: CrypTen's request/response per
    multiplication (the stock behaviour; the benchmark's crypten-naive mode uses it).
    ``weight_masks``: products with a model weight open only the input's mask per product;
    the weight's mask is opened once when the model is loaded.
    """

    mode: Literal["offline", "on_demand"] = "offline"
    chunk_mb: float = Field(256.0, gt=0, le=65536, description="largest dealer answer party 0 receives at once")
    weight_masks: bool = Field(
        True, description="open each weight's Beaver mask once per model instead of once per product "
                          "(inference and generation with the dealer; mpc_lm/premask.py)")
    weight_products_ahead: bool = Field(
        True, description="with weight masks and the offline phase, each party forms a (W - B) of its products "
                          "with a weight in the offline phase: one local matmul online instead of two, for more "
                          "offline work and memory (docs/performance.md lever 18); false forms it online")
    draws_ahead: bool = Field(
        False, description="with the offline phase, each party draws its dealer-stream randomness for the whole "
                           "planned computation in the offline phase (party 1 its dealt shares too): the online "
                           "phase only reads it, for more offline time and memory (docs/performance.md lever 23: "
                           "no measurable online gain on a 2-core CPU); false (the default) draws online")
    reuse_segments: bool = Field(
        True, description="plan each repeated transformer layer once per offline dry run and reuse its "
                          "dealer requests for the others (mpc_lm/offline.py segment); false plans every layer")


class Generation(_Strict):
    """Decoding of ``job.kind: generate`` (docs/causal-lm.md). The choice is made inside MPC."""

    max_new_tokens: int = Field(8, ge=1, le=1024)
    strategy: Literal["greedy", "sample"] = "greedy"
    top_k: int = Field(0, ge=0, le=1024, description="sample among the k most likely tokens (0: all)")
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    seed: int | None = Field(None, description="public seed of every party's noise: reproducible, TESTS ONLY")
    kv_cache: bool = Field(True, description="keep keys/values in secret shares (false: recompute)")


class Training(_Strict):
    """Encrypted fine-tuning (``job.kind: train``); every field is documented in docs/training.md."""

    trainable: Literal["head", "last_k", "lora", "all"] = "head"
    last_k: int = Field(1, ge=1, description="trainable: last_k trains the last k encoder layers + head")
    lora_rank: int = Field(4, ge=1, le=256)
    lora_alpha: float = Field(8.0, gt=0)
    lora_targets: list[Literal["q", "k", "v"]] = Field(["q", "v"], min_length=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1, description="sgd only")
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-4, gt=0, description="adam: 1/sqrt(v + eps^2); below ~2^(lo/2)/loss_scale it has no effect")
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    grad_accumulation: int = Field(1, ge=1, description="micro-batches (job.batch_size) per step")
    loss_scale: float = Field(1024.0, gt=0, description="public factor on the loss gradient (fixed point)")
    adam_v_range: tuple[int, int] = Field((-12, 20), description="log2 range of loss-scaled v for inv_sqrt")
    eval_every: int | None = Field(None, ge=1, description="steps between evaluations (always at the end)")
    checkpoint_every: int | None = Field(None, ge=1, description="steps between checkpoints")
    checkpoint_dir: Path | None = Field(None, description="default: run_dir/checkpoints/NAME; one subdir per party")
    resume: bool = Field(True, description="resume from the last complete checkpoint set if there is one")
    reveal_metrics_to: list[str] = Field(default_factory=list, description="party names that see loss/accuracy")
    output_dir: Path | None = Field(None, description="model owner: save_pretrained here (default run_dir/NAME-trained)")
    seed: int = 0


class Job(_Strict):
    kind: Literal["classify", "embed", "score", "generate", "train"] = "classify"
    seq_len: int = Field(32, ge=2, le=8192, description="padded length bucket (public)")
    batch_size: int = Field(8, ge=1, le=4096)
    truncate: bool = Field(False, description="cut sequences longer than seq_len instead of failing")
    generate: Generation = Generation()
    reveal_logits: bool = Field(False, description="score: also reveal all logits to the data owner "
                                "(fidelity checks; reveals more of the model, so the model owner must agree)")
    train: Training | None = Field(None, description="job.kind train: what and how to fine-tune")


class ConsortiumConfig(_Strict):
    name: str = "consortium"
    parties: list[Party]
    model: ModelSpec
    job: Job = Job()
    rendezvous: Rendezvous = Rendezvous()
    timeouts: Timeouts = Timeouts()
    security: Security = Security()
    approx: Approximations = Approximations()
    preprocessing: Preprocessing = Preprocessing()
    run_dir: Path = Path("runs")
    tls: TlsSettings | None = Field(None, description="mutual TLS between parties (rendezvous.backend: tls); "
                                    "docs/transport.md")

    @model_validator(mode="after")
    def _tls_section(self) -> "ConsortiumConfig":
        if self.rendezvous.backend == "tls" and self.tls is None:
            raise ValueError(
                "rendezvous.backend is 'tls' but there is no tls: section; add tls.ca and tls.dir "
                "(create them with: mpc-lm certs DIR --config CONFIG)"
            )
        if self.tls is not None:
            names = {p.name for p in self.parties}
            for key in ("parties", "ports", "advertise"):
                unknown = sorted(set(getattr(self.tls, key)) - names)
                if unknown:
                    raise ValueError(f"tls.{key} names unknown parties {unknown}; parties are {sorted(names)}")
        return self

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
        kinds = {p.device.split(":")[0] for p in self.parties if p.role != Role.DEALER}
        if len(kinds) > 1:
            listed = ", ".join(f"{p.name}: {p.device}" for p in self.parties if p.role != Role.DEALER)
            raise ValueError(
                f"the computing parties must compute on one kind of device, cpu or cuda ({listed}): each "
                "party's correlated randomness comes from a stream per device kind, so mixed kinds would not "
                "add up; set every computing party's device to cpu, or every one to cuda[:N]")
        training = self.job.kind == "train"
        for p in self.parties:
            if p.role == Role.DATA_OWNER and not training and p.input is None:
                raise ValueError(f"data owner {p.name!r} needs 'input' (a text file, one sequence per line)")
        if training:
            if not any(p.train_data for p in self.parties):
                raise ValueError("job.kind train needs at least one data owner with 'train_data' (JSONL)")
            unknown = [n for n in (self.job.train or Training()).reveal_metrics_to if n not in names]
            if unknown:
                raise ValueError(f"job.train.reveal_metrics_to names unknown parties {unknown}; parties are {names}")
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
        if p is None or p.is_absolute():
            return p
        return (base / p).resolve()

    parties = [
        p.model_copy(update={"input": fix(p.input), "output": fix(p.output),
                             "train_data": fix(p.train_data), "eval_data": fix(p.eval_data)})
        for p in cfg.parties
    ]
    model = cfg.model
    if not model.path.startswith("builtin:") and not Path(model.path).is_absolute():
        model = model.model_copy(update={"path": str((base / model.path).resolve())})
    if model.tokenizer and not Path(model.tokenizer).is_absolute():
        model = model.model_copy(update={"tokenizer": str((base / model.tokenizer).resolve())})
    run_dir = cfg.run_dir if cfg.run_dir.is_absolute() else (base / cfg.run_dir).resolve()
    job = cfg.job
    if job.train is not None:  # training output paths are relative to the config file too
        job = job.model_copy(update={"train": job.train.model_copy(update={
            "checkpoint_dir": fix(job.train.checkpoint_dir), "output_dir": fix(job.train.output_dir)})})
    tls = cfg.tls.resolve_paths(base) if cfg.tls is not None else None  # certificates: relative to the file
    return cfg.model_copy(update={"parties": parties, "model": model, "run_dir": run_dir, "job": job, "tls": tls})


def check_security(cfg: ConsortiumConfig) -> None:
    """Refuse the TFP provider unless the insecure development mode is named."""
    if cfg.security.provider == "tfp" and not cfg.security.insecure_development_mode:
        raise InsecureConfigError(
            "security.provider: tfp lets party 0 generate the Beaver triples and so "
            "reconstruct every secret (text, weights, outputs). Use provider: ttp with a "
            "dealer party (the default), or, for development only, set "
            "security.insecure_development_mode: true."
        )
    if cfg.rendezvous.backend == "gloo" and not cfg.security.insecure_development_mode \
            and not _is_loopback(cfg.rendezvous.host):
        raise InsecureConfigError(
            f"rendezvous.host {cfg.rendezvous.host!r} is not a loopback address, and backend gloo "
            "neither authenticates nor encrypts: anyone on the network could join, disrupt, or "
            "read the shares and seeds. Use rendezvous.backend: tls with a tls: section "
            "(mpc-lm certs; docs/transport.md), or, for development only, set "
            "security.insecure_development_mode: true."
        )


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_config(data: dict, source: str = "<dict>", base: Path | None = None) -> ConsortiumConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"consortium config {source} must be a YAML mapping, got {type(data).__name__}")
    try:
        cfg = ConsortiumConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
    try:
        cfg = _resolve_paths(cfg, base or Path.cwd())
    except (ValueError, OSError) as err:  # e.g. a NUL byte in a path (found by tests/test_faults.py)
        raise ConfigError(f"invalid consortium config {source}: a path cannot be used ({err})") from None
    check_security(cfg)
    if cfg.tls is not None:  # CA present; certificates here signed by it and named right
        from .pki import check_tls_files

        check_tls_files(cfg)
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
