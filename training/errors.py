"""The training CLI's typed errors; `python -m training` maps each to one stderr line and an exit status."""


class UsageError(Exception):
    """Bad input from the command line: one line, exit status 2, nothing written."""


class DataError(Exception):
    """Missing, corrupt or malformed data files: one line, exit status 2, nothing written."""


class ExportError(Exception):
    """The run cannot be exported, or the artifacts disagree with the model: exit status 1, nothing written."""
