import gc
import json
import os
import random
import subprocess
import sys
import traceback
import weakref

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat import dataloader as dl

from conftest import point_base_dir_at, raised_on_the_loader_thread

BOS = 1000
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CharTokenizer:
    """A transparent tokenizer for the tests: one id per character, BOS = 1000."""

    def get_bos_token_id(self):
        return BOS

    def encode(self, texts, prepend=None, append=None, num_threads=1):
        assert prepend == BOS and append is None
        return [[BOS] + [ord(c) for c in t] for t in texts]


def write_shard(path, texts, row_group_size):
    table = pa.table({"text": texts})
    pq.write_table(table, path, row_group_size=row_group_size)


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """Two train shards (3 and 2 row groups of 8 docs) and a val shard; varied document lengths."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    data_dir = tmp_path / "base_data_climbmix"
    data_dir.mkdir()
    rng = random.Random(0)
    docs = {}

    def make_docs(tag, n):
        out = []
        for i in range(n):
            length = rng.choice([rng.randint(1, 6), rng.randint(5, 20), rng.randint(20, 60)])
            text = f"{tag}{i:03d}" + "".join(rng.choice("abcdefgh") for _ in range(length))
            out.append(text)
        return out

    docs["shard_00000.parquet"] = make_docs("A", 24)
    docs["shard_00001.parquet"] = make_docs("B", 16)
    docs["shard_06542.parquet"] = make_docs("V", 8)
    for name, texts in docs.items():
        write_shard(data_dir / name, texts, row_group_size=8)
    return docs


def loader(B=2, T=24, split="train", state=None, buffer_size=6, batch_size=4):
    return dl.tokenizing_distributed_data_loader_with_state_bos_bestfit(
        CharTokenizer(), B, T, split, tokenizer_threads=1, tokenizer_batch_size=batch_size,
        device="cpu", resume_state_dict=state, buffer_size=buffer_size)


def take(gen, n):
    out = []
    for _ in range(n):
        x, y, state = next(gen)
        out.append((x.clone(), y.clone(), json.loads(json.dumps(state))))  # state must survive JSON
    return out


def naive_pack(doc_stream, B, T, buffer_size):
    """The packing rule written the slow, obvious way: a list scanned linearly for every placement."""
    buffer, capacity = [], T + 1
    while True:
        rows = []
        for _ in range(B):
            row = []
            while len(row) < capacity:
                while len(buffer) < buffer_size:
                    buffer.extend(next(doc_stream))
                remaining = capacity - len(row)
                best = None
                for i, doc in enumerate(buffer):
                    if len(doc) <= remaining and (best is None or len(doc) > len(buffer[best])):
                        best = i
                if best is None:
                    shortest = min(range(len(buffer)), key=lambda i: (len(buffer[i]), i))
                    row.extend(buffer.pop(shortest)[:remaining])
                else:
                    row.extend(buffer.pop(best))
            rows.append(row)
        yield torch.tensor(rows)


def train_doc_stream(docs, batch_size, epochs=50):
    """Documents of the train split in reading order (one rank), tokenised, in text batches."""
    tok = CharTokenizer()
    for _ in range(epochs):
        for name in ("shard_00000.parquet", "shard_00001.parquet"):
            texts = docs[name]
            for rg in range(0, len(texts), 8):
                group = texts[rg:rg + 8]
                for a in range(0, len(group), batch_size):
                    yield tok.encode(group[a:a + batch_size], prepend=BOS)


# -----------------------------------------------------------------------------

def test_batch_shapes_and_shift(corpus):
    for x, y, state in take(loader(B=3, T=16), 5):
        assert x.shape == y.shape == (3, 16) and x.dtype == y.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert torch.all(x[:, 0] == BOS)
        assert torch.all(y >= 0)
        assert x.is_contiguous() and y.is_contiguous()


def test_staging_copies_one_contiguous_host_buffer_per_batch(monkeypatch):
    # A strided host view (rows[:, :-1]) is copied through a pageable temporary, defeating pinning and
    # non_blocking: every host-to-device copy must read one contiguous host buffer, whole.
    uploads = []
    real_upload = dl._upload

    def watch(device_dst, host_src, non_blocking):
        uploads.append((host_src.is_contiguous(), host_src.data_ptr(), tuple(host_src.shape), non_blocking))
        real_upload(device_dst, host_src, non_blocking)

    monkeypatch.setattr(dl, "_upload", watch)
    B, T = 3, 8
    staging = dl._Staging(B, T, torch.device("cpu"))
    for batch in range(3):
        rows = staging.next_rows()
        rows[:] = torch.arange(B * (T + 1)).view(B, T + 1).numpy() + 100 * batch
        x, y = staging.transfer()
        expected = torch.from_numpy(rows.copy())
        assert torch.equal(x, expected[:, :-1]) and torch.equal(y, expected[:, 1:])
        assert x.is_contiguous() and y.is_contiguous()
        assert uploads[-1] == (True, staging.host[staging.k].data_ptr(), (B, T + 1), False)
    assert len(uploads) == 3  # one copy per batch


def test_matches_naive_best_fit_packing(corpus):
    B, T, buffer_size, batch_size = 3, 24, 6, 4
    got = take(loader(B=B, T=T, buffer_size=buffer_size, batch_size=batch_size), 40)  # several epochs
    expected = naive_pack(train_doc_stream(corpus, batch_size), B, T, buffer_size)
    for x, y, _ in got:
        rows = next(expected)
        assert torch.equal(x, rows[:, :-1]) and torch.equal(y, rows[:, 1:])


def test_rows_are_whole_documents_plus_one_cropped_tail(corpus):
    all_docs = {tuple([BOS] + [ord(c) for c in t]) for texts in corpus.values() for t in texts}
    for x, y, _ in take(loader(B=4, T=30), 10):
        rows = torch.cat([x, y[:, -1:]], dim=1).tolist()
        for row in rows:
            starts = [i for i, tok in enumerate(row) if tok == BOS] + [len(row)]
            segments = [tuple(row[a:b]) for a, b in zip(starts, starts[1:])]
            for seg in segments[:-1]:
                assert seg in all_docs
            last = segments[-1]
            assert last in all_docs or any(d[:len(last)] == last for d in all_docs)


def test_exact_resume_reproduces_the_following_batches(corpus):
    straight = take(loader(), 30)  # crosses several epochs of this small corpus
    for cut in (1, 7, 19):
        resumed = take(loader(state=straight[cut - 1][2]), 30 - cut)
        for (x, y, s), (rx, ry, rs) in zip(straight[cut:], resumed):
            assert torch.equal(x, rx) and torch.equal(y, ry)
            assert s == rs


def test_pretraining_batches_keep_the_state_that_resumes_at_the_batch_in_hand(corpus):
    # base_train checkpoints trained_state: a run resumed from it must train next on the batch in hand,
    # neither repeating batches already trained nor skipping the prefetched one
    batches = dl.PrefetchedPretrainBatches(loader())
    for _ in range(3):  # before the first step (a fresh loader), then after each step
        resumed = dl.PrefetchedPretrainBatches(loader(state=batches.trained_state), batches.trained_state)
        assert all(torch.equal(a, b) for a, b in zip(resumed.current[:2], batches.current[:2]))
        resumed.close()
        batches.advance()
    batches.close()


@pytest.mark.parametrize("change", ["file removed", "fewer row groups", "shorter row groups"])
def test_an_exact_state_over_shards_that_changed_names_the_data_dir_and_the_fix(corpus, tmp_path, change):
    states = [state for _, _, state in take(loader(batch_size=8), 12)]
    # one that buffers a document of the second file's second row group, past row 6
    state = next(s for s in states if any(ref[:2] == [1, 1] and ref[2] >= 6 for ref in s["buffer"]))
    shard = tmp_path / "base_data_climbmix" / "shard_00001.parquet"  # 16 documents, 2 row groups of 8
    if change == "file removed":
        os.remove(shard)
    elif change == "fewer row groups":
        write_shard(shard, corpus["shard_00001.parquet"][:8], row_group_size=8)
    else:
        write_shard(shard, corpus["shard_00001.parquet"][:12], row_group_size=6)
    with pytest.raises(ValueError) as info:
        take(loader(batch_size=8, state=state), 1)
    last_line = "".join(traceback.format_exception(info.value)).rstrip().splitlines()[-1]
    assert f"shard(s) of this split in {shard.parent} do not have" in last_line, last_line
    assert last_line.endswith("Fix: put back the shards it was trained on, or start a new run on these")


def test_resume_chain_of_many_restarts(corpus):
    straight = take(loader(B=1, T=10), 12)
    state, got = None, []
    for _ in range(12):
        x, y, state = take(loader(B=1, T=10, state=state), 1)[0]
        got.append(x)
    assert all(torch.equal(a[0], b) for a, b in zip(straight, got))


def test_epoch_advances_after_a_full_pass(corpus):
    states = [s for _, _, s in take(loader(B=2, T=40), 40)]
    epochs = [s["epoch"] for s in states]
    assert epochs[0] == 1 and max(epochs) >= 3
    assert epochs == sorted(epochs)


def test_token_accounting(corpus):
    B, T = 2, 24
    batches = take(loader(B=B, T=T), 10)
    state = batches[-1][2]
    assert state["tokens_used"] == 10 * B * (T + 1)
    assert state["tokens_cropped"] > 0
    used_fraction = state["tokens_used"] / (state["tokens_used"] + state["tokens_cropped"])
    assert 0 < used_fraction < 1


def test_two_ranks_read_disjoint_row_groups(corpus, monkeypatch):
    seen = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        reader = dl.ShardReader(dl.list_split_files("train"))
        groups = {1: set(), 2: set()}
        for texts, refs, (pq_idx, rg_idx, epoch), _ in dl._text_batches(reader, rank, 2, [1, 0, rank, 0], 4):
            if epoch > 2:
                break
            groups[epoch].add((pq_idx, rg_idx))
            assert all(ref[:2] == (pq_idx, rg_idx) for ref in refs)
        assert groups[1] == groups[2]  # every epoch reads the rank's own lane again
        seen[rank] = groups[1]
    assert seen[0].isdisjoint(seen[1])
    assert seen[0] | seen[1] == {(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)}
    assert seen[0] == {(0, 0), (0, 2), (1, 0)}


def test_resume_state_from_another_rank_is_refused(corpus, monkeypatch):
    state = take(loader(), 2)[-1][2]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="cannot resume it exactly"):
        next(loader(state=state))


def test_approximate_resume_from_reference_state(corpus):
    # the reference's state has no cursor: skip to the next row-group block, as the reference does
    def first_batch(state):
        cursor = dl._approximate_cursor(state, 0, 1)
        return next(dl._text_batches(dl.ShardReader(dl.list_split_files("train")), 0, 1, cursor, 4))

    texts, _, position, _ = first_batch({"pq_idx": 0, "rg_idx": 1, "epoch": 1})
    assert position == (0, 2, 1) and texts[0].startswith("A016")
    assert first_batch({"pq_idx": 0, "rg_idx": 2, "epoch": 1})[2] == (1, 0, 1)  # past file 0: the next file
    x, y, state = next(loader(state={"pq_idx": 0, "rg_idx": 0, "epoch": 1}))
    assert torch.all(x[:, 0] == BOS)


def test_a_checkpoint_without_a_loader_state_or_with_the_references_passes_it_through(capsys):
    assert dl.state_for_rank({"step": 5}, 0, 1) is None  # the loader starts from the beginning
    reference = {"pq_idx": 3, "rg_idx": 8, "epoch": 2}
    assert dl.state_for_rank({"dataloader_state_dict": reference}, 0, 1) == reference
    assert capsys.readouterr().out == ""  # the reference's resume is approximate by design: nothing to warn


def test_a_conversation_packer_of_an_empty_dataset_names_its_loader():
    with pytest.raises(ValueError, match="val conversations: the dataset is empty"):
        dl.ConversationPacker([], None, batch_size=2, seq_len=32, label="val")


def test_yielded_tensors_are_reused(corpus):
    gen = loader()
    x1, _, _ = next(gen)
    kept = x1.clone()
    x2, _, _ = next(gen)
    assert x1.data_ptr() == x2.data_ptr()
    assert not torch.equal(kept, x2)


@raised_on_the_loader_thread
def test_rank_without_row_groups_raises(corpus, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(RuntimeError, match="owns no row group"):
        next(loader(split="val"))


@raised_on_the_loader_thread
def test_a_split_of_shards_without_rows_names_them_and_the_fix(corpus, tmp_path):
    data_dir = tmp_path / "base_data_climbmix"
    for name in ("shard_00000.parquet", "shard_00001.parquet"):
        write_shard(data_dir / name, pa.array([], type=pa.string()), row_group_size=8)  # readable, no rows
    with pytest.raises(RuntimeError) as info:
        next(loader())
    last_line = "".join(traceback.format_exception(info.value)).rstrip().splitlines()[-1]
    empty = f"{data_dir / 'shard_00000.parquet'}, {data_dir / 'shard_00001.parquet'}"
    assert f"No text to read: {empty} have no rows. Fix: run `python -m nanochat.dataset" in last_line
    assert next(loader(split="val"))[0].shape == (2, 24)  # the val split's rows still load


@raised_on_the_loader_thread
def test_corrupt_shard_error_names_the_file(corpus, tmp_path):
    path = tmp_path / "base_data_climbmix" / "shard_00001.parquet"
    path.write_bytes(path.read_bytes()[:100])
    gen = loader(B=4, T=60)
    with pytest.raises(RuntimeError, match="shard_00001.parquet"):
        take(gen, 20)


def test_without_state_wrapper(corpus):
    x, y = next(dl.tokenizing_distributed_data_loader_bos_bestfit(
        CharTokenizer(), 2, 16, "val", tokenizer_threads=1, tokenizer_batch_size=4, device="cpu", buffer_size=4))
    assert x.shape == (2, 16) and torch.all(x[:, 0] == BOS)


def test_real_tokenizer_on_the_offline_sample(tmp_path, monkeypatch, sample_tokenizer):
    from nanochat.dataset import install_sample
    point_base_dir_at(monkeypatch, tmp_path)
    install_sample()
    tok = sample_tokenizer
    make = lambda state=None: dl.tokenizing_distributed_data_loader_with_state_bos_bestfit(
        tok, 4, 128, "train", tokenizer_threads=2, device="cpu", resume_state_dict=state, buffer_size=200)
    straight = take(make(), 6)
    bos = tok.get_bos_token_id()
    for x, y, _ in straight:
        assert torch.all(x[:, 0] == bos) and int(x.max()) < 512
    resumed = take(make(straight[2][2]), 3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(straight[3:], resumed))


def test_a_tokenizer_thread_left_open_is_joined_before_interpreter_teardown():
    # a thread still inside native code when the runtime is torn down aborts the process; the prefetcher
    # closes itself from an atexit hook. An earlier-registered hook runs later (LIFO), so it sees the result.
    code = (
        "import atexit, itertools, threading\n"
        "def report():\n"
        "    alive = [t for t in threading.enumerate() if t.name == 'dataloader-tokenizer']\n"
        "    print('alive at teardown:', len(alive))\n"
        "atexit.register(report)\n"
        "from nanochat.dataloader import _Prefetcher\n"
        "stream = (([str(i)], None, i, i) for i in itertools.count())\n"
        "prefetcher = _Prefetcher(stream, lambda texts: texts)\n"
        "prefetcher.get()\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "alive at teardown: 0"


def test_a_closed_prefetcher_is_not_kept_alive_by_its_exit_hook():
    # loaders are made per eval and per epoch: once closed, nothing (the atexit hook included) may hold on
    prefetcher = dl._Prefetcher(iter([]), lambda texts: texts)
    prefetcher.close()
    ref = weakref.ref(prefetcher)
    del prefetcher
    gc.collect()
    assert ref() is None


def test_training_from_the_legacy_dataset_prints_the_upgrade_banner_once(corpus, tmp_path, capsys):
    (tmp_path / "base_data_climbmix").rename(tmp_path / "base_data")  # a pre-ClimbMix base dir
    for split, banners in (("train", 1), ("val", 0)):
        gen = loader(split=split)
        next(gen)
        gen.close()
        assert capsys.readouterr().out.count("WARNING: DATASET UPGRADE REQUIRED") == banners, split
