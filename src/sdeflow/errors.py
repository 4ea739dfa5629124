"""The error users get for a bad configuration: one message naming the offending key or file."""

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key or file."""
