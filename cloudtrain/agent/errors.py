"""The agent's one error type: a message, a hint and the exit status it maps to."""

from __future__ import annotations

USAGE = 2
FAILURE = 3


class AgentError(Exception):
    """A failure the CLI reports as `{"error": message, "hint": hint}` with `exit_code`."""

    def __init__(self, message: str, hint: str = "", exit_code: int = FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code

    def to_json(self) -> dict[str, object]:
        return {"error": self.message, "hint": self.hint}
