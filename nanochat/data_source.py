"""
Choosing between downloaded data and the copy committed under data/ (task datasets, the CORE eval bundle,
the word list). The downloads themselves are common.download and common.hub_download.

The committed copy stands in only when NANOCHAT_OFFLINE=1, or when a download fails with a network error,
and then the run says so loudly. Any other failure propagates. Under torch.distributed the choice is made
once, on rank 0, and shared, so every rank trains and evaluates on the same data.

Importing this module does no work.
"""

import logging

import torch.distributed as dist

from nanochat.common import (DownloadError, OfflineError, SetupError, is_ddp_initialized, is_network_error,
                             offline_mode, one_line_error, print0)

logger = logging.getLogger(__name__)


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


def fetch_unless_unreachable(what, fetch, error=SetupError, fetch_offline=False):
    """
    (fetch(), None), or (None, why) so that the committed copy may stand in: "offline" when NANOCHAT_OFFLINE
    is set (fetch is then not called, unless fetch_offline: then the OfflineError's message, naming the file
    missing), "unreachable: <the error>" when fetch failed with a network error. Any other failure raises
    `error` naming `what`: the committed copy does not silently replace a broken fetch.
    """
    if offline_mode() and not fetch_offline:
        return None, "offline"
    try:
        return fetch(), None
    except OfflineError as e:
        return None, str(e)
    except Exception as e:
        if is_network_error(e):
            return None, f"unreachable: {one_line_error(e)}"
        detail = str(e) if isinstance(e, DownloadError) else one_line_error(e)  # its fix is worth reading
        raise error(f"{what} failed ({detail}); not a network error, so the committed copy is not "
                    f"used in its place. Fix the cause, or set NANOCHAT_OFFLINE=1 to use the committed "
                    f"copy.") from e


class RankZeroFailed(SetupError):
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
