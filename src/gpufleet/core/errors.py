"""The root of every gpufleet exception hierarchy."""


class GpufleetError(Exception):
    """Base class for every error gpufleet raises on purpose.

    Each feature roots its own hierarchy here, so a caller can catch everything
    gpufleet means to raise without also swallowing programming errors.
    """


class ConfigError(GpufleetError):
    """Configuration is invalid; the message is one line naming the variable."""
