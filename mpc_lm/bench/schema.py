"""The JSON schema of ``mpc-lm bench --json`` (documented in docs/bench.md)."""

from __future__ import annotations

SCHEMA_VERSION = 1

_num = {"type": ["number", "null"]}
_int = {"type": ["integer", "null"]}

MODE_ROW = {
    "type": "object",
    "required": ["mode", "phase", "wall_s", "examples_per_s", "bytes_per_party", "rounds", "offline_bytes",
                 "online_bytes", "accuracy", "agreement", "epsilon", "delta", "peak_host_mb", "peak_gpu_mb",
                 "lan_s", "wan_s", "protects"],
    "properties": {
        "mode": {"enum": ["plaintext", "dp", "mpc", "crypten-naive"]},
        "phase": {"enum": ["train", "inference"], "description": "what wall_s and examples_per_s time"},
        "mpc_phase": {"enum": ["inference", "train"]},
        "wall_s": {"type": "number", "minimum": 0},
        "online_s": _num,
        "offline_s": _num,
        "plan_s": {"type": ["number", "null"], "description": "part of offline_s: the dry run that plans the dealer requests (shape inference only, no arithmetic)"},
        "examples_per_s": _num,
        "tokens_per_s": _num,
        "bytes_per_party": _int,
        "online_bytes": _int,
        "offline_bytes": _int,
        "rounds": _int,
        "offline_rounds": _int,
        "accuracy": _num,
        "agreement": _num,
        "max_abs_logit_error": _num,
        "epsilon": _num,
        "delta": _num,
        "peak_host_mb": _num,
        "peak_gpu_mb": _num,
        "lan_s": _num,
        "wan_s": _num,
        "lan_online_s": _num,
        "wan_online_s": _num,
        "protects": {
            "type": "object",
            "required": ["text", "weights", "output_model_dp", "level", "summary"],
            "properties": {
                "text": {"type": "string"},
                "weights": {"type": "string"},
                "output_model_dp": {"type": "boolean"},
                "level": {"type": "integer", "minimum": 0},
                "summary": {"type": "string"},
            },
        },
    },
}

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "mpc-lm bench results",
    "type": "object",
    "required": ["schema_version", "benchmark", "machine", "modes", "skipped"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "benchmark": {
            "type": "object",
            "required": ["task", "model", "command", "sizes", "quick", "device", "network_model"],
        },
        "machine": {"type": "object", "required": ["cpu", "cpu_count", "gpu"]},
        "modes": {"type": "array", "items": MODE_ROW},
        "skipped": {"type": "array", "items": {"type": "object", "required": ["mode", "reason"]}},
        "comparison": {"type": "object", "required": ["crypten-naive/mpc", "fidelity"],
                       "description": "crypten-naive over mpc (present when both ran): online and total ratios"},
    },
}


def validate(document: dict) -> bool:
    """Raise ``jsonschema.ValidationError`` if ``document`` does not follow :data:`SCHEMA`.

    Returns False (nothing checked) when ``jsonschema`` (the ``bench`` extra) is not installed.
    """
    try:
        import jsonschema
    except ImportError:
        return False
    jsonschema.validate(document, SCHEMA)
    return True
