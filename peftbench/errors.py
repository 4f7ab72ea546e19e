"""Errors the CLI turns into one clear line and exit code 2."""


class UsageError(Exception):
    """Bad input from the user: an unknown name, a missing path, an invalid value.

    The message is one line that says what was wrong and what the choices or the fix are.
    """


class ConfigError(UsageError):
    """A config field outside its valid range; the message names the field."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; the run is recorded as failed."""
