"""User-facing errors.

Anything a user can cause (bad paths, corrupt files, bad options) raises :class:`LipdetError`.
The CLI prints its message as one line on stderr and exits with :attr:`LipdetError.exit_code`
(2 for usage and input errors), never with a traceback.
"""

from __future__ import annotations


class LipdetError(Exception):
    """An error whose message is meant for the user, with the process exit code to use."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""
