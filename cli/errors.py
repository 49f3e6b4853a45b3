"""The CLI's error contract: one clear line on stderr and a non-zero exit code."""


class CliError(Exception):
    """A user-facing failure. `exit_code` 2 = bad input or usage, 1 = the operation failed."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
