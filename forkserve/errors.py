"""Error classes shared by every layer.

Each error a user can cause carries what the layer above needs to answer it:
an ``exit_code`` for the command line and the arbiter, or an HTTP ``status``
for the connection. Messages say what failed, where, and how to fix it, on one
line. This module imports nothing from forkserve.
"""

from __future__ import annotations


class ForkserveError(Exception):
    """Base class; ``exit_code`` is what the command line exits with."""

    exit_code: int = 1


class ConfigError(ForkserveError):
    """A bad flag, environment variable or config file entry."""

    exit_code = 2


class AppImportError(ForkserveError):
    """The application could not be imported or is not a WSGI/ASGI callable.

    Raised in a worker it exits with ``APP_LOAD_ERROR`` so the arbiter stops
    instead of restarting it in a loop.
    """

    exit_code = 1


class BindError(ForkserveError):
    """A listener could not be opened (address in use, permission, bad path)."""

    exit_code = 1


# Worker exit codes are a protocol between a worker and the arbiter.
WORKER_BOOT_ERROR = 3
APP_LOAD_ERROR = 4


class HTTPError(Exception):
    """A request the server refuses; ``status`` is the response to send.

    After an HTTPError raised by the parser, the connection is closed: nothing
    else read on it may reach the application.
    """

    status: int = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class ResponseError(Exception):
    """The application produced an invalid response (bad header, bad status,
    wrong body length). Answered with 500 when nothing was sent yet, otherwise
    the connection is closed."""
