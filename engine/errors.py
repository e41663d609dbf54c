"""The one exception type for errors a user can cause (STYLE.md rule 4)."""


class TandemError(Exception):
    """A problem the user can fix: the message says what went wrong and what to do."""


class ModelFileError(TandemError):
    """A GGUF (or draft) file that cannot be used: broken, truncated or unsupported."""


class SettingsError(TandemError):
    """An invalid engine setting or combination of settings."""
