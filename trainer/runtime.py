"""What every entry point shares: the event loop runner, logging, and the rule that a
user's mistake is one line and exit status 2, never a traceback."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

EXIT_USAGE = 2


class UserError(Exception):
    """A problem the user can fix; printed as one line."""


def run_async(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(
        level=max(level, logging.DEBUG),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def is_user_error(exc: BaseException) -> bool:
    from p2p.secure import AuthError, KeyringError
    from p2p.transport import TransportError

    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .launch.summary import SummaryError
    from .launch.zygote import ZygoteError
    from .peer import PeerError
    from .task import TaskError
    from .weights import ModelError

    return isinstance(
        exc,
        (
            ZygoteError,
            SummaryError,
            AuthError,
            KeyringError,
            UserError,
            TaskError,
            ModelError,
            DataError,
            PeerError,
            ConfigError,
            CheckpointError,
            TransportError,
            ValueError,
            OSError,
        ),
    )
