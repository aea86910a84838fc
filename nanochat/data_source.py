"""
Choosing between downloaded data and the copy committed under data/ (task datasets, the CORE eval bundle).

The committed copy stands in only when NANOCHAT_OFFLINE=1, or when a download fails with a network error,
and then the run says so loudly. Any other failure propagates. Under torch.distributed the choice is made
once, on rank 0, and shared, so every rank trains and evaluates on the same data.

Importing this module does no work.
"""

import http.client
import logging
import socket
import urllib.error

import torch.distributed as dist

from nanochat.common import is_ddp_initialized, offline_mode, one_line_error, print0

logger = logging.getLogger(__name__)

# Third-party exception classes (requests, urllib3, huggingface_hub) that mean "the server could not be
# reached", matched by class name so that checking an error imports none of those packages
NETWORK_ERROR_NAMES = frozenset({
    "ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "NewConnectionError", "MaxRetryError",
    "ProtocolError", "LocalEntryNotFoundError", "OfflineModeIsEnabled", "IncompleteRead",
})
# HTTP statuses that say "try again later" rather than "this URL is wrong"
TRANSIENT_HTTP_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def _is_network_exception(exc):
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in TRANSIENT_HTTP_STATUSES
    if isinstance(exc, (urllib.error.URLError, ConnectionError, TimeoutError, socket.gaierror, socket.herror,
                        http.client.IncompleteRead, http.client.RemoteDisconnected)):
        return True
    return any(cls.__name__ in NETWORK_ERROR_NAMES for cls in type(exc).__mro__)


def is_network_error(exc):
    """Whether exc, or an exception it was raised from, says that the network or server was unreachable."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if _is_network_exception(exc):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def announce_fallback(message):
    """Say, impossible to miss, that a run uses the committed copy instead of the data it asked for."""
    banner = "!" * 100
    print0(f"{banner}\nWARNING: {message}\n{banner}")
    logger.warning(message)


def announce_committed_copy(message):
    """Offline the committed copy is what was asked for: a plain line. Online it is a stand-in: a loud one."""
    if offline_mode():
        print0(message)
    else:
        announce_fallback(message)


def fetch_unless_unreachable(what, fetch, error=RuntimeError, passthrough=()):
    """
    (fetch(), None), or (None, the error in one line) when fetch failed with a network error, so that the
    committed copy may stand in. Any other failure raises `error` naming `what` (exceptions of the
    `passthrough` types propagate as they are): the committed copy does not silently replace a broken fetch.
    """
    try:
        return fetch(), None
    except Exception as e:
        if is_network_error(e):
            return None, one_line_error(e)
        if isinstance(e, passthrough):
            raise
        raise error(f"{what} failed ({one_line_error(e)}); not a network error, so the committed copy is not "
                    f"used in its place. Fix the cause, or set NANOCHAT_OFFLINE=1 to use the committed "
                    f"copy.") from e


class RankZeroFailed(RuntimeError):
    """Raised on the other ranks when rank 0's decision raised: every rank stops, none waits forever."""


def decide_on_rank0(decide):
    """
    decide() on rank 0 only, its (picklable) result broadcast to every rank; a plain call when
    torch.distributed is not initialised or has one process. Every rank must call this, in the same order.
    If decide() raises on rank 0, rank 0 re-raises it and the other ranks raise RankZeroFailed.
    """
    if not is_ddp_initialized() or dist.get_world_size() == 1:
        return decide()
    payload, error = [None], None
    if dist.get_rank() == 0:
        try:
            payload = [("ok", decide())]
        except Exception as e:  # shared below, so the other ranks stop instead of hanging
            payload, error = [("error", one_line_error(e))], e
    dist.broadcast_object_list(payload, src=0)
    if error is not None:
        raise error
    status, value = payload[0]
    if status == "error":
        raise RankZeroFailed(f"rank 0 failed while choosing the data source: {value}")
    return value
