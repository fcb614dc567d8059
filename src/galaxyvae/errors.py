"""Exceptions that carry a message a user can act on; the CLI prints them without a traceback."""


class GalaxyVAEError(Exception):
    """Base class of every error galaxyvae raises about the user's input or outputs."""


class InputError(GalaxyVAEError, ValueError):
    """An input file or argument is unusable; the message names it and says what is wrong."""


class OutputExistsError(GalaxyVAEError, FileExistsError):
    """An output already exists and replacing it was not asked for."""
