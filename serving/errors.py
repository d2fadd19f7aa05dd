"""Typed errors: what a client can get wrong (ServiceError: serving/api/errors.py maps every one to
`{"error": ...}` with its status), and what stops the server from starting (StartupError: one line
from `python -m serving`, exit status 1)."""


class StartupError(Exception):
    """The server cannot start: no usable model, a bad exports folder, a device it cannot use, a busy port."""


class ServiceError(Exception):
    status = 500

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class InputError(ServiceError):
    """A bad upload, body or option: 400 (unreadable), 413 (too large), 415, 422 (readable but wrong)."""
    status = 422


class Unauthorized(ServiceError):
    status = 401


class ModelNotFound(ServiceError):
    status = 404


class ModelUnavailable(ServiceError):
    status = 503


class PredictionNotFound(ServiceError):
    """/feedback for an ID the prediction log does not hold (never logged, or past the window)."""
    status = 404


class FeedbackConflict(ServiceError):
    """/feedback for a prediction already told its true label."""
    status = 409


class ServiceUnavailable(ServiceError):
    status = 503


class Overloaded(ServiceError):
    """The process is at --max-queue: 503 with Retry-After."""
    status = 503
    retry_after = 1  # seconds: a batch takes milliseconds, by then the queue has turned over many times
