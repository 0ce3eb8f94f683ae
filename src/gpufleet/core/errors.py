"""The root of every gpufleet exception hierarchy."""


class GpufleetError(Exception):
    """Base class for every error gpufleet raises on purpose.

    Each feature roots its own hierarchy here, so a caller can catch everything
    gpufleet means to raise without also swallowing programming errors.
    """


class ConfigError(GpufleetError):
    """Configuration is invalid; the message is one line naming the variable."""


class ListenError(ConfigError):
    """A server cannot listen where it was told to (port taken, address not local, bad path).

    A configuration error: the address comes from a flag or variable, and the
    message names it with the address and the reason, on one line.
    """
