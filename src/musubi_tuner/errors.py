"""User-facing errors.

Raise `UserError` for anything the user can fix (a bad flag, a missing file, a malformed config).
The message must name the file, key or flag and say how to fix it. The CLI wrapper
(`musubi_tuner.cli.run_cli`) prints it as one line and exits non-zero, without a traceback.
"""


class UserError(Exception):
    """An error caused by input the user controls; the message is shown as is."""


class DatasetConfigError(UserError):
    """A problem in a dataset TOML (names the file, the [[datasets]] index and the key)."""


class CheckpointError(UserError):
    """A model/LoRA file that cannot be used (wrong layout, wrong architecture, unreadable)."""


class TrainingAborted(UserError):
    """Training stopped on purpose (e.g. NaN loss); saved files are intact."""
