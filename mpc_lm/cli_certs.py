"""``mpc-lm certs DIR``: a consortium CA and a key + certificate per party (docs/transport.md)."""

from __future__ import annotations

from pathlib import Path


def _cmd_certs(args) -> int:
    from .errors import ConfigError
    from .pki import create_consortium

    if args.config:
        from .config import ConsortiumConfig, _format_validation_error

        import yaml
        from pydantic import ValidationError

        # The config may name this very directory in tls:, so do not check its files yet.
        data = yaml.safe_load(Path(args.config).read_text())
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k != "tls"}
            data.setdefault("rendezvous", {})
            if isinstance(data["rendezvous"], dict):
                data["rendezvous"] = {**data["rendezvous"], "backend": "gloo"}
        try:
            names = [p.name for p in ConsortiumConfig.model_validate(data).parties]
        except ValidationError as err:
            raise ConfigError(_format_validation_error(err, args.config)) from None
    elif args.parties:
        names = [n.strip() for n in args.parties.split(",") if n.strip()]
    else:
        raise ConfigError("name the parties: --parties a,b,c or --config CONFIG")
    if len(set(names)) != len(names):
        raise ConfigError(f"party names repeat: {names}")
    written = create_consortium(Path(args.dir), names, days=args.days, force=args.force)
    for path in written:
        print(path)
    print(f"\nIn the consortium config:\n  rendezvous: {{backend: tls, ...}}\n  tls:\n"
          f"    ca: {Path(args.dir) / 'ca.pem'}\n    dir: {args.dir}\n"
          "Give each party only ca.pem and its own NAME.pem/NAME.key; keep ca.key offline.")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "certs", help="create a consortium CA and per-party TLS certificates",
        description="Create DIR/ca.pem + ca.key (a consortium CA; reused if present) and DIR/NAME.pem + "
        "NAME.key for every party, for rendezvous.backend: tls. For pilots and tests: a real consortium "
        "can use its own PKI instead (docs/transport.md).")
    p.add_argument("dir", help="output directory")
    p.add_argument("--parties", help="comma-separated party names")
    p.add_argument("--config", help="take the party names from this consortium config")
    p.add_argument("--days", type=int, default=397, help="validity of the party certificates (days)")
    p.add_argument("--force", action="store_true", help="replace existing party certificates")
    p.set_defaults(func=_cmd_certs)
