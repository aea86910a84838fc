"""
nanochat.dataset: shard listing, the train/val split, row-group iteration, the offline sample and the
downloader. Everything runs in a temporary NANOCHAT_BASE_DIR; downloads go to a real HTTP server on
127.0.0.1 (a small handler below) so requests, Range resume and broken connections are exercised for real.
"""
import contextlib
import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import common, dataset

from conftest import exits_with_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -----------------------------------------------------------------------------
# helpers and fixtures

def write_shard(path, docs, rg_size, metadata=None, column="text"):
    """A shard written with the real data's writer settings."""
    table = pa.table({column: pa.array(docs, type=pa.string())})
    if metadata:
        table = table.replace_schema_metadata(metadata)
    pq.write_table(table, path, row_group_size=rg_size, use_dictionary=False,
                   compression="zstd", compression_level=3, write_statistics=False)
    return path


def labelled_docs(file_id, n_rg, rg_size):
    return [f"file{file_id} rg{rg} doc{j} " + "lorem ipsum " * (j + 1) for rg in range(n_rg) for j in range(rg_size)]


def shard_bytes(tmp_path, name="src.parquet", docs=None, **kw):
    path = write_shard(str(tmp_path / name), docs or labelled_docs(0, 3, 4), 4, **kw)
    with open(path, "rb") as f:
        return f.read()


def visible_files(folder):
    """The names in folder, without the hidden lock files and the hub's .cache/ folder."""
    return sorted(name for name in os.listdir(folder) if not name.startswith("."))


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def base(tmp_path, monkeypatch):
    """A NANOCHAT_BASE_DIR that does not exist yet."""
    base_dir = tmp_path / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    return base_dir


@pytest.fixture
def data_dir(base):
    d = base / "base_data_climbmix"
    d.mkdir(parents=True)
    return d


class ShardHandler(BaseHTTPRequestHandler):
    # HTTP/1.0: the server closes the connection after each response, so a short body is a broken transfer
    def log_message(self, *args):
        pass

    def file(self):  # like many static servers, an empty path segment (`//`) finds nothing
        return None if "//" in self.path else self.server.files.get(self.path.rsplit("/", 1)[-1])

    def do_HEAD(self):  # what huggingface_hub asks first: the commit, the ETag (sha256) and the size
        data = self.file()
        if data is None:
            self.send_error(404)
            return
        self.server.auth.append(self.headers.get("Authorization"))
        self.send_response(200)
        self.send_header("X-Repo-Commit", "c0ffee" * 6 + "abcd")
        etag = self.server.etags.get(self.path.rsplit("/", 1)[-1], hashlib.sha256(data).hexdigest())
        self.send_header("ETag", f'"{etag}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()

    def do_GET(self):
        srv = self.server
        rng = self.headers.get("Range")
        srv.log.append((self.path.rsplit("/", 1)[-1], rng))
        if srv.fail_first > 0:
            srv.fail_first -= 1
            self.send_error(500)
            return
        data = self.file()
        if data is None:
            self.send_error(404)
            return
        start = 0
        if rng and srv.support_range:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.truncate_first > 0:
            srv.truncate_first -= 1
            body = body[: len(body) // 2]
        if srv.trickle:  # 2 MiB at once, then 64 KiB every half second: a transfer that takes a minute
            with contextlib.suppress(ConnectionError):  # the client stopped mid-transfer (Ctrl-C)
                for i in range(0, len(body), 1 << 16):
                    self.wfile.write(body[i:i + (1 << 16)])
                    time.sleep(0.5 if i >= 2 << 20 else 0)
        else:
            self.wfile.write(body)


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    srv = ThreadingHTTPServer(("127.0.0.1", 0), ShardHandler)
    srv.files, srv.log, srv.etags, srv.auth = {}, [], {}, []
    srv.fail_first, srv.truncate_first, srv.support_range, srv.trickle = 0, 0, True, False
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/resolve/main"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def sleeps(monkeypatch):
    calls = []
    monkeypatch.setattr(common.time, "sleep", calls.append)
    return calls


# -----------------------------------------------------------------------------
# identity, import, DATA_DIR

def test_identity():
    assert dataset.MAX_SHARD == 6542
    assert dataset.index_to_filename(0) == "shard_00000.parquet"
    assert dataset.index_to_filename(dataset.MAX_SHARD) == "shard_06542.parquet" == dataset.VAL_FILENAME
    assert dataset.HF_REPO == "karpathy/climbmix-400b-shuffle"  # the reference's BASE_URL is this repo


def test_import_and_data_dir_access_create_nothing(tmp_path, monkeypatch):
    base_dir = tmp_path / "never"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    # execute the module file afresh (nanochat.dataset itself is already imported by this test file)
    spec = importlib.util.spec_from_file_location("nanochat_dataset_fresh", dataset.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    assert fresh.DATA_DIR == os.path.join(str(base_dir), "base_data_climbmix") == fresh.get_data_dir()
    from nanochat.dataset import DATA_DIR
    assert DATA_DIR == fresh.DATA_DIR
    assert not base_dir.exists()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "other"))  # computed on access, not frozen at import
    assert dataset.DATA_DIR == os.path.join(str(tmp_path / "other"), "base_data_climbmix")
    with pytest.raises(AttributeError):
        dataset.NOT_A_NAME


@pytest.mark.parametrize("env_value", ["set", ""])
def test_data_dir_agrees_with_common_base_dir(tmp_path, monkeypatch, env_value):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "b") if env_value else "")
    assert dataset.get_data_dir() == os.path.join(common.get_base_dir(), "base_data_climbmix")


# -----------------------------------------------------------------------------
# listing and the split rule

def test_list_parquet_files_sorted_and_filtered(data_dir):
    for name in ["shard_00002.parquet", "shard_00000.parquet", "shard_00001.parquet",
                 "shard_00003.parquet.tmp", "notes.txt", ".shard_00004.parquet"]:
        (data_dir / name).write_bytes(b"")
    expected = [str(data_dir / f"shard_0000{i}.parquet") for i in range(3)]
    assert dataset.list_parquet_files() == expected
    assert dataset.list_parquet_files(data_dir=str(data_dir)) == expected


def test_legacy_fallback_only_for_the_default_dir(base, capsys):
    legacy = base / "base_data"
    legacy.mkdir(parents=True)
    (legacy / "shard_00001.parquet").write_bytes(b"")
    (legacy / "shard_00000.parquet").write_bytes(b"")
    expected = [str(legacy / "shard_00000.parquet"), str(legacy / "shard_00001.parquet")]
    assert dataset.list_parquet_files() == expected
    assert "DATASET UPGRADE REQUIRED" not in capsys.readouterr().out
    assert dataset.list_parquet_files(warn_on_legacy=True) == expected
    out = capsys.readouterr().out
    assert "WARNING: DATASET UPGRADE REQUIRED" in out and "=" * 80 in out
    assert "python -m nanochat.dataset -n 170" in out and "python -m scripts.tok_train" in out
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dataset.list_parquet_files(data_dir=str(base / "explicit"))  # no silent substitution


def test_missing_data_dir_errors_with_instructions(base):
    for call in (dataset.list_parquet_files, lambda: dataset.list_split_files("train"),
                 lambda: dataset.parquets_iter_batched("train")):
        with pytest.raises(FileNotFoundError) as err:
            call()
        assert "python -m nanochat.dataset -n 8" in str(err.value) and "--sample" in str(err.value)
    assert not base.exists()


def test_empty_or_val_only_dir_errors(data_dir):
    assert dataset.list_parquet_files() == []
    for split in ("train", "val"):
        with pytest.raises(FileNotFoundError, match="python -m nanochat.dataset -n 8"):
            dataset.parquets_iter_batched(split)  # raises at the call, before any next()
    write_shard(str(data_dir / dataset.VAL_FILENAME), labelled_docs(9, 1, 4), 4)
    with pytest.raises(FileNotFoundError, match=r"No train shard.*shard_06542\.parquet"):
        dataset.list_split_files("train")
    assert len(list(dataset.parquets_iter_batched("val"))) == 1


def test_val_split_is_pinned_by_name(data_dir):
    names = ["shard_00000.parquet", "shard_00001.parquet", "shard_06542.parquet", "shard_07000.parquet"]
    for name in names:
        (data_dir / name).write_bytes(b"")
    paths = [str(data_dir / n) for n in names]
    assert dataset.list_split_files("val") == [paths[2]]  # not the last file in sorted order
    assert dataset.list_split_files("train") == [paths[0], paths[1], paths[3]]
    with pytest.raises(AssertionError):
        dataset.list_split_files("test")
    with pytest.raises(AssertionError):
        dataset.parquets_iter_batched("test")


def test_missing_val_shard_falls_back_to_last_file_with_warning(data_dir, caplog):
    for i in range(3):
        (data_dir / dataset.index_to_filename(i)).write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="nanochat.dataset"):
        train, val = dataset.list_split_files("train"), dataset.list_split_files("val")
    assert train == [str(data_dir / "shard_00000.parquet"), str(data_dir / "shard_00001.parquet")]
    assert val == [str(data_dir / "shard_00002.parquet")]
    assert "shard_06542.parquet not found" in caplog.text and "shard_00002.parquet" in caplog.text


# -----------------------------------------------------------------------------
# row-group iteration

@pytest.mark.parametrize("start,step", [(0, 1), (0, 2), (1, 2), (2, 3), (4, 1)])
def test_parquets_iter_batched_covers_expected_row_groups(data_dir, start, step):
    rg_counts, rg_size = [5, 3], 4
    for f, n in enumerate(rg_counts):
        write_shard(str(data_dir / dataset.index_to_filename(f)), labelled_docs(f, n, rg_size), rg_size)
    write_shard(str(data_dir / dataset.VAL_FILENAME), labelled_docs(9, 2, rg_size), rg_size)

    expected = [labelled_docs(f, n, rg_size)[rg * rg_size:(rg + 1) * rg_size]
                for f, n in enumerate(rg_counts) for rg in range(start, n, step)]
    assert list(dataset.parquets_iter_batched("train", start, step)) == expected
    val = list(dataset.parquets_iter_batched("val", start, step))
    assert val == [labelled_docs(9, 2, rg_size)[rg * rg_size:(rg + 1) * rg_size] for rg in range(start, 2, step)]


def test_two_ranks_read_disjoint_row_groups_covering_everything(data_dir):
    for f, n in enumerate([5, 3]):
        write_shard(str(data_dir / dataset.index_to_filename(f)), labelled_docs(f, n, 4), 4)
    write_shard(str(data_dir / dataset.VAL_FILENAME), labelled_docs(9, 1, 4), 4)
    # every row group's texts are distinct (labelled_docs), so they identify the row group
    seen = [[tuple(texts) for texts in dataset.parquets_iter_batched("train", rank, 2)] for rank in range(2)]
    assert not set(seen[0]) & set(seen[1])
    everything = labelled_docs(0, 5, 4) + labelled_docs(1, 3, 4)
    assert sorted(seen[0] + seen[1]) == sorted(tuple(everything[i:i + 4]) for i in range(0, len(everything), 4))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc (Linux)")
def test_a_pass_over_many_shards_keeps_one_file_open(data_dir):
    # the loader reads file after file for a whole run: holding every footer open would hit the fd limit
    path = write_shard(str(data_dir / "shard_00000.parquet"), labelled_docs(0, 2, 4), 4)
    reader = dataset.ShardReader([path] * 50)
    reader.texts(0, 0)
    open_files = len(os.listdir("/proc/self/fd"))
    for pq_idx in range(50):
        assert reader.texts(pq_idx, 1) == labelled_docs(0, 2, 4)[4:8]
    assert len(os.listdir("/proc/self/fd")) <= open_files


def test_read_row_group_and_num_row_groups(data_dir):
    path = write_shard(str(data_dir / "shard_00000.parquet"), labelled_docs(0, 3, 4), 4)
    assert dataset.num_row_groups(path) == 3
    assert dataset.read_row_group(path, 2) == labelled_docs(0, 3, 4)[8:12]
    with pytest.raises(IndexError):
        dataset.read_row_group(path, 3)


def test_corrupt_shard_gives_an_error_naming_the_file(data_dir):
    good = write_shard(str(data_dir / "shard_00000.parquet"), labelled_docs(0, 2, 4), 4)
    write_shard(str(data_dir / dataset.VAL_FILENAME), labelled_docs(9, 1, 4), 4)
    data = read_bytes(good)
    with open(good, "wb") as f:
        f.write(data[: len(data) // 2])  # truncated: no footer
    for call in (lambda: dataset.parquets_iter_batched("train"), lambda: dataset.read_row_group(good, 0)):
        with pytest.raises(dataset.CorruptShardError, match="shard_00000.parquet") as err:
            call()
        assert isinstance(err.value, RuntimeError) and "not a readable parquet" in str(err.value)
    wrong = write_shard(str(data_dir / "shard_00001.parquet"), ["a", "b"], 2, column="content")
    with pytest.raises(dataset.CorruptShardError, match="no string column 'text'"):
        dataset.inspect_shard(wrong)


def damage_row_group(path, rg_idx):
    """Overwrite a row group's data pages, leaving the footer readable."""
    column = dataset.inspect_shard(path).row_group(rg_idx).column(0)
    data = bytearray(read_bytes(path))
    start = column.data_page_offset
    data[start:start + column.total_compressed_size] = b"\xff" * column.total_compressed_size
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_a_damaged_row_group_behind_a_good_footer_names_the_file_and_the_fix(data_dir):
    path = damage_row_group(write_shard(str(data_dir / "shard_00000.parquet"), labelled_docs(0, 2, 4), 4), 0)
    reader = dataset.ShardReader([path])
    with pytest.raises(dataset.CorruptShardError, match=r"Cannot read row group 0 of .*shard_00000\.parquet "
                                                        r".*Fix: run `python -m nanochat\.dataset"):
        reader.texts(0, 0)
    assert reader.texts(0, 1) == labelled_docs(0, 2, 4)[4:]  # the other row group still reads


# -----------------------------------------------------------------------------
# the committed offline sample

def sample_files():
    return sorted(os.path.join(dataset.SAMPLE_DIR, n) for n in os.listdir(dataset.SAMPLE_DIR) if n.endswith(".parquet"))


def test_committed_sample_matches_format_and_readme():
    files = sample_files()
    assert [os.path.basename(f) for f in files] == ["shard_00000.parquet", dataset.VAL_FILENAME]
    with open(os.path.join(dataset.SAMPLE_DIR, "README.md")) as f:
        readme = f.read()
    assert "Licence" in readme and "Public domain" in readme and "a0b16d35a9851168ce9ac649851c17b7ab08d48e" in readme
    assert sum(os.path.getsize(f) for f in files) < 5_000_000
    for path in files:
        meta = dataset.inspect_shard(path)
        assert dataset.is_sample_file(path)
        assert meta.num_row_groups >= 2  # two simulated DDP ranks get a row group each
        assert len({meta.row_group(i).num_rows for i in range(meta.num_row_groups)}) == 1
        for i in range(meta.num_row_groups):
            col = meta.row_group(i).column(0)
            assert col.compression == "ZSTD" and not col.is_stats_set and not col.has_dictionary_page
        texts = pq.read_table(path).column("text").to_pylist()
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        # the README's table repeats these numbers, so check them (style principle 11)
        for figure in (f"{len(texts):,}", f"{sum(map(len, texts)):,}", f"{os.path.getsize(path):,}", digest):
            assert figure in readme, f"README.md does not state {figure} for {os.path.basename(path)}"


def test_sample_installs_and_iterates(base, capsys):
    assert dataset.main(["--sample"]) == 0
    out = capsys.readouterr().out
    assert "Installed sample shard_00000.parquet" in out and "Installed sample shard_06542.parquet" in out
    src_train, src_val = sample_files()
    train_docs = pq.read_table(src_train).column("text").to_pylist()
    val_docs = pq.read_table(src_val).column("text").to_pylist()
    batches = list(dataset.parquets_iter_batched("train"))
    assert len(batches) == dataset.num_row_groups(src_train) and sum(batches, []) == train_docs
    assert sum(dataset.parquets_iter_batched("val"), []) == val_docs
    for rank in range(2):  # one row group per simulated rank in each split
        assert len(list(dataset.parquets_iter_batched("train", rank, 2))) == 1
        assert len(list(dataset.parquets_iter_batched("val", rank, 2))) == 1
    assert dataset.main(["--sample"]) == 0  # re-installing over the sample is fine
    assert sorted(os.listdir(dataset.get_data_dir())) == ["shard_00000.parquet", "shard_06542.parquet"]


@pytest.mark.parametrize("real_name", ["shard_00000.parquet", "shard_00005.parquet"])
def test_sample_refuses_to_touch_a_dir_with_real_shards(data_dir, capsys, real_name):
    real = write_shard(str(data_dir / real_name), labelled_docs(0, 1, 4), 4)
    before = read_bytes(real)
    with exits_with_error(capsys, rf"^dataset: error: Refusing to install the sample into .*: it already "
                                  rf"holds 1 non-sample shard\(s\) \({real_name}, \.\.\.\)\. Use another "
                                  rf"NANOCHAT_BASE_DIR, or delete those files first\.$"):
        dataset.main(["--sample"])
    assert read_bytes(real) == before
    assert os.listdir(data_dir) == [real_name]  # nothing copied, not even the val shard


def test_sample_install_refuses_a_missing_or_untagged_sample_and_an_unreadable_shard(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="No sample shards in .*ship with the git checkout"):
        dataset.install_sample(str(data_dir), sample_dir=str(tmp_path / "no_sample"))
    untagged = tmp_path / "untagged"
    untagged.mkdir()
    write_shard(str(untagged / "shard_00000.parquet"), labelled_docs(0, 1, 4), 4)
    with pytest.raises(RuntimeError, match="shard_00000.parquet is not tagged as a sample shard"):
        dataset.install_sample(str(data_dir), sample_dir=str(untagged))
    (data_dir / "shard_00003.parquet").write_bytes(b"unknown content")  # left for the user to inspect
    with pytest.raises(RuntimeError, match=r"Refusing to install the sample .*\(shard_00003\.parquet"):
        dataset.install_sample(str(data_dir))
    assert os.listdir(data_dir) == ["shard_00003.parquet"]


def test_cli_sample_as_a_module(tmp_path):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path / "b"))
    proc = subprocess.run([sys.executable, "-m", "nanochat.dataset", "--sample"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Done! Installed the offline sample" in proc.stdout
    installed = tmp_path / "b" / "base_data_climbmix"
    assert sorted(os.listdir(installed)) == ["shard_00000.parquet", "shard_06542.parquet"]
    assert all(read_bytes(installed / os.path.basename(f)) == read_bytes(f) for f in sample_files())
    write_shard(str(installed / "shard_00007.parquet"), labelled_docs(0, 1, 4), 4)  # real data: refused
    proc = subprocess.run([sys.executable, "-m", "nanochat.dataset", "--sample"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.splitlines()[-1].startswith(
        "dataset: error: Refusing to install the sample into "), proc.stderr


# -----------------------------------------------------------------------------
# downloading

def test_download_success(base, server, sleeps, tmp_path, capsys):
    server.files["shard_00003.parquet"] = payload = shard_bytes(tmp_path)
    assert dataset.download_single_file(3, base_url=server.url) is True
    target = os.path.join(dataset.get_data_dir(), "shard_00003.parquet")
    assert read_bytes(target) == payload and not os.path.exists(target + ".part")
    assert server.log == [("shard_00003.parquet", None)] and sleeps == []
    assert f"Downloading {server.url}/shard_00003.parquet" in capsys.readouterr().out


def test_download_skips_an_existing_real_shard(data_dir, server, tmp_path, capsys):
    real = write_shard(str(data_dir / "shard_00000.parquet"), ["kept"], 1)
    before = read_bytes(real)
    server.files["shard_00000.parquet"] = shard_bytes(tmp_path)
    assert dataset.download_single_file(0, base_url=server.url) is True
    assert read_bytes(real) == before and server.log == []
    assert "Replacing" not in capsys.readouterr().out


def test_the_hub_is_not_asked_for_a_real_shard_already_there(data_dir, monkeypatch, capsys):
    import huggingface_hub
    real = write_shard(str(data_dir / "shard_00000.parquet"), ["kept"], 1)
    before = read_bytes(real)

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked for a shard that is already there")
    for name in ("hf_hub_download", "get_hf_file_metadata"):
        monkeypatch.setattr(huggingface_hub, name, no_hub)
    assert dataset.download_single_file(0) is True
    assert read_bytes(real) == before and "Failed" not in capsys.readouterr().out


def test_download_replaces_a_sample_file(base, server, tmp_path, capsys):
    dataset.install_sample()
    target = os.path.join(dataset.get_data_dir(), "shard_00000.parquet")
    assert dataset.is_sample_file(target)
    server.files["shard_00000.parquet"] = payload = shard_bytes(tmp_path)
    assert dataset.download_single_file(0, base_url=server.url) is True
    assert read_bytes(target) == payload and not dataset.is_sample_file(target)
    out = capsys.readouterr().out
    assert f"Replacing {target}: ValueError: {target} is a shard of the offline sample" in out


def test_download_resumes_a_partial_tmp_with_range(base, server, sleeps, tmp_path):
    server.files["shard_00001.parquet"] = payload = shard_bytes(tmp_path)
    target = os.path.join(dataset.get_data_dir(), "shard_00001.parquet")
    os.makedirs(os.path.dirname(target))
    cut = len(payload) * 2 // 5
    with open(target + ".part", "wb") as f:
        f.write(payload[:cut])
    assert dataset.download_single_file(1, base_url=server.url)
    assert server.log == [("shard_00001.parquet", f"bytes={cut}-")]
    assert read_bytes(target) == payload and not os.path.exists(target + ".part")


def test_download_restarts_when_the_server_ignores_range(base, server, sleeps, tmp_path):
    server.support_range = False
    server.files["shard_00001.parquet"] = payload = shard_bytes(tmp_path)
    target = os.path.join(dataset.get_data_dir(), "shard_00001.parquet")
    os.makedirs(os.path.dirname(target))
    with open(target + ".part", "wb") as f:
        f.write(payload[:100])
    assert dataset.download_single_file(1, base_url=server.url)
    assert server.log == [("shard_00001.parquet", "bytes=100-")]  # asked, got a 200 with the whole file
    assert read_bytes(target) == payload


def test_broken_transfer_is_resumed_on_the_next_attempt(base, server, sleeps, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "CHUNK_SIZE", 64)  # so the bytes before the break reach the disk
    server.truncate_first = 1
    server.files["shard_00002.parquet"] = payload = shard_bytes(tmp_path)
    assert dataset.download_single_file(2, base_url=server.url)
    assert sleeps == [2]
    (first, r1), (second, r2) = server.log
    assert r1 is None and r2 is not None and r2.startswith("bytes=")
    offset = int(r2.removeprefix("bytes=").rstrip("-"))
    assert 0 < offset <= len(payload) // 2
    assert read_bytes(os.path.join(dataset.get_data_dir(), "shard_00002.parquet")) == payload


def test_a_complete_tmp_answered_416_is_checked_and_kept(base, server, sleeps, tmp_path):
    server.files["shard_00002.parquet"] = payload = shard_bytes(tmp_path)
    target = os.path.join(dataset.get_data_dir(), "shard_00002.parquet")
    os.makedirs(os.path.dirname(target))
    with open(target + ".part", "wb") as f:
        f.write(payload)
    assert dataset.download_single_file(2, base_url=server.url)
    assert read_bytes(target) == payload and sleeps == []


def test_retry_with_backoff_then_success(base, server, sleeps, tmp_path):
    server.fail_first = 2
    server.files["shard_00000.parquet"] = payload = shard_bytes(tmp_path)
    assert dataset.download_single_file(0, base_url=server.url)
    assert sleeps == [2, 4] and len(server.log) == 3
    assert read_bytes(os.path.join(dataset.get_data_dir(), "shard_00000.parquet")) == payload


def test_five_attempts_then_failure(base, server, sleeps, capsys):
    server.fail_first = 100
    assert dataset.download_single_file(0, base_url=server.url) is False
    assert sleeps == [2, 4, 8, 16] and len(server.log) == 5
    out = capsys.readouterr().out
    assert f"Attempt 4/5 failed for {server.url}/shard_00000.parquet" in out and "retrying in 16s" in out
    assert (f"Failed to download shard_00000.parquet: Failed to download {server.url}/shard_00000.parquet: "
            f"network error after 5 attempts (HTTPError: HTTP Error 500: Internal Server Error). Fix: check "
            f"the connection and run again") in out
    assert visible_files(dataset.get_data_dir()) == []  # no target, no partial file


@pytest.mark.parametrize("kind", ["garbage", "damaged_page", "no_text_column"])
def test_corrupt_download_is_rejected_and_removed(base, server, sleeps, tmp_path, capsys, kind):
    if kind == "garbage":
        good = shard_bytes(tmp_path)
        server.files["shard_00004.parquet"] = good[:-200] + bytes(200)  # footer destroyed, length unchanged
    elif kind == "damaged_page":  # e.g. a resume spliced onto a file that changed on the server
        server.files["shard_00004.parquet"] = read_bytes(damage_row_group(write_shard(
            str(tmp_path / "src.parquet"), labelled_docs(0, 3, 4), 4), 2))
    else:
        server.files["shard_00004.parquet"] = shard_bytes(tmp_path, docs=["x", "y"], column="body")
    assert dataset.download_single_file(4, base_url=server.url) is False
    assert server.log == [("shard_00004.parquet", None)] and sleeps == []  # bad bytes are not retried
    assert visible_files(dataset.get_data_dir()) == []  # and not kept for resuming
    target = os.path.join(dataset.get_data_dir(), "shard_00004.parquet")
    assert (f"{target} downloaded from {server.url}/shard_00004.parquet is not valid (CorruptShardError: "
            in capsys.readouterr().out)


def test_an_unreadable_existing_target_is_replaced(data_dir, server, sleeps, tmp_path):
    (data_dir / "shard_00000.parquet").write_bytes(b"not parquet")
    server.files["shard_00000.parquet"] = payload = shard_bytes(tmp_path)
    assert dataset.download_single_file(0, base_url=server.url)
    assert read_bytes(data_dir / "shard_00000.parquet") == payload


def test_an_existing_shard_with_a_damaged_row_group_is_replaced_as_the_read_error_promises(data_dir, server,
                                                                                           sleeps, tmp_path):
    damage_row_group(write_shard(str(data_dir / "shard_00000.parquet"), labelled_docs(0, 3, 4), 4), 1)
    with pytest.raises(dataset.CorruptShardError, match="replaces unreadable shards"):
        dataset.read_row_group(str(data_dir / "shard_00000.parquet"), 1)
    server.files["shard_00000.parquet"] = payload = shard_bytes(tmp_path)
    assert dataset.download_single_file(0, base_url=server.url)
    assert read_bytes(data_dir / "shard_00000.parquet") == payload


def test_an_existing_shard_without_rows_is_replaced(data_dir, server, sleeps, tmp_path):
    write_shard(str(data_dir / "shard_00000.parquet"), [], 1)  # readable, but nothing to train on
    server.files["shard_00000.parquet"] = payload = shard_bytes(tmp_path)
    assert dataset.download_single_file(0, base_url=server.url)
    assert read_bytes(data_dir / "shard_00000.parquet") == payload


def test_the_downloader_checks_the_sha256_and_names_the_file_and_the_fix(base, server, sleeps, tmp_path):
    server.files["bundle.zip"] = payload = b"the eval bundle bytes" * 100
    target = str(tmp_path / "cache" / "bundle.zip")
    with pytest.raises(common.DownloadError) as info:
        common.download(f"{server.url}/bundle.zip", target, sha256="0" * 64)
    message = str(info.value)
    assert message.startswith(f"{target} downloaded from {server.url}/bundle.zip is not valid (ValueError: "
                              f"its sha256 is {hashlib.sha256(payload).hexdigest()}, expected {'0' * 64})")
    assert "Fix: run again to download it afresh" in message
    assert visible_files(tmp_path / "cache") == [] and len(server.log) == 1 and sleeps == []
    sha256 = hashlib.sha256(payload).hexdigest()
    assert read_bytes(common.download(f"{server.url}/bundle.zip", target, sha256=sha256)) == payload


def test_the_downloader_does_not_retry_a_404(base, server, sleeps, tmp_path):
    with pytest.raises(common.DownloadError, match=r"not a network error: not retried \(HTTPError: HTTP "
                                                        r"Error 404.*Fix the cause"):
        common.download(f"{server.url}/missing.zip", str(tmp_path / "missing.zip"))
    assert server.log == [("missing.zip", None)] and sleeps == []
    assert visible_files(tmp_path) == []


def run_dataset_cli(server, base, *args, **env):
    """`python -m nanochat.dataset` with the Hugging Face hub at the local server (HF_ENDPOINT)."""
    env = dict({k: v for k, v in os.environ.items() if not k.startswith("HF_")}, NANOCHAT_BASE_DIR=str(base),
               HF_HOME=str(base / "hf_home"), NO_PROXY="127.0.0.1", HF_HUB_DISABLE_XET="1",
               HF_ENDPOINT=server.url.removesuffix("/resolve/main"), **env)
    return subprocess.run([sys.executable, "-m", "nanochat.dataset", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_shards_come_from_the_hub_at_hf_endpoint_with_hf_token_and_its_sha256(base, server, tmp_path):
    server.files["shard_00000.parquet"] = payload = shard_bytes(tmp_path)
    server.files["shard_06542.parquet"] = shard_bytes(tmp_path, name="v.parquet", docs=["val doc"])
    server.etags["shard_06542.parquet"] = "e" * 64  # the hub says one thing, the bytes another
    proc = run_dataset_cli(server, base, "-n", "1", "-w", "1", HF_TOKEN="hf_secret_token")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    data_dir = os.path.join(str(base), "base_data_climbmix")
    assert visible_files(data_dir) == ["shard_00000.parquet"]
    assert read_bytes(os.path.join(data_dir, "shard_00000.parquet")) == payload
    val = os.path.join(data_dir, "shard_06542.parquet")
    hub = server.url.removesuffix("/resolve/main")
    assert f"{val} downloaded from {hub} (karpathy/climbmix-400b-shuffle) is not valid (ValueError: its " \
           f"sha256 is " in proc.stdout and "Fix: run again" in proc.stdout
    shards = {name for name, _ in server.log if name.endswith(".parquet")}  # the hub also asks for more
    assert shards == {"shard_00000.parquet", "shard_06542.parquet"}
    assert server.auth and set(server.auth) == {"Bearer hf_secret_token"}


def test_hf_hub_offline_downloads_nothing_and_says_so(base, server, tmp_path):
    server.files["shard_06542.parquet"] = shard_bytes(tmp_path)
    proc = run_dataset_cli(server, base, "-n", "0", HF_HUB_OFFLINE="1")
    assert proc.returncode == 1 and server.auth == []
    assert not [name for name, _ in server.log if name.endswith(".parquet")]
    assert "Failed to download shard_06542.parquet" in proc.stdout
    assert "LocalEntryNotFoundError" in proc.stdout


def test_nanochat_offline_keeps_the_hub_off_the_network_and_keeps_a_good_shard(base, server, tmp_path,
                                                                             monkeypatch, capsys):
    server.files["shard_06542.parquet"] = shard_bytes(tmp_path)
    proc = run_dataset_cli(server, base, "-n", "0", NANOCHAT_OFFLINE="1")
    assert proc.returncode == 1 and server.log == [] and "Attempt 1/" not in proc.stdout
    data_dir = base / "base_data_climbmix"
    assert (f"Failed to download shard_06542.parquet: {data_dir / 'shard_06542.parquet'} is missing, and "
            f"downloads are off because NANOCHAT_OFFLINE is set") in proc.stdout
    assert proc.stdout.splitlines()[-1] == (f"Failed: shard_06542.parquet. NANOCHAT_OFFLINE is set: unset it "
                                            f"to download them, or put them in {data_dir}.")
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "shard_06542.parquet").write_bytes(server.files["shard_06542.parquet"])
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")
    assert dataset.main(["-n", "0"]) == 0 and "Downloaded: 1/1" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# CLI

def test_shard_ids():
    assert dataset.shard_ids(3) == [0, 1, 2, 6542]
    assert dataset.shard_ids(0) == [6542]
    all_ids = dataset.shard_ids(-1)
    assert all_ids == list(range(6542)) + [6542] and len(all_ids) == 6543
    assert dataset.shard_ids(10**6) == all_ids


def test_cli_downloads_the_id_list_and_fails_nonzero(base, server, sleeps, tmp_path, capsys):
    for i in (0, 1, 6542):
        server.files[dataset.index_to_filename(i)] = shard_bytes(tmp_path, name=f"s{i}.parquet", docs=[f"doc {i}"])
    assert dataset.main(["-n", "3", "-w", "2", "--base-url", server.url]) == 1  # shard 2 is missing (404)
    requested = [name for name, _ in server.log]
    assert set(requested) == {dataset.index_to_filename(i) for i in dataset.shard_ids(3)}
    assert requested.count("shard_00002.parquet") == 1  # a 404 is not retried
    assert visible_files(dataset.get_data_dir()) == ["shard_00000.parquet", "shard_00001.parquet",
                                                     "shard_06542.parquet"]
    out = capsys.readouterr().out
    assert "Downloading 4 shards using 2 workers..." in out and "Done! Downloaded: 3/4 shards" in out
    assert "Failed: shard_00002.parquet" in out

    server.log.clear()
    assert dataset.main(["-n", "2", "-w", "2", "--base-url", server.url]) == 0  # all present: skips, exit 0
    assert server.log == []


def test_cli_base_url_may_end_in_a_slash(base, server, sleeps, tmp_path):
    for name in ("shard_00000.parquet", "shard_06542.parquet"):
        server.files[name] = shard_bytes(tmp_path, name=name, docs=[name])
    assert dataset.main(["-n", "1", "-w", "1", "--base-url", server.url + "//"]) == 0
    assert visible_files(dataset.get_data_dir()) == ["shard_00000.parquet", "shard_06542.parquet"]


def test_ctrl_c_ends_the_cli_at_once_and_the_shard_in_progress_resumes(base, server, tmp_path):
    server.files[dataset.VAL_FILENAME] = os.urandom(10_000_000)
    server.trickle = True
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "NANOCHAT_QUIET": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nanochat.dataset", "-n", "0", "--base-url", server.url],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    part = base / "base_data_climbmix" / (dataset.VAL_FILENAME + ".part")
    try:
        deadline = time.monotonic() + 120
        while not (part.exists() and part.stat().st_size > 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert part.exists(), proc.communicate(timeout=5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)  # not the minutes the transfer would take
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert out.strip().endswith("Interrupted: run the same command again to go on (shards in progress resume).")
    assert part.stat().st_size > 0  # kept for the next run's Range request


def test_cli_rejects_a_negative_count_other_than_minus_one():
    with pytest.raises(SystemExit) as err:
        dataset.main(["-n", "-2"])
    assert err.value.code == 2
