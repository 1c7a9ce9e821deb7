"""The errors macft raises for user mistakes; the CLI turns them into one clean line."""


class MacftError(Exception):
    """A problem the user can fix. The message says what is wrong and how to fix it."""


class RecipeError(MacftError):
    """A recipe file or --set override is invalid."""


class DataError(MacftError):
    """A data file is unreadable or has bad lines."""


class ModelError(MacftError):
    """A base model is missing, broken or not supported."""


class RunError(MacftError):
    """A run folder is missing, busy or inconsistent."""


class ExportError(MacftError):
    """A fuse or export cannot be done (no adapters, unsupported model, no disk space)."""
