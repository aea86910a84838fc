"""
Where data comes from: the one downloader (download() for plain URLs, hub_download() for ClimbMix shards from
the Hugging Face hub), and the choice between downloaded data and the copy committed under data/.

The committed copy stands in only when NANOCHAT_OFFLINE=1, or when a download fails with a network error,
and then the run says so loudly. Any other failure propagates. Under torch.distributed the choice is made
once, on rank 0, and shared, so every rank trains and evaluates on the same data.

Importing this module does no work.
"""

import hashlib
import http.client
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.request

import torch.distributed as dist

from nanochat.common import is_ddp_initialized, offline_mode, one_line_error, print0

logger = logging.getLogger(__name__)

# Third-party exception classes (requests, urllib3, httpx, huggingface_hub) that mean "the server could not be
# reached", matched by class name so that checking an error imports none of those packages
NETWORK_ERROR_NAMES = frozenset({
    "ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "NewConnectionError", "MaxRetryError",
    "ProtocolError", "LocalEntryNotFoundError", "OfflineModeIsEnabled", "IncompleteRead",
    "ConnectError", "ReadError", "RemoteProtocolError",  # httpx's, under huggingface_hub
})
# HTTP statuses that say "try again later" rather than "this URL is wrong"
TRANSIENT_HTTP_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def _is_network_exception(exc):
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in TRANSIENT_HTTP_STATUSES
    status = getattr(getattr(exc, "response", None), "status_code", None)  # requests', httpx's, the hub's
    if isinstance(status, int):
        return status in TRANSIENT_HTTP_STATUSES
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


def fetch_unless_unreachable(what, fetch, error=RuntimeError, fetch_offline=False):
    """
    (fetch(), None), or (None, why) so that the committed copy may stand in: "offline" when NANOCHAT_OFFLINE
    is set (fetch is then not called, unless fetch_offline), "unreachable: <the error>" when fetch failed with
    a network error. Any other failure raises `error` naming `what`: the committed copy does not silently
    replace a broken fetch.
    """
    if offline_mode() and not fetch_offline:
        return None, "offline"
    try:
        return fetch(), None
    except Exception as e:
        if is_network_error(e):
            return None, f"unreachable: {one_line_error(e)}"
        detail = str(e) if isinstance(e, DownloadError) else one_line_error(e)  # its fix is worth reading
        raise error(f"{what} failed ({detail}); not a network error, so the committed copy is not "
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


# -----------------------------------------------------------------------------
# The one downloader

DOWNLOAD_ATTEMPTS = 5
CHUNK_SIZE = 1 << 20  # bytes per streamed read


class DownloadError(RuntimeError):
    """A download that failed for good; the message names the URL or file and the fix."""


def with_retries(what, fetch, attempts=DOWNLOAD_ATTEMPTS):
    """fetch(), retried after 2, 4, 8, 16 s when it fails with a network error; other errors fail at once."""
    for attempt in range(1, attempts + 1):
        try:
            return fetch()
        except Exception as e:
            network = is_network_error(e)
            if not network or attempt == attempts:
                why = (f"network error after {attempts} attempts ({one_line_error(e)}). Fix: check the "
                       f"connection and run again; the partial download resumes" if network else
                       f"not a network error: not retried ({one_line_error(e)}). Fix the cause (the address, "
                       f"the disk) and run again")
                raise DownloadError(f"Failed to download {what}: {why}.") from e
            print0(f"Attempt {attempt}/{attempts} failed for {what} ({one_line_error(e)}); "
                   f"retrying in {2 ** attempt}s")
            time.sleep(2 ** attempt)


def _fetch_into(url, part, timeout):
    """Stream url into `part`, resuming a partial one with a Range request; ConnectionError if cut short."""
    offset = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"Accept-Encoding": "identity"}  # byte offsets and sizes must refer to the file itself
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if offset and e.code == 416:
            return  # the partial file is already whole: the checks decide
        raise
    with response:
        if offset and response.status != 206:
            print0(f"The server ignored the Range request for {url}; restarting from byte 0")
            offset = 0
        # the whole file's size: from a 206's Content-Range ("bytes a-b/total"), or a 200's Content-Length
        size = response.headers.get("Content-Range" if offset else "Content-Length", "").rpartition("/")[2]
        expected = int(size) if size.isdigit() else None
        with open(part, "ab" if offset else "wb") as f:
            while chunk := response.read(CHUNK_SIZE):
                f.write(chunk)
    size = os.path.getsize(part)
    if expected is not None and size < expected:
        raise ConnectionError(f"connection ended early: {size:,} of {expected:,} bytes")  # kept, to resume


def check_file(path, sha256=None, validate=None):
    """Raise unless the file has the given sha256 (when known) and passes validate(path) (when given)."""
    if sha256 is not None:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_SIZE):
                digest.update(chunk)
        if digest.hexdigest() != sha256:
            raise ValueError(f"its sha256 is {digest.hexdigest()}, expected {sha256}")
    if validate is not None:
        validate(path)


def _passes_checks(path, sha256, validate):
    """Whether the file exists and passes the checks (one that fails them is to be replaced: said)."""
    if not os.path.exists(path):
        return False
    try:
        check_file(path, sha256, validate)
        return True
    except Exception as e:
        print0(f"Replacing {path}: {one_line_error(e)}")
        return False


def _accept(fetched, target, source, sha256, validate):
    """Check a fetched file; a bad one is removed, since resuming it would only append to bad bytes."""
    try:
        check_file(fetched, sha256, validate)
    except Exception as e:
        os.remove(fetched)
        raise DownloadError(f"{target} downloaded from {source} is not valid ({type(e).__name__}: {e}); "
                            f"removed it. Fix: run again to download it afresh; if it fails again, the "
                            f"source is damaged or is not the file expected.") from e


def download(url, path, sha256=None, validate=None, postprocess=None, attempts=DOWNLOAD_ATTEMPTS, timeout=30):
    """
    Fetch url to `path` once across processes (a lock file beside it) and return path. An existing file that
    passes the checks (sha256 when known, validate(path) when given) is kept; one that fails them is
    replaced. Bytes stream into <path>.part, which a later attempt or run resumes with an HTTP Range
    request; the result must have the announced size and pass the checks, then it is renamed into place
    and postprocess(path) runs, under the lock. Offline (NANOCHAT_OFFLINE) it raises ConnectionError.
    """
    from filelock import FileLock  # only needed here
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with FileLock(os.path.join(folder, f".{name}.lock")):  # the other processes wait, then find the file
        if _passes_checks(path, sha256, validate):
            return path
        if offline_mode():
            # a ConnectionError, as huggingface_hub's offline error: to callers the network is out of reach
            raise ConnectionError(f"NANOCHAT_OFFLINE is set: {path} is missing or unusable, not downloaded")
        part = path + ".part"
        print0(f"Downloading {url}")
        with_retries(url, lambda: _fetch_into(url, part, timeout), attempts)
        _accept(part, path, url, sha256, validate)
        os.replace(part, path)
        if postprocess is not None:
            postprocess(path)
    return path


def hub_download(repo_id, filename, local_dir, validate=None, repo_type="dataset",
                 attempts=DOWNLOAD_ATTEMPTS):
    """
    One file of a Hugging Face hub repo, in local_dir: an existing one that passes validate(path) is kept,
    else huggingface_hub fetches it (HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE apply; it resumes its partial
    files, checks the size), and it is checked against the sha256 the hub announces for LFS files.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    path = os.path.join(local_dir, filename)
    if _passes_checks(path, None, validate):
        return path

    def fetch():
        etag = None
        if not constants.HF_HUB_OFFLINE:  # offline, huggingface_hub itself says what is missing
            etag = get_hf_file_metadata(hf_hub_url(repo_id, filename, repo_type=repo_type)).etag
        return hf_hub_download(repo_id, filename, repo_type=repo_type, local_dir=local_dir), etag
    path, etag = with_retries(f"{filename} from the Hugging Face hub ({repo_type} {repo_id})", fetch,
                              1 if constants.HF_HUB_OFFLINE else attempts)
    sha256 = etag if re.fullmatch(r"[0-9a-f]{64}", etag or "") else None  # a git hash for small files
    _accept(path, path, f"{constants.ENDPOINT} ({repo_id})", sha256, validate)
    return path
