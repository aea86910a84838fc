"""
Runtime policy shared by every module: compute dtype, base directory, distributed identity,
rank-0 printing and progress bars, peak FLOPs and bandwidth for MFU/MBU, and the one downloader
(locked, resumed, verified).

Importing this module does no work. The compute dtype is decided on first access of
COMPUTE_DTYPE (a PEP 562 module __getattr__), logging is configured only by setup_default_logging()
(which every script calls, most through compute_init), and the base directory is created only by
get_base_dir().
"""

import contextlib
import hashlib
import logging
import math
import os
import re
import socket
import sys
import time
import timeit
import urllib.error
import urllib.request

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# -----------------------------------------------------------------------------
# Compute dtype policy. There is no autocast anywhere: master weights stay fp32, the model's
# Linear casts weights to the activation dtype, embeddings are stored in COMPUTE_DTYPE.

_DTYPE_MAP = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _detect_compute_dtype():
    env = os.environ.get("NANOCHAT_DTYPE")
    if env is not None:
        if env not in _DTYPE_MAP:
            raise BadEnvironmentError.unknown("NANOCHAT_DTYPE", env, _DTYPE_MAP)
        return _DTYPE_MAP[env], f"set via NANOCHAT_DTYPE={env}"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) >= (8, 0):
            return torch.bfloat16, f"auto-detected: CUDA SM {major}{minor} (bf16 supported)"
        # fp16 is never auto-selected: it needs a GradScaler
        return torch.float32, (f"auto-detected: CUDA SM {major}{minor} (pre-Ampere, bf16 not supported, "
                               f"using fp32)")
    return torch.float32, "auto-detected: no CUDA (CPU/MPS)"


class Linear(nn.Linear):
    """nn.Linear whose fp32 master weight is cast to the activation dtype: replaces autocast.
    It and norm live here, beside the dtype policy, so that gpt and l3 both import them without a cycle."""

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


def norm(x):
    # weightless RMSNorm in the input dtype
    return F.rms_norm(x, (x.size(-1),))


_compute_dtype_cache = None


def __getattr__(name):
    # COMPUTE_DTYPE is decided once, on first access, and never changes afterwards. Modules read it
    # as common.COMPUTE_DTYPE at use time (never `from nanochat.common import COMPUTE_DTYPE` at import),
    # so NANOCHAT_DTYPE set after importing any nanochat module still takes effect.
    global _compute_dtype_cache
    if name in ("COMPUTE_DTYPE", "COMPUTE_DTYPE_REASON"):
        if _compute_dtype_cache is None:
            _compute_dtype_cache = _detect_compute_dtype()
        return _compute_dtype_cache[0] if name == "COMPUTE_DTYPE" else _compute_dtype_cache[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -----------------------------------------------------------------------------
# Logging (explicit, never at import)

class ColoredFormatter(logging.Formatter):
    """Colours the level name; for INFO records, bolds sizes, percentages and shard numbers."""
    COLORS = {"DEBUG": "\033[36m", "INFO": "\033[32m", "WARNING": "\033[33m",
              "ERROR": "\033[31m", "CRITICAL": "\033[35m"}
    RESET, BOLD = "\033[0m", "\033[1m"

    def format(self, record):
        record = logging.makeLogRecord(record.__dict__)  # don't leak colours into other handlers
        color = self.COLORS.get(record.levelname, "")
        if color:
            record.levelname = f"{color}{self.BOLD}{record.levelname}{self.RESET}"
        message = super().format(record)
        if record.levelno == logging.INFO:
            message = re.sub(r"(\d+(?:\.\d+)?\s*(?:GB|MB|%|docs))", rf"{self.BOLD}\1{self.RESET}", message)
            message = re.sub(r"(Shard \d+)", rf"{self.COLORS['INFO']}{self.BOLD}\1{self.RESET}", message)
        return message


def setup_default_logging():
    """Install one coloured stream handler on the root logger (a no-op if one is already there)."""
    handler = logging.StreamHandler()
    handler.setFormatter(ColoredFormatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


# -----------------------------------------------------------------------------
# Paths and downloads

def base_dir_path():
    """Root of every artifact: $NANOCHAT_BASE_DIR if non-empty, else ~/.cache/nanochat. Creates nothing."""
    return os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")


# Small real datasets committed with the repo (pretraining sample, eval bundle, task subsets), used
# when offline. Resolved from this file, so it works from any working directory of a source checkout.
REPO_DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


def offline_mode():
    """True when NANOCHAT_OFFLINE is 1/true/yes: never touch the network, use the committed data."""
    return os.environ.get("NANOCHAT_OFFLINE", "").strip().lower() in ("1", "true", "yes")


def get_base_dir():
    """base_dir_path(), created if missing."""
    base_dir = base_dir_path()
    try:
        os.makedirs(base_dir, exist_ok=True)
    except OSError as e:  # a file of that name, a parent that cannot be written
        raise BadSettingError(f"nanochat's directory {base_dir} cannot be created ({one_line_error(e)}). "
                              f"Fix: set NANOCHAT_BASE_DIR to a directory you can write") from None
    return base_dir


@contextlib.contextmanager
def atomic_open(path, mode="w"):
    """
    Open a temp file next to `path` for writing; on a clean exit it is fsynced and renamed over `path`,
    on an exception it is deleted. Readers therefore see the old file or the new one, never a torn one.
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class SetupError(RuntimeError):
    """
    Something the user has to fix before a run can start or go on: a missing or damaged file, a download
    that failed for good, a setting that cannot work. Its message names the file or setting and the fix,
    so a script ends with that one line (exit_on_setup_error) rather than a traceback.
    """


class MissingFileError(SetupError, FileNotFoundError):
    """A file a stage needs (a checkpoint, the tokenizer) does not exist."""


class BadFileError(SetupError, ValueError):
    """A file a stage needs exists but holds something it cannot use."""


class BadSettingError(SetupError, ValueError):
    """Flags that cannot work together, or with the checkpoint or data they meet."""


class DeviceTypeError(BadSettingError, AssertionError):
    """A device type that is unknown or that this PyTorch cannot use. Also an AssertionError: the reference
    asserts both, and code may catch that."""


class BadEnvironmentError(BadSettingError, KeyError):
    """An environment variable set to a value nanochat does not know. Also a KeyError and a ValueError: what
    the reference raises for an unknown NANOCHAT_DTYPE and NANOCHAT_ATTN, which code may catch."""

    __str__ = BaseException.__str__  # KeyError's would put the message in quotes

    @classmethod
    def unknown(cls, name, value, allowed):
        return cls(f"{name}={value!r} is not one of {', '.join(allowed)}: set one of those, or unset {name} "
                   f"to have it chosen automatically")


@contextlib.contextmanager
def exit_on_setup_error(prog):
    """Inside (or on a decorated main()), a SetupError ends the program with `<prog>: error: <message>` on
    stderr and exit status 1; every other exception keeps its traceback, since it is a bug to report."""
    try:
        yield
    except SetupError as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def one_line_error(error):
    """
    `Type: first sentence` of an exception, on one line, for messages about a damaged file: torch and
    pickle errors span several lines, and torch's weights-only advice after its first sentence
    (re-run with weights_only=False) is not the fix for a truncated file.
    """
    text = " ".join(str(error).split()).split(". ")[0]
    return f"{type(error).__name__}: {text[:150]}{'...' if len(text) > 150 else ''}"


# -----------------------------------------------------------------------------
# The one downloader: download() for plain URLs (the eval bundle, the word list, shards from a mirror),
# hub_download() for ClimbMix shards from the Hugging Face hub. Both retry only network errors.

# Exception classes (the builtin ConnectionError; requests', urllib3's, httpx's, huggingface_hub's,
# http.client's IncompleteRead) that mean "the server could not be reached", matched by class name so
# that checking an error imports none of those packages
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
    if isinstance(exc, (urllib.error.URLError, TimeoutError, socket.gaierror, socket.herror)):
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


DOWNLOAD_ATTEMPTS = 5
CHUNK_SIZE = 1 << 20  # bytes per streamed read


class DownloadError(SetupError):
    """A download that failed for good; the message names the URL or file and the fix."""


class OfflineError(ConnectionError):
    """
    A file to download is missing or unusable and NANOCHAT_OFFLINE is set. A ConnectionError, as
    huggingface_hub's offline error: to callers the network is out of reach (a committed copy may stand in).
    """
    def __init__(self, path):
        state = "is unusable" if os.path.exists(path) else "is missing"
        super().__init__(f"{path} {state}, and downloads are off because NANOCHAT_OFFLINE is set: unset it, "
                         f"or put the file at {path}")


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
    and postprocess(path) runs, under the lock. Offline (NANOCHAT_OFFLINE) it raises OfflineError.
    """
    from filelock import FileLock  # only needed here
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with FileLock(os.path.join(folder, f".{name}.lock")):  # the other processes wait, then find the file
        if _passes_checks(path, sha256, validate):
            return path
        if offline_mode():
            raise OfflineError(path)
        part = path + ".part"
        print0(f"Downloading {url}")
        with_retries(url, lambda: _fetch_into(url, part, timeout), attempts)
        _accept(part, path, url, sha256, validate)
        os.replace(part, path)
        if postprocess is not None:
            postprocess(path)
    return path


def hub_download(repo_id, filename, local_dir, validate=None):
    """
    One file of a Hugging Face hub dataset repo, in local_dir: an existing one that passes validate(path) is
    kept, else huggingface_hub fetches it (HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE apply; it resumes its partial
    files, checks the size), and it is checked against the sha256 the hub announces for LFS files.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    path = os.path.join(local_dir, filename)
    if _passes_checks(path, None, validate):
        return path
    if offline_mode():  # huggingface_hub itself knows only HF_HUB_OFFLINE
        raise OfflineError(path)

    def fetch():
        etag = None
        if not constants.HF_HUB_OFFLINE:  # offline, huggingface_hub itself says what is missing
            etag = get_hf_file_metadata(hf_hub_url(repo_id, filename, repo_type="dataset")).etag
        return hf_hub_download(repo_id, filename, repo_type="dataset", local_dir=local_dir), etag
    path, etag = with_retries(f"{filename} from the Hugging Face hub (dataset {repo_id})", fetch,
                              1 if constants.HF_HUB_OFFLINE else DOWNLOAD_ATTEMPTS)
    sha256 = etag if re.fullmatch(r"[0-9a-f]{64}", etag or "") else None  # a git hash for small files
    _accept(path, path, f"{constants.ENDPOINT} ({repo_id})", sha256, validate)
    return path


def download_file_with_lock(url, filename, postprocess_fn=None, retries=5, timeout=60):
    """<base_dir>/<filename>, by download() above; postprocess_fn(path) runs once, after the download.
    Kept under this name for the reference's callers."""
    return download(url, os.path.join(get_base_dir(), filename), postprocess=postprocess_fn, attempts=retries,
                    timeout=timeout)


def maybe_compile(model):
    """torch.compile(model, dynamic=False), or the model itself when NANOCHAT_COMPILE=0 (tests, debugging,
    machines without a C++ compiler)."""
    if os.environ.get("NANOCHAT_COMPILE", "1") == "0":
        print0("NANOCHAT_COMPILE=0: running the model eagerly (no torch.compile)")
        return model
    return torch.compile(model, dynamic=False)


# -----------------------------------------------------------------------------
# Rank-aware printing. The rank is read from the environment in exactly one place.

def _env_rank():
    return int(os.environ.get("RANK", 0))


def print0(s="", **kwargs):
    if _env_rank() == 0:
        print(s, **kwargs)


def progress_shown():
    """Progress bars are drawn on rank 0 when stderr is a terminal, unless NANOCHAT_QUIET is set: logs,
    pipes and tests see exactly the lines they would see without them."""
    quiet = os.environ.get("NANOCHAT_QUIET", "0") not in ("", "0")
    return not quiet and _env_rank() == 0 and sys.stderr.isatty()


def progress(iterable=None, **kwargs):
    """A tqdm bar (count, rate, ETA) on stderr, erased when done; disabled unless progress_shown()."""
    from tqdm import tqdm
    return tqdm(iterable, disable=not progress_shown(), leave=False, dynamic_ncols=True, **kwargs)


def print_banner():
    # DOS Rebel font
    banner = r"""
                                                       █████                █████
                                                      ░░███                ░░███
 ████████    ██████   ████████    ██████   ██████  ░███████    ██████   ███████
░░███░░███  ░░░░░███ ░░███░░███  ███░░███ ███░░███ ░███░░███  ░░░░░███ ░░░███░
 ░███ ░███   ███████  ░███ ░███ ░███ ░███░███ ░░░  ░███ ░███   ███████   ░███
 ░███ ░███  ███░░███  ░███ ░███ ░███ ░███░███  ███ ░███ ░███  ███░░███   ░███ ███
 ████ █████░░████████ ████ █████░░██████ ░░██████  ████ █████░░████████  ░░█████
░░░░ ░░░░░  ░░░░░░░░ ░░░░ ░░░░░  ░░░░░░   ░░░░░░  ░░░░ ░░░░░  ░░░░░░░░    ░░░░░
"""
    print0(banner)


# -----------------------------------------------------------------------------
# Distributed identity and process-group setup

def is_ddp_requested():
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def is_ddp_initialized():
    return dist.is_available() and dist.is_initialized()


def get_dist_info():
    """(is_ddp, rank, local_rank, world_size) from the torchrun environment variables."""
    if is_ddp_requested():
        return True, _env_rank(), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def autodetect_device_type():
    device_type = ("cuda" if torch.cuda.is_available() else
                   "mps" if torch.backends.mps.is_available() else "cpu")
    print0(f"Autodetected device type: {device_type}")
    return device_type


def compute_init(device_type="cuda"):
    """Show the library's INFO logs (setup_default_logging), seed, set matmul precision, and join the process
    group when launched by torchrun. Returns (is_ddp, rank, local_rank, world_size, device)."""
    setup_default_logging()
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available, "cpu": lambda: True}
    if device_type not in available:
        raise DeviceTypeError(f"Invalid device type: {device_type}. Fix: pass --device-type cuda, cpu or "
                              f"mps, or leave it out to use the best device there is")
    if not available[device_type]():
        raise DeviceTypeError(f"Your PyTorch installation is not configured for {device_type.upper()} but "
                              f"device_type is '{device_type}'. Fix: leave --device-type out to use the best "
                              f"device there is, or install a PyTorch build for {device_type.upper()}")
    cuda = device_type == "cuda"

    # The model's initial weights come from the global RNG seeded here.
    torch.manual_seed(42)
    if cuda:
        torch.cuda.manual_seed(42)
        torch.set_float32_matmul_precision("high")  # TF32 matmuls

    is_ddp, rank, local_rank, world_size = get_dist_info()
    device = torch.device("cuda", local_rank) if is_ddp and cuda else torch.device(device_type)
    if is_ddp and device_type in ("cuda", "cpu"):
        # gloo lets multi-process CPU runs (torchrun --nproc_per_node=2 on a laptop) really average
        # gradients: without a process group each process would silently train its own model.
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
        dist.barrier()
    if rank == 0:
        logger.info(f"Distributed world size: {world_size}")
    return is_ddp, rank, local_rank, world_size, device


def compute_cleanup():
    if is_ddp_initialized():
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# Agreement across ranks (no-ops without a process group)

def rank_and_world():
    """(rank, world_size) of the initialised process group, else (0, 1)."""
    if is_ddp_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def agree(values, device, op):
    """Element-wise reduction (a dist.ReduceOp) over ranks of a few floats; every rank gets the same list."""
    if not is_ddp_initialized():
        return [float(v) for v in values]  # one process: no device tensor, no host read
    dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64  # MPS has no float64
    t = torch.tensor([float(v) for v in values], dtype=dtype, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def agree_max(values, device):
    """Element-wise max over ranks of a few floats (every rank gets the same list back)."""
    return agree(values, device, dist.ReduceOp.MAX)


def agree_sum(values, device):
    """Element-wise sum over ranks of a few floats (every rank gets the same list back)."""
    return agree(values, device, dist.ReduceOp.SUM)


def gather_from_ranks(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (a one-element list without a process group)."""
    if not is_ddp_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class DummyWandb:
    """Null object standing in for a wandb run (--run dummy, or non-master ranks)."""
    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


# -----------------------------------------------------------------------------
# Peak dense BF16 FLOP/s (MFU) and peak memory bandwidth in bytes/s (MBU). First row whose substrings
# all occur in the lower-cased device name wins, so the more specific rows come first. A substring must not
# be followed by a digit: "l4" is not the L40's row, nor "a40" the RTX A4000's. Values are vendor datasheet
# numbers (bandwidth: the HBM/GDDR figure of the usual memory size of that part).

_PEAK_TABLE = [  # (substrings, FLOP/s, bytes/s)
    (("gb200",), 2.5e15, 8e12), (("grace blackwell",), 2.5e15, 8e12), (("b200",), 2.25e15, 8e12),
    (("b100",), 1.8e15, 8e12),
    (("h200", "nvl"), 836e12, 4.8e12), (("h200", "pcie"), 836e12, 4.8e12), (("h200",), 989e12, 4.8e12),
    (("h100", "nvl"), 835e12, 3.9e12), (("h100", "pcie"), 756e12, 2.0e12), (("h100",), 989e12, 3.35e12),
    (("h800", "nvl"), 989e12, 3.9e12), (("h800",), 756e12, 2.0e12),
    (("a100",), 312e12, 2.039e12), (("a800",), 312e12, 2.039e12), (("a40",), 149.7e12, 696e9),
    (("a30",), 165e12, 933e9), (("l40s",), 362e12, 864e9), (("l40-s",), 362e12, 864e9),
    (("l40 s",), 362e12, 864e9), (("l4",), 121e12, 300e9),
    (("mi355",), 2.5e15, 8e12), (("mi325",), 1.3074e15, 6e12), (("mi300x",), 1.3074e15, 5.3e12),
    (("mi300a",), 980.6e12, 5.3e12), (("mi250x",), 383e12, 3.2768e12), (("mi250",), 362.1e12, 3.2768e12),
    (("5090",), 209.5e12, 1.792e12), (("4090",), 165.2e12, 1.008e12), (("3090",), 71e12, 936e9),
]


def _peak_row(device_name):
    name = device_name.lower()
    occurs = lambda s: re.search(re.escape(s) + r"(?!\d)", name)  # "l4" does not occur in "l40"
    return next((row for row in _PEAK_TABLE if all(map(occurs, row[0]))), None)


def get_peak_flops(device_name):
    row = _peak_row(device_name)
    if row is not None:
        return row[1]
    if "data center gpu max 1550" in device_name.lower():  # Intel Ponte Vecchio: 512 FLOP/clock/unit, 1.3GHz
        return 512 * torch.xpu.get_device_properties().max_compute_units * 1300e6
    logger.warning(f"Peak flops undefined for: {device_name}, MFU will show as 0%")
    return float("inf")


def get_peak_bandwidth(device_name):
    """Datasheet memory bandwidth in bytes/s, inf (MBU 0%) for a device not in the table."""
    row = _peak_row(device_name)
    if row is None:
        logger.warning(f"Peak bandwidth undefined for: {device_name}, MBU will show as 0%")
    return float("inf") if row is None else row[2]


def _best_seconds(fn, repeats):
    fn()  # warm-up: allocation, thread pool start
    return min(timeit.repeat(fn, number=1, repeat=repeats))


def measure_cpu_flops(matmul_dim=1024, repeats=5):
    """
    The fp32 FLOP/s this CPU reaches, measured in well under a second: the best of `repeats` matmuls of
    matmul_dim^2. An estimate, not a datasheet number: MFU against it says "of what this machine can do at
    all", so it reads higher than against a vendor peak. The operands are constants: drawing them from the
    global RNG would change the weights of a model initialised after the measurement.
    """
    a, b = torch.full((matmul_dim, matmul_dim), 0.5), torch.full((matmul_dim, matmul_dim), 0.5)
    return 2 * matmul_dim**3 / _best_seconds(lambda: a @ b, repeats)


def measure_cpu_bandwidth(copy_mib=64, repeats=5):
    """The memory bytes/s this CPU reaches: the best of `repeats` copies of copy_mib MiB (read + write,
    larger than any cache). An estimate, as measure_cpu_flops is."""
    src = torch.empty(copy_mib * 2**20 // 4)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / _best_seconds(lambda: dst.copy_(src), repeats)


def get_device_peak_flops(device_type):
    """Peak FLOP/s of the current device for MFU: the datasheet table on CUDA, a measured estimate on CPU
    (measure_cpu_flops), inf elsewhere (MFU then prints as 0)."""
    if device_type == "cuda":
        return get_peak_flops(torch.cuda.get_device_name(0))
    return measure_cpu_flops() if device_type == "cpu" else float("inf")


def get_device_peaks(device_type):
    """(peak FLOP/s, peak bytes/s, label) for MFU and MBU: the datasheet table on CUDA, a measured
    estimate on CPU, (inf, inf) elsewhere (MFU/MBU then print as 0)."""
    if device_type == "cuda":
        name = torch.cuda.get_device_name(0)
        return get_peak_flops(name), get_peak_bandwidth(name), f"datasheet ({name})"
    if device_type == "cpu":
        label = f"estimated (measured on {torch.get_num_threads()} CPU threads)"
        return measure_cpu_flops(), measure_cpu_bandwidth(), label
    return float("inf"), float("inf"), f"unknown ({device_type})"


def percent_of_peak(per_second, peak):
    """Utilisation in percent: an achieved rate (FLOP/s for MFU, bytes/s for MBU) over the device's peak
    (get_device_peaks); 0 when the peak is unknown (inf)."""
    return 100 * per_second / peak if math.isfinite(peak) and peak > 0 else 0.0
