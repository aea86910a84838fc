"""
Pretraining data: ClimbMix shard identity, the download CLI, an offline sample, and parquet iteration.

Shards are parquet files with one string column `text` (one document per row). Shard i is named
index_to_filename(i); shard MAX_SHARD (`shard_06542.parquet`) is the validation shard.

    python -m nanochat.dataset -n 8        # train shards 0..7 plus the val shard
    python -m nanochat.dataset --sample    # install the committed offline sample (data/pretrain_sample/)

Importing this module does no work: DATA_DIR is computed on access (PEP 562 module __getattr__) and
no directory is created until something is written into it.
"""

import argparse
import logging
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq

from nanochat.common import (REPO_DATA_DIR, BadFileError, BadSettingError, DownloadError, MissingFileError,
                             SetupError, atomic_open, base_dir_path, download, exit_on_setup_error,
                             hub_download, offline_mode, one_line_error, print0, progress)

logger = logging.getLogger(__name__)

# -----------------------------------------------------------------------------
# Identity

HF_REPO = "karpathy/climbmix-400b-shuffle"  # a dataset repo on the Hugging Face hub
MAX_SHARD = 6542  # shards 0..6542 exist (6543 files); the last one is the validation shard
DATA_DIRNAME = "base_data_climbmix"
LEGACY_DIRNAME = "base_data"  # FineWeb-Edu-100B shards from before the March 4, 2026 switch

# The committed offline sample (see data/pretrain_sample/README.md). Its files carry this key in the
# parquet key-value metadata, so a sample shard can never be mistaken for a real one.
SAMPLE_DIR = os.path.join(REPO_DATA_DIR, "pretrain_sample")
SAMPLE_TAG = b"nanochat_sample"

NO_DATA_HINT = ("Download shards with `python -m nanochat.dataset -n 8` (8 train shards plus the val shard), "
                "or install the small offline sample with `python -m nanochat.dataset --sample`.")


def index_to_filename(index):
    return f"shard_{index:05d}.parquet"


VAL_FILENAME = index_to_filename(MAX_SHARD)


def get_data_dir():
    """<base_dir>/base_data_climbmix. Creates nothing."""
    return os.path.join(base_dir_path(), DATA_DIRNAME)


def __getattr__(name):
    # DATA_DIR follows NANOCHAT_BASE_DIR at access time. Inside this module call get_data_dir():
    # a bare global name lookup never reaches this hook.
    if name == "DATA_DIR":
        return get_data_dir()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -----------------------------------------------------------------------------
# Reading shards

class CorruptShardError(SetupError):
    """A parquet file that cannot be read, or that has no string `text` column. The message names the file."""


# how to replace a damaged shard: the downloader re-fetches any shard that does not read
SHARD_FIX = ("Fix: run `python -m nanochat.dataset -n <number of train shards you use>` again, which "
             "replaces unreadable shards (or `python -m nanochat.dataset --sample` for the offline sample)")


class ShardReader:
    """The `text` column of row groups of `files` (addressed by index in that list), keeping the last file
    read open: reads go file by file, and a pass over thousands of shards stays under the open-file limit.
    Its errors name the file, which pyarrow's do not."""

    def __init__(self, files):
        self.files, self._open = files, {}

    def parquet(self, pq_idx):
        if pq_idx not in self._open:
            path = self.files[pq_idx]
            self._open.clear()
            try:
                self._open[pq_idx] = pq.ParquetFile(path)
            except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... depending on the damage
                raise CorruptShardError(f"{path} is not a readable parquet file ({one_line_error(e)}). "
                                        f"{SHARD_FIX}.") from e
        return self._open[pq_idx]

    def num_row_groups(self, pq_idx):
        return self.parquet(pq_idx).num_row_groups

    def texts(self, pq_idx, rg_idx):
        return self.column(pq_idx, rg_idx).to_pylist()

    def column(self, pq_idx, rg_idx):
        """The row group's `text` column, decoded (a pyarrow array, not yet Python strings)."""
        path, n = self.files[pq_idx], self.num_row_groups(pq_idx)
        if not 0 <= rg_idx < n:
            raise IndexError(f"row group {rg_idx} out of range: {path} has {n} row groups")
        try:
            return self.parquet(pq_idx).read_row_group(rg_idx, columns=["text"]).column("text")
        except Exception as e:
            raise CorruptShardError(f"Cannot read row group {rg_idx} of {path} ({one_line_error(e)}). "
                                    f"{SHARD_FIX}.") from e


def inspect_shard(path):
    """Read and check a shard's footer; return its pyarrow FileMetaData. Raises CorruptShardError."""
    with ShardReader([path]).parquet(0) as pf:
        schema, metadata = pf.schema_arrow, pf.metadata
    idx = schema.get_field_index("text")
    if idx < 0 or str(schema.field(idx).type) not in ("string", "large_string"):
        columns = ", ".join(f"{field.name}: {field.type}" for field in schema)
        raise CorruptShardError(f"{path} has no string column 'text' (columns: {columns}). {SHARD_FIX}.")
    return metadata


def is_sample_file(path):
    """True if `path` is a shard of the committed offline sample (tagged in its parquet metadata)."""
    return SAMPLE_TAG in (inspect_shard(path).metadata or {})


def num_row_groups(path):
    return inspect_shard(path).num_row_groups


def read_row_group(path, rg_idx):
    return ShardReader([path]).texts(0, rg_idx)


def _resolve_data_dir(data_dir, warn_on_legacy):
    if data_dir is not None:
        if not os.path.isdir(data_dir):  # never substitute the legacy dir for an explicit one
            raise MissingFileError(f"Data directory {data_dir} does not exist. {NO_DATA_HINT}")
        return data_dir
    data_dir = get_data_dir()
    if os.path.isdir(data_dir):
        return data_dir
    legacy_dir = os.path.join(base_dir_path(), LEGACY_DIRNAME)
    if not os.path.isdir(legacy_dir):
        raise MissingFileError(f"No pretraining data: {data_dir} does not exist. {NO_DATA_HINT}")
    if warn_on_legacy:
        rule = "=" * 80
        print0(f"{rule}\nWARNING: DATASET UPGRADE REQUIRED\n{rule}\n"
               f"Falling back to the legacy FinewebEdu-100B shards in {legacy_dir}.\n"
               f"On March 4, 2026 nanochat switched its pretraining data from FinewebEdu-100B to "
               f"ClimbMix-400B.\nTo upgrade, download the new shards and retrain the tokenizer:\n"
               f"    python -m nanochat.dataset -n 170\n    python -m scripts.tok_train\n{rule}")
    return legacy_dir


def list_parquet_files(data_dir=None, warn_on_legacy=False):
    """
    Full paths of the `*.parquet` files in data_dir (default DATA_DIR), sorted by name; `.tmp`
    partials and hidden files are ignored. Only the default dir falls back to the legacy
    `<base_dir>/base_data` when missing (with an upgrade banner if warn_on_legacy); an explicit
    data_dir that does not exist raises FileNotFoundError, as does a missing default with no legacy dir.
    """
    data_dir = _resolve_data_dir(data_dir, warn_on_legacy)
    names = sorted(n for n in os.listdir(data_dir) if n.endswith(".parquet") and not n.startswith("."))
    return [os.path.join(data_dir, n) for n in names]


def list_split_files(split, data_dir=None, warn_on_legacy=False):
    """
    The shard paths of one split ('train' or 'val'), in file order; index i of this list is the `pq_idx`
    of the dataloader's resume state. The val split is pinned to the file named shard_06542.parquet; if it
    is absent the last file is used, with a warning, as the reference does. Raises FileNotFoundError when
    the split has no file (e.g. only the val shard was downloaded).
    """
    assert split in ("train", "val"), "split must be 'train' or 'val'"
    data_dir = _resolve_data_dir(data_dir, warn_on_legacy)
    files = list_parquet_files(data_dir)
    val = [f for f in files if os.path.basename(f) == VAL_FILENAME]
    if not val and files:
        logger.warning(f"{VAL_FILENAME} not found in {data_dir}: using the last file, "
                       f"{os.path.basename(files[-1])}, as the validation split (not used for training)")
        val = files[-1:]
    chosen = [f for f in files if f not in val] if split == "train" else val
    if not chosen:
        found = ", ".join(os.path.basename(f) for f in files) or "no parquet files"
        raise MissingFileError(f"No {split} shard in {data_dir} (found: {found}). {NO_DATA_HINT}")
    return chosen


def parquets_iter_batched(split, start=0, step=1):
    """
    One finite pass over a split, yielding each selected row group's `text` column as a list: for each
    file, row groups range(start, num_row_groups, step) (DDP: start=rank, step=world_size). Files are
    checked before the first yield, so a missing split or a corrupt shard fails at the call, not mid-way.
    """
    files = list_split_files(split)
    counts = [num_row_groups(f) for f in files]
    reader = ShardReader(files)
    return (reader.texts(i, rg_idx) for i, n in enumerate(counts) for rg_idx in range(start, n, step))


def text_iterator(max_chars, doc_cap):
    """tok_train's text: train-split documents cropped to doc_cap characters, stopping after the one that
    crosses max_chars."""
    total = 0
    with progress(total=max_chars, unit="char", unit_scale=True, desc="Reading training text") as bar:
        for batch in parquets_iter_batched(split="train"):
            for doc in batch:
                doc = doc[:doc_cap]
                total += len(doc)
                bar.update(len(doc))
                yield doc
                if total > max_chars:
                    return


# -----------------------------------------------------------------------------
# Downloading

def check_real_shard(path):
    """Raise unless path is a shard with rows whose every page decodes, and not one of the offline sample's:
    what a download must be (and what an existing file must be to be kept). A damaged or spliced data page
    leaves the footer readable, so every row group is read (0.3 s for a 100 MB shard on 2 cores)."""
    metadata = inspect_shard(path)
    if SAMPLE_TAG in (metadata.metadata or {}):
        raise ValueError(f"{path} is a shard of the offline sample, not the real one")
    if metadata.num_rows == 0:
        raise ValueError(f"{path} has no rows")
    reader = ShardReader([path])
    for rg_idx in range(metadata.num_row_groups):
        reader.column(0, rg_idx)


def download_single_file(index, data_dir=None, base_url=None):
    """
    Shard `index` into data_dir (default DATA_DIR) from the Hugging Face hub, or from base_url/<name> (a plain
    HTTP mirror); True on success, else False with the reason printed. An existing readable real shard is
    kept; a sample shard or an unreadable file is replaced. Only network errors are retried.
    """
    data_dir = data_dir or get_data_dir()
    filename = index_to_filename(index)
    try:
        if base_url is None:
            hub_download(HF_REPO, filename, data_dir, validate=check_real_shard)
        else:
            # `--base-url http://host/shards/` must not ask for host/shards//<name>: many servers answer 404
            url = f"{base_url.rstrip('/')}/{filename}"
            download(url, os.path.join(data_dir, filename), validate=check_real_shard)
        return True
    except (DownloadError, OSError) as e:  # OSError: the disk
        print0(f"Failed to download {filename}: {e}")
        return False


def shard_ids(num_files):
    """Shard indices the CLI downloads: train shards 0..n-1 (all when n == -1), plus the val shard."""
    num_train = MAX_SHARD if num_files == -1 else min(num_files, MAX_SHARD)
    return list(range(num_train)) + [MAX_SHARD]


# -----------------------------------------------------------------------------
# The offline sample

def install_sample(data_dir=None, sample_dir=SAMPLE_DIR):
    """
    Copy the committed sample shards into data_dir (default DATA_DIR); returns the installed paths.
    Refuses (BadSettingError, nothing copied) if data_dir holds any parquet file that is not a sample
    shard, so the sample is never mixed with, or written over, real data. Each copy goes through a
    temp file and a rename.
    """
    data_dir = data_dir or get_data_dir()
    sources = list_parquet_files(sample_dir) if os.path.isdir(sample_dir) else []
    if not sources:
        raise MissingFileError(f"No sample shards in {sample_dir} (they ship with the git checkout).")
    for src in sources:
        if not is_sample_file(src):
            raise BadFileError(f"{src} is not tagged as a sample shard; refusing to install it")

    def is_real(path):
        try:
            return not is_sample_file(path)
        except CorruptShardError:
            return True  # unknown content: leave it for the user to inspect
    existing = list_parquet_files(data_dir) if os.path.isdir(data_dir) else []
    real = [path for path in existing if is_real(path)]
    if real:
        raise BadSettingError(f"Refusing to install the sample into {data_dir}: it already holds {len(real)} "
                              f"non-sample shard(s) ({os.path.basename(real[0])}, ...). Use another "
                              f"NANOCHAT_BASE_DIR, or delete those files first.")
    os.makedirs(data_dir, exist_ok=True)
    installed = []
    for src in sources:
        dst = os.path.join(data_dir, os.path.basename(src))
        with open(src, "rb") as source, atomic_open(dst, "wb") as copy:
            shutil.copyfileobj(source, copy)
        meta = inspect_shard(dst)
        print0(f"Installed sample {os.path.basename(dst)}: {meta.num_rows} docs, {meta.num_row_groups} row "
               f"groups, {os.path.getsize(dst):,} bytes -> {dst}")
        installed.append(dst)
    return installed


# -----------------------------------------------------------------------------
# CLI

def build_parser():
    parser = argparse.ArgumentParser(description="Download pretraining dataset shards")
    parser.add_argument("-n", "--num-files", type=int, default=-1,
                        help=f"number of train shards (-1 = all {MAX_SHARD}); the val shard is always added")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--sample", action="store_true",
                        help="install the offline sample (data/pretrain_sample/) instead of downloading")
    parser.add_argument("--base-url", default=None, help="a plain HTTP mirror of the shards (default: the "
                        "Hugging Face hub, with HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE honoured)")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_files < -1:
        parser.error("--num-files must be -1 (all) or >= 0")
    return args


@exit_on_setup_error("dataset")
def main(argv=None):
    """Entry point of `python -m nanochat.dataset`; returns the exit status (1 if any shard failed)."""
    args = parse_args(argv)
    data_dir = get_data_dir()
    if args.sample:
        install_sample(data_dir)
        print0(f"Done! Installed the offline sample into {data_dir}")
        return 0
    ids = shard_ids(args.num_files)
    print0(f"Downloading {len(ids)} shards using {args.num_workers} workers...")
    print0(f"Target directory: {data_dir}")
    print0()
    # Threads, not processes: the work is network and disk I/O, and a worker process would have to
    # re-import torch (via nanochat.common) under the spawn/forkserver start methods.
    with ThreadPoolExecutor(max_workers=max(1, args.num_workers)) as pool:
        results = pool.map(lambda i: download_single_file(i, data_dir, args.base_url), ids)
        try:
            ok = list(progress(results, total=len(ids), unit="shard", desc="shards"))
        except KeyboardInterrupt:
            # the threads cannot be stopped mid-transfer and the pool's exit would wait for them (minutes):
            # end now, each shard in progress resumes from its .part file next time (its lock dies with us)
            print0("\nInterrupted: run the same command again to go on (shards in progress resume).",
                   flush=True)
            os._exit(130)
    failed = [index_to_filename(i) for i, good in zip(ids, ok) if not good]
    print0(f"Done! Downloaded: {len(ids) - len(failed)}/{len(ids)} shards to {data_dir}")
    if failed:
        fix = (f"NANOCHAT_OFFLINE is set: unset it to download them, or put them in {data_dir}"
               if offline_mode() else "Run the same command again to retry (downloads resume)")
        print0(f"Failed: {', '.join(failed)}. {fix}.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
