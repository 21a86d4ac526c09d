"""What a site sends the coordinator when it cannot answer: a fixed code and a public reason, never an exception's text.

Flower turns an exception raised in a ClientApp into the error reply the coordinator reads, with the exception's
text in it (``flwr/supernode/runtime/run_clientapp.py``: ``str(type(ex)) + ":<'" + str(ex) + "'>"``; the simulation
engine does the same). That text is a release: a data reader's "holds only one user (u0)", a path, a count of
lines or users. ``public_errors_mod`` stands outermost around every handler of the ClientApp and answers any
failure itself:

- a ``PublicInputError``, raised only where the text is built from public values alone (the coordinator's run
  config and message, the public catalogue, library versions), is sent as it is, with code ``REFUSED``, so that the
  coordinator's operator can fix the request;
- anything else is sent as ``SITE_FAILED`` with the fixed reason ``SITE_FAILED_REASON``; the exception, with its
  traceback, goes to the site's own log only.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Error, Message

from common.errors import ConfigError
from common.flower.mods import ClientAppCallable, ErrorCode

SITE_FAILED = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
SITE_FAILED_REASON = "the site could not answer this message; its operator finds why in the site's own log"
REFUSED = ErrorCode.MOD_FAILED_PRECONDITION
"""The coordinator's request itself is unusable (a bad run config, another Flower version or catalogue)."""

logger = logging.getLogger("fedtail.client")


class PublicInputError(ConfigError):
    """A request refused for a reason whose text holds public values only: it may leave the site as it is."""


def public_errors_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The handler's reply, or on any failure an error reply with a fixed code and a public reason."""
    try:
        return call_next(msg, context)
    except PublicInputError as error:
        logger.warning("refused a %s message: %s", msg.metadata.message_type, error)
        return Message(Error(code=REFUSED, reason=str(error)), reply_to=msg)
    except Exception:  # noqa: BLE001 - every failure is answered, none with its text
        logger.exception("failed on a %s message; the coordinator is told only: %s", msg.metadata.message_type,
                         SITE_FAILED_REASON)
        return Message(Error(code=SITE_FAILED, reason=SITE_FAILED_REASON), reply_to=msg)
