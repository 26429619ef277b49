"""The one base class of the errors a user can cause and fix (bad inputs, missing folders, options
out of range, mismatched configs). The CLI prints these as one line and exits 2; any other exception
is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
    """A failure the user can fix; the message names the file or option and says what to do."""


class OptionError(UserError, ValueError):
    """An option value out of range or of the wrong form (also a ValueError, as it always was)."""


class RecordError(UserError, ValueError):
    """A file of the run that cannot be read as the record it should hold (e.g. not valid JSON)."""
