"""The typed errors mpc_lm raises for problems a user can fix.

Every message names what is wrong, the offending value, and what to do about
it. ``assert`` is kept for internal invariants only.
"""


class MpcLmError(Exception):
    """Base class: a problem the user can act on (bad input, missing party, ...)."""


class ConfigError(MpcLmError):
    """The consortium config is invalid (unknown key, bad value, missing role)."""


class InsecureConfigError(ConfigError):
    """The config asks for something insecure without naming the development mode."""


class RendezvousError(MpcLmError):
    """Parties could not meet: a party did not come, or joined with another config."""


class PartyFailure(MpcLmError):
    """A party crashed, was killed, or stopped answering during a run."""


class ModelError(MpcLmError):
    """The checkpoint is missing, unsupported, or does not match its architecture."""


class InputError(MpcLmError):
    """The data owner's input cannot be used (too long for the bucket, empty, ...)."""


class ResourceError(MpcLmError):
    """The job does not fit the device (memory) it was configured for."""
