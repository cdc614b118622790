"""The error a user can fix: printed as one clear message (no traceback) by the command line."""


class ConfigurationError(ValueError):
    """Bad input or settings: the message names the field and the fix."""
