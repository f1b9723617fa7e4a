"""structlog setup: JSON lines when stderr is not a terminal (journald, files), readable when
it is. A last processor blanks the API key from every value, whatever logged it."""

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog


def configure(level: str = "info", secrets: tuple[str, ...] = ()) -> None:
    hidden = tuple(secret for secret in secrets if secret)

    def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in event.items():
            text = value if isinstance(value, str) else None
            if text is not None and any(secret in text for secret in hidden):
                for secret in hidden:
                    text = text.replace(secret, "***")
                event[key] = text
        return event

    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if sys.stderr.isatty()
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
