"""Errors a user can act on: each names the input, the rule it broke and the fix."""


class UserError(Exception):
    """A mistake in the user's input (spec, flags, files); the CLI prints it and exits 2."""


class SpecError(UserError):
    """A render spec value breaks a rule (size, range, combination)."""


class ModelFileError(UserError):
    """A model file or folder is missing, corrupt, unsafe or of the wrong kind."""


class RenderError(Exception):
    """A render that could not finish for a reason outside the user's input (e.g. every worker lost)."""
