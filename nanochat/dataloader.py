"""
BOS-aligned best-fit packing of pretraining documents into (B, T) batches.

Every row holds T + 1 tokens (inputs plus the shifted target) and starts with BOS. Rows are filled with
whole documents, the largest that still fits first; when nothing fits, the shortest buffered document is
cropped to fill the row (that wastes the fewest tokens) and its tail is dropped. No padding: 100% of the
row is used, about 35% of tokenised tokens are cropped away at T = 2048 (dev/LOG.md of the reference).

DDP: rank r reads row groups r, r + W, r + 2W, ... of every file of the split.

Exact resume: the state dict names the next unread text batch (`cursor`) and every buffered document by
(file, row group, row); restoring it re-reads and re-tokenises exactly those documents, so a resumed run
yields the same batches as an uninterrupted one. A state dict with only the reference's fields
(pq_idx, rg_idx, epoch) resumes approximately, as the reference does.

Tokenisation runs on a background thread, a few text batches ahead of the packer.

SFT (chat_sft) packs rendered conversations instead: ConversationPacker, at the end of this file.
"""

import atexit
import bisect
import os
import queue
import threading
from collections import deque

import numpy as np
import torch

from nanochat.common import BadFileError, SetupError, get_dist_info, print0
from nanochat.dataset import SHARD_FIX, CorruptShardError, ShardReader, list_split_files

_PREFETCH_BATCHES = 4  # tokenised text batches queued ahead of the packer


# -----------------------------------------------------------------------------
# The document stream of one rank

def _text_batches(reader, rank, world, cursor, batch_size):
    """
    Infinite stream of (texts, refs, position, next_cursor) for one rank. A cursor is
    [epoch, pq_idx, rg_idx, offset]: the next text batch starts at row `offset` of that row group.
    refs are the (pq_idx, rg_idx, row) of each text; position is the reference's (pq_idx, rg_idx, epoch).
    reader is a dataset.ShardReader over the split's files.
    """
    epoch, pq_start, rg_start, offset = cursor
    while True:
        full_pass, produced = (pq_start, rg_start, offset) == (0, rank, 0), False
        for pq_idx in range(pq_start, len(reader.files)):
            first_rg = rg_start if pq_idx == pq_start else rank
            for rg_idx in range(first_rg, reader.num_row_groups(pq_idx), world):
                texts = reader.texts(pq_idx, rg_idx)
                start = offset if (pq_idx, rg_idx) == (pq_start, rg_start) else 0
                for a in range(start, len(texts), batch_size):
                    b = min(a + batch_size, len(texts))
                    next_cursor = [epoch, pq_idx] + ([rg_idx, b] if b < len(texts) else [rg_idx + world, 0])
                    refs = [(pq_idx, rg_idx, row) for row in range(a, b)]
                    produced = True
                    yield texts[a:b], refs, (pq_idx, rg_idx, epoch), next_cursor
        if full_pass and not produced:
            _raise_no_text(reader, rank, world)
        epoch, pq_start, rg_start, offset = epoch + 1, 0, rank, 0


def _raise_no_text(reader, rank, world):
    """Why a full pass gave this rank no text: shards without rows, or more ranks than row groups."""
    empty = [path for i, path in enumerate(reader.files) if reader.parquet(i).metadata.num_rows == 0]
    if len(empty) == len(reader.files):
        raise CorruptShardError(f"No text to read: {', '.join(empty)} "
                                f"{'has' if len(empty) == 1 else 'have'} no rows. {SHARD_FIX}.")
    raise SetupError(f"Rank {rank} of {world} owns no row group of the split ({len(reader.files)} files): "
                     f"use fewer ranks or more data")


def _approximate_cursor(state, rank, world):
    """The reference's resume rule: skip to this rank's lane of the next stride block."""
    pq_idx, rg_idx, epoch = state.get("pq_idx", 0), state.get("rg_idx"), state.get("epoch", 1)
    if rg_idx is None:
        return [epoch, pq_idx, rank, 0]
    return [epoch, pq_idx, (rg_idx // world + 1) * world + rank, 0]


# -----------------------------------------------------------------------------
# Background tokenisation

class _Prefetcher:
    """
    Tokenises the text stream on a background thread into a bounded FIFO of (documents as int64 arrays,
    refs, position, next_cursor), one per text batch; errors re-raise in the consumer.
    close() stops the thread and joins it. The thread must not outlive the interpreter: a thread still
    inside pyarrow or the tokenizer's native code when the runtime is torn down aborts the process
    ("terminate called without an active exception"), so each prefetcher registers its close() as an atexit
    hook (atexit runs before that teardown) until its owner closes it.
    """

    def __init__(self, stream, encode):
        self._queue = queue.Queue(maxsize=_PREFETCH_BATCHES)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(stream, encode), daemon=True,
                                        name="dataloader-tokenizer")
        atexit.register(self.close)
        self._thread.start()

    def _run(self, stream, encode):
        try:
            for texts, refs, position, next_cursor in stream:
                if self._stop.is_set() or not self._put((encode(texts), refs, position, next_cursor)):
                    return
        except BaseException as e:  # hand the failure to the consumer instead of dying silently
            self._put(e)

    def _put(self, item):
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def get(self):
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self, timeout=60.0):
        """Stop the thread and wait for it: it finishes the text batch in hand (bounded work), then exits."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        atexit.unregister(self.close)


# -----------------------------------------------------------------------------
# Best-fit packing

class _DocBuffer:
    """
    Documents bucketed by length. largest_fitting(n) and shortest() pick what a linear scan of the
    buffer in insertion order would pick (first on ties), in O(log #lengths) instead of O(#docs).
    """

    def __init__(self):
        self._lengths = []  # sorted distinct lengths present
        self._by_length = {}  # length -> deque of (serial, tokens, ref), oldest first
        self._serial = 0
        self.count = 0

    def add(self, tokens, ref):
        n = len(tokens)
        if n not in self._by_length:
            bisect.insort(self._lengths, n)
            self._by_length[n] = deque()
        self._by_length[n].append((self._serial, tokens, ref))
        self._serial += 1
        self.count += 1

    def _pop(self, n):
        bucket = self._by_length[n]
        _, tokens, _ = bucket.popleft()
        if not bucket:
            del self._by_length[n]
            self._lengths.pop(bisect.bisect_left(self._lengths, n))
        self.count -= 1
        return tokens

    def pop_largest_fitting(self, capacity):
        i = bisect.bisect_right(self._lengths, capacity)
        return self._pop(self._lengths[i - 1]) if i > 0 else None

    def pop_shortest(self):
        return self._pop(self._lengths[0])

    def refs(self):
        """Refs of the buffered documents in insertion order (what the state dict saves)."""
        entries = [e for bucket in self._by_length.values() for e in bucket]
        return [list(ref) for _, _, ref in sorted(entries, key=lambda e: e[0])]


class _Packer:
    """Fills (B, T + 1) rows from a _DocBuffer refilled from the tokenised stream."""

    def __init__(self, source, buffer_size):
        self.source = source
        self.buffer_size = buffer_size
        self.docs = _DocBuffer()
        self.position = None  # reference (pq_idx, rg_idx, epoch) of the last refill
        self.cursor = None  # next unread text batch
        self.tokens_used = 0  # tokens placed into rows
        self.tokens_cropped = 0  # tokens dropped from the tails of cropped documents

    def fill_row(self, row):
        capacity, pos = row.shape[0], 0
        while pos < capacity:
            while self.docs.count < self.buffer_size:
                docs, refs, self.position, self.cursor = self.source.get()
                for tokens, ref in zip(docs, refs):
                    self.docs.add(tokens, ref)
            remaining = capacity - pos
            doc = self.docs.pop_largest_fitting(remaining)
            if doc is None:  # everything is longer: crop the shortest, which wastes the least
                doc = self.docs.pop_shortest()
                self.tokens_cropped += len(doc) - remaining
                doc = doc[:remaining]
            row[pos:pos + len(doc)] = doc
            pos += len(doc)
        self.tokens_used += capacity

    def state_dict(self, rank, world):
        pq_idx, rg_idx, epoch = self.position
        return {"pq_idx": pq_idx, "rg_idx": rg_idx, "epoch": epoch,
                "cursor": list(self.cursor), "buffer": self.docs.refs(), "rank": rank, "world_size": world,
                "tokens_used": self.tokens_used, "tokens_cropped": self.tokens_cropped}

    def load_state_dict(self, state, reader, encode):
        """Continue from an exact state: the buffered documents it names are re-read (in file order: the
        reader keeps one file open) and re-tokenised."""
        refs = [tuple(ref) for ref in state["buffer"]]
        _check_state_fits_the_shards(refs, state["cursor"], reader)
        groups = {(p, g): reader.texts(p, g) for p, g in sorted({(p, g) for p, g, _ in refs})}
        if any(row >= len(groups[(p, g)]) for p, g, row in refs):
            _raise_shards_changed(reader)
        for tokens, ref in zip(encode([groups[(p, g)][row] for p, g, row in refs]), refs):
            self.docs.add(tokens, ref)
        self.position, self.cursor = (state["pq_idx"], state["rg_idx"], state["epoch"]), list(state["cursor"])
        self.tokens_used, self.tokens_cropped = state.get("tokens_used", 0), state.get("tokens_cropped", 0)


def _check_state_fits_the_shards(refs, cursor, reader):
    """An exact state names files and row groups by index: it resumes only over the shards it was saved
    with (more shards after them are fine)."""
    num_files = len(reader.files)
    fits = lambda p, g: 0 <= p < num_files and 0 <= g < reader.num_row_groups(p)
    if not (0 <= cursor[1] < num_files and all(fits(p, g) for p, g, _ in refs)):
        _raise_shards_changed(reader)


def _raise_shards_changed(reader):
    data_dir = os.path.dirname(reader.files[0])
    raise BadFileError(f"The checkpoint's dataloader state names documents that the {len(reader.files)} "
                       f"shard(s) of this split in {data_dir} do not have: the shards changed since it was "
                       f"saved. Fix: put back the shards it was trained on, or start a new run on these")


def _resume_cursor(state, rank, world):
    """Where to read on from; exact when the state came from this rank's loader, else the reference's rule."""
    if state is None or "cursor" not in state:
        if state is not None:
            print0("Resuming the dataloader approximately (state has no cursor): skipping to the next "
                   "row-group block")
        return _approximate_cursor(state or {}, rank, world)
    saved_by = (state.get("rank"), state.get("world_size"))
    if saved_by != (rank, world):
        raise ValueError(f"Dataloader state was saved by rank {saved_by[0]} of {saved_by[1]}, "
                         f"cannot resume it exactly as rank {rank} of {world}; pass a state with only "
                         f"pq_idx/rg_idx/epoch for an approximate resume")
    return list(state["cursor"])


def state_for_rank(meta, rank, world):
    """
    The loader state this rank resumes from, given a checkpoint meta. A checkpoint keeps every rank's
    exact state in `dataloader_state_dicts` (rank order) and rank 0's alone in `dataloader_state_dict`
    (what single-process code and the reference read). With the saving world size each rank gets its
    own state back; otherwise (or from a checkpoint with rank 0's state only) the ranks without their own
    state resume approximately from rank 0's position, as the reference does.
    """
    states = meta.get("dataloader_state_dicts")
    if states and len(states) == world:
        return states[rank]
    state = meta.get("dataloader_state_dict")
    if state is None or "cursor" not in state:
        return state
    if (state.get("rank"), state.get("world_size")) == (rank, world):
        return state
    saved_world = len(states) if states else state.get("world_size")
    print0(f"Dataloader state saved by {saved_world} rank(s), resuming on {world}: approximate resume "
           f"(the next row-group block; batches will differ from an uninterrupted run)")
    # only the reference's fields: they resume approximately on any rank of any world size
    return {key: state[key] for key in ("pq_idx", "rg_idx", "epoch") if key in state}


# -----------------------------------------------------------------------------
# Public loaders

def tokenizing_distributed_data_loader_with_state_bos_bestfit(
        tokenizer, B, T, split, tokenizer_threads=4, tokenizer_batch_size=128,
        device="cuda", resume_state_dict=None, buffer_size=1000):
    """
    Infinite generator of (inputs, targets, state_dict): inputs and targets are (B, T) int64 on device.
    The tensors are views into a buffer that the next batch overwrites: clone them to keep them.
    Resuming from a yielded state_dict yields exactly the batches that followed it.
    """
    _, rank, _, world = get_dist_info()
    reader = ShardReader(list_split_files(split, warn_on_legacy=(rank == 0 and split == "train")))
    bos = tokenizer.get_bos_token_id()

    def encode(texts):  # BOS-prefixed int64 arrays
        encoded = tokenizer.encode(texts, prepend=bos, num_threads=tokenizer_threads)
        return [np.asarray(ids, dtype=np.int64) for ids in encoded]
    cursor = _resume_cursor(resume_state_dict, rank, world)

    prefetcher = _Prefetcher(_text_batches(reader, rank, world, cursor, tokenizer_batch_size), encode)
    packer = _Packer(prefetcher, buffer_size)
    if resume_state_dict is not None and "cursor" in resume_state_dict:
        # a reader of its own: the prefetcher's thread is already using the other one
        packer.load_state_dict(resume_state_dict, ShardReader(reader.files), encode)

    staging = _Staging(B, T, torch.device(device))
    try:
        while True:
            for row in staging.next_rows():
                packer.fill_row(row)
            inputs, targets = staging.transfer()
            yield inputs, targets, packer.state_dict(rank, world)
    finally:
        prefetcher.close()


def tokenizing_distributed_data_loader_bos_bestfit(*args, **kwargs):
    """Same as the _with_state loader, yielding (inputs, targets)."""
    for inputs, targets, _ in tokenizing_distributed_data_loader_with_state_bos_bestfit(*args, **kwargs):
        yield inputs, targets


class _Staging:
    """
    Host rows (B, T + 1) -> contiguous device inputs and targets (B, T). The packer writes each batch
    straight into one contiguous host buffer, which travels to the device in a single copy; inputs and
    targets (overlapping shifts of the rows) are split off on the device. Copying the strided views
    rows[:, :-1] and rows[:, 1:] instead would send each through a pageable temporary, which is neither
    asynchronous nor cheap. On CUDA the host buffers are pinned and double-buffered: the copy is
    asynchronous, so the host buffer of batch k must not be rewritten before its copy finished (an event
    per buffer guards it). The device buffers are reused by every batch.
    """

    def __init__(self, B, T, device):
        self.use_cuda = device.type == "cuda"
        n_host = 2 if self.use_cuda else 1
        self.host = [torch.empty((B, T + 1), dtype=torch.long, pin_memory=self.use_cuda)
                     for _ in range(n_host)]
        self.copied = [None] * n_host
        self.k = 0
        self.device_rows = torch.empty((B, T + 1), dtype=torch.long, device=device)
        self.device_buf = torch.empty((2, B, T), dtype=torch.long, device=device)

    def next_rows(self):
        self.k = (self.k + 1) % len(self.host)
        if self.copied[self.k] is not None:
            self.copied[self.k].synchronize()
        return self.host[self.k].numpy()

    def transfer(self):
        _upload(self.device_rows, self.host[self.k], non_blocking=self.use_cuda)
        if self.use_cuda:
            self.copied[self.k] = torch.cuda.Event()
            self.copied[self.k].record()
        self.device_buf[0].copy_(self.device_rows[:, :-1])  # device to device: no host memory involved
        self.device_buf[1].copy_(self.device_rows[:, 1:])
        return self.device_buf[0], self.device_buf[1]


def _upload(device_dst, host_src, non_blocking):
    """The batch's one host-to-device copy; host_src must be contiguous (pinned on CUDA) to be async."""
    device_dst.copy_(host_src, non_blocking=non_blocking)


class PrefetchedPretrainBatches:
    """
    base_train's batches, one fetched ahead: current is (inputs, targets, True) (every pretraining row has
    targets); trained_state is the loader state before it, which a checkpoint stores so that a resumed run
    starts with exactly that batch; next_state is the state after it (the log line's data position).
    """

    def __init__(self, loader, resume_state=None):
        self.loader, self.trained_state = loader, resume_state
        self._fetch()

    def _fetch(self):
        x, y, self.next_state = next(self.loader)
        self.current = (x, y, True)

    def advance(self):
        """Mark the current batch trained, fetch the next (after its forward: device buffers are reused)."""
        self.trained_state = self.next_state
        self._fetch()

    def close(self):
        self.loader.close()


# -----------------------------------------------------------------------------
# SFT: conversation packing, BOS-aligned best fit, with padding, resumable (chat_sft)

RENDER_MAX_TOKENS = 2048  # render_conversation's default truncation, which the reference's SFT used
_TRUNCATION_NOTICES = set()  # labels whose packer already announced a truncation (print once per process)


class ConversationPacker:
    """
    Packs rendered conversations into rows of seq_len + 1 tokens. Rank r fetches conversations
    r, r + W, r + 2W, ... (wrapping around the dataset, counting epochs from 1) into a buffer; each row
    takes the largest buffered conversation that still fits, again and again, and is padded with BOS
    (mask 0) when none does. A conversation is rendered truncated to min(row, RENDER_MAX_TOKENS) tokens
    (counted in `truncated`), so every one fits a row; it may then lose its <|assistant_end|>, or all of
    its supervised tokens. next_batch() returns (inputs int32, targets int64) of shape (batch_size, seq_len),
    with targets -1 wherever the target token's mask is 0. state_dict() captures everything needed to
    continue with exactly the same batches.
    """

    def __init__(self, dataset, tokenizer, batch_size, seq_len, rank=0, world_size=1, buffer_size=100,
                 device="cpu", label="train"):
        if len(dataset) == 0:
            raise ValueError(f"{label} conversations: the dataset is empty")
        self.dataset, self.tokenizer, self.label = dataset, tokenizer, label
        self.batch_size, self.capacity = batch_size, seq_len + 1
        self.world_size, self.buffer_size = world_size, buffer_size
        self.device = torch.device(device)
        self.bos = tokenizer.get_bos_token_id()
        self.cursor, self.epoch = rank % len(dataset), 1
        self.max_tokens = min(self.capacity, RENDER_MAX_TOKENS)
        self.consumed, self.it, self.truncated = rank, 0, 0
        self.buffer = []  # (dataset index, ids, mask) in fetch order

    def state_dict(self):
        return {"cursor": self.cursor, "epoch": self.epoch, "consumed": self.consumed, "it": self.it,
                "truncated": self.truncated, "buffer": [index for index, _, _ in self.buffer]}

    def load_state_dict(self, state):
        for key in ("cursor", "epoch", "consumed", "it"):
            setattr(self, key, int(state[key]))
        self.truncated = int(state.get("truncated", 0))
        self.buffer = [(index, *self._render(index)[:2]) for index in state["buffer"]]

    def _render(self, index):
        """(ids, mask, truncated): the rendering cut to max_tokens, as render_conversation cuts it."""
        # one token more than kept tells whether anything was cut
        ids, mask = self.tokenizer.render_conversation(self.dataset[index], max_tokens=self.max_tokens + 1)
        return ids[:self.max_tokens], mask[:self.max_tokens], len(ids) > self.max_tokens

    def _refill(self):
        n = len(self.dataset)
        while len(self.buffer) < self.buffer_size:
            index = self.cursor
            self.cursor += self.world_size
            self.epoch += self.cursor // n  # several epochs in one step when there are more ranks than rows
            self.cursor %= n
            ids, mask, truncated = self._render(index)
            self.buffer.append((index, ids, mask))
            if truncated:
                self.truncated += 1
                if self.label not in _TRUNCATION_NOTICES:
                    _TRUNCATION_NOTICES.add(self.label)
                    used = "trained on" if self.label == "train" else "evaluated"  # val batches train nothing
                    print0(f"Note: truncating {self.label} conversations longer than {self.max_tokens} "
                           f"tokens (e.g. #{index}) to fit a row; they are {used} as truncated")

    def _next_row(self):
        ids, mask = [], []
        while len(ids) < self.capacity:
            self._refill()
            room = self.capacity - len(ids)
            fitting = [i for i, (_, conv_ids, _) in enumerate(self.buffer) if len(conv_ids) <= room]
            best = max(fitting, key=lambda i: len(self.buffer[i][1]), default=None)  # the oldest on ties
            if best is None:  # nothing fits: pad the rest; padding is never a target
                ids += [self.bos] * room
                mask += [0] * room
                break
            _, conv_ids, conv_mask = self.buffer.pop(best)
            ids += conv_ids
            mask += conv_mask
            self.consumed += self.world_size
        return ids, mask

    def next_rows(self):
        """batch_size rows of seq_len + 1 (ids, mask) lists."""
        rows, masks = zip(*(self._next_row() for _ in range(self.batch_size)))
        self.it += 1
        return list(rows), list(masks)

    def next_batch(self):
        return rows_to_batch(*self.next_rows(), device=self.device)


def rows_to_batch(rows, masks, device="cpu"):
    """(inputs int32, targets int64): a row's first seq_len ids, and its last seq_len ids with -1 wherever
    that token's mask is 0 (a token is a target iff its own mask is 1)."""
    device = torch.device(device)
    ids = torch.tensor(rows, dtype=torch.long)
    supervised = torch.tensor(masks, dtype=torch.bool)
    inputs = ids[:, :-1].to(torch.int32)
    targets = ids[:, 1:].clone()
    targets[~supervised[:, 1:]] = -1
    if device.type == "cuda":  # fresh pinned tensors each batch, so async copies never alias
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in (inputs, targets))
    return inputs.to(device), targets.to(device)


def sft_data_generator_bos_bestfit(dataset, tokenizer, device_batch_size, max_seq_len, buffer_size=100,
                                   rank=0, world_size=1, device="cpu", label="val"):
    """Endless (inputs, targets) batches of a fresh ConversationPacker (the val loader, made per eval)."""
    packer = ConversationPacker(dataset, tokenizer, device_batch_size, max_seq_len, rank, world_size,
                                buffer_size, device, label)
    while True:
        yield packer.next_batch()


def sft_progress(consumed, dataset_size, batches, horizon_batches):
    """(progress clamped to [0, 1], done) after `batches` trained batches; horizon_batches <= 0: one pass."""
    if horizon_batches > 0:
        return min(1.0, batches / horizon_batches), batches >= horizon_batches
    return min(1.0, consumed / dataset_size), consumed >= dataset_size


class PrefetchedBatches:
    """
    The training batches, one packed ahead (packing overlaps the GPU's work on the current batch).
    trained_state is the packer state just after the last batch that was trained, i.e. before the
    prefetched one: a checkpoint stores it, so a resumed run starts with exactly that prefetched batch.
    """

    def __init__(self, packer, dataset_size, horizon_batches):
        self.packer, self.dataset_size, self.horizon_batches = packer, dataset_size, horizon_batches
        self.trained_state = packer.state_dict()
        self.current = self._produce()

    def _produce(self):
        packer = self.packer
        rows, masks = packer.next_rows()
        x, y = rows_to_batch(rows, masks, device=packer.device)
        has_targets = any(any(mask[1:]) for mask in masks)  # read on the host: no device sync per micro-step
        progress, done = sft_progress(packer.consumed, self.dataset_size, packer.it, self.horizon_batches)
        return x, y, has_targets, (progress, done, packer.epoch, packer.state_dict())

    def advance(self):
        """Mark the current batch trained, pack the next; return the trained one's (progress, done, epoch)."""
        progress, done, epoch, state = self.current[3]
        self.trained_state = state
        self.current = self._produce()
        return progress, done, epoch
