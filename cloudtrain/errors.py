"""The error tree and the exit codes: every failure the CLI reports is a CloudtrainError.

Library code raises these (translating library errors where they arise, ``raise
CapacityError(...) from e``); only the CLI turns one into a message, a hint and an
exit code.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """The process exit statuses of the ``cloudtrain`` command (a public contract)."""

    OK = 0
    TRAINING_FAILED = 1
    INVALID_INPUT = 2
    CLOUD_OR_REMOTE = 3
    BUDGET = 4
    BUG = 70  # anything unforeseen (EX_SOFTWARE): never 1, which means the training failed
    SIGINT = 130
    SIGPIPE = 141  # stdout closed before all was written (`| head`), as a shell tool dies of SIGPIPE
    SIGTERM = 143


class CloudtrainError(Exception):
    """Root of every error cloudtrain reports: what happened, and what to do about it."""

    exit_code: ExitCode = ExitCode.CLOUD_OR_REMOTE

    def __init__(self, message: str, hint: str | None = None, *, debug: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.debug = debug  # internals (a remote command line, ...): shown with --debug only

    def __str__(self) -> str:
        return self.message


class InputError(CloudtrainError):
    """The user's input (flags, files, settings) is unusable; nothing was launched."""

    exit_code = ExitCode.INVALID_INPUT


class LedgerError(InputError):
    """The ledger file is damaged, or cannot be read or written where it is (never reset)."""


class SpecError(InputError):
    """The job file is invalid: the message names the file, the line and the key."""


class PlanError(InputError):
    """The job is valid but no offer can satisfy it (e.g. nothing under max_price)."""


class CloudError(CloudtrainError):
    """An AWS call failed in a way the user has to act on."""


class CredentialsError(CloudError):
    """No usable AWS credentials."""


class NoCredentialsError(CredentialsError):
    """No AWS credentials at all (none configured), as against refused ones."""


class CapacityError(CloudError):
    """AWS has no capacity for the requested instance type/zone right now."""


class QuotaError(CloudError):
    """An account quota (vCPUs, spot instance count) stops the launch."""


class PriceError(CloudError):
    """The spot price is above the job's max_price."""


class RemoteError(CloudtrainError):
    """SSH, sync or the on-instance agent failed. ``reason``: the cause in a few words (what
    the remote said last, or what broke), for a line such as "lost the connection (reason)"."""

    def __init__(
        self, message: str, hint: str | None = None, *, debug: str | None = None, reason: str | None = None
    ) -> None:
        super().__init__(message, hint, debug=debug)
        self.reason = reason or message


class BudgetError(CloudtrainError):
    """A budget or deadline was reached."""

    exit_code = ExitCode.BUDGET


class TrainingFailed(CloudtrainError):
    """The job's training command exited non-zero (its logs were still pulled)."""

    exit_code = ExitCode.TRAINING_FAILED
