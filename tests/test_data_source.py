"""nanochat/data_source.py: which failures count as network errors, and the one decision rank 0 shares."""
import http.client
import json
import socket
import urllib.error

import httpx
import pytest
from conftest import spawn_ranks

from nanochat import data_source


def http_status_error(status):
    """What huggingface_hub raises (through httpx) for an HTTP error status."""
    request = httpx.Request("HEAD", "https://huggingface.co/x")
    response = httpx.Response(status, request=request)
    return httpx.HTTPStatusError(f"{status}", request=request, response=response)


def raised_from(outer, cause):
    try:
        try:
            raise cause
        except BaseException as e:
            raise outer from e
    except BaseException as e:
        return e


@pytest.mark.parametrize("exc", [
    urllib.error.URLError(socket.gaierror(-2, "Name or service not known")),
    ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)"),
    TimeoutError("timed out"),
    urllib.error.HTTPError("https://x", 503, "Service Unavailable", {}, None),
    http.client.RemoteDisconnected("Remote end closed connection"),
    type("ReadTimeout", (OSError,), {})("requests' read timeout"),  # matched by class name
    raised_from(RuntimeError("Failed to download after 5 attempts"), urllib.error.URLError("unreachable")),
    httpx.ConnectError("[Errno 111] Connection refused"),
    http_status_error(503),
])
def test_network_errors(exc):
    assert data_source.is_network_error(exc)


@pytest.mark.parametrize("exc", [
    urllib.error.HTTPError("https://x", 404, "Not Found", {}, None),
    http_status_error(404),
    OSError(28, "No space left on device"),
    ValueError("Unknown split"),
    ImportError("No module named 'datasets'"),
    raised_from(RuntimeError("Failed to download after 5 attempts"), PermissionError(13, "Permission denied")),
])
def test_other_errors(exc):
    assert not data_source.is_network_error(exc)


def test_single_process_decides_locally():
    calls = []
    assert data_source.decide_on_rank0(lambda: calls.append(1) or "hub") == "hub" and calls == [1]
    with pytest.raises(ValueError, match="boom"):
        data_source.decide_on_rank0(lambda: (_ for _ in ()).throw(ValueError("boom")))


def _two_rank_worker(rank, init_file, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    calls = []
    result = {"value": data_source.decide_on_rank0(lambda: calls.append(rank) or f"chosen by rank {rank}")}

    def fail():
        raise ValueError("hub said no")
    try:
        data_source.decide_on_rank0(fail)
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
    result["calls"] = calls
    # end to end: rank 0 cannot reach the hub, rank 1 could; both must use the committed copy
    import os
    import sys
    import types

    def load_dataset(path, name=None, split=None):
        if rank == 0:
            raise ConnectionError("Couldn't reach the Hub")
        rows = [{"question": "q", "answer": "#### 1"}] * 5  # what rank 1 alone would have trained on
        return types.SimpleNamespace(shuffle=lambda seed: rows)
    os.environ.pop("NANOCHAT_OFFLINE", None)
    sys.modules["datasets"] = types.SimpleNamespace(load_dataset=load_dataset)
    from tasks.common import CommittedRows
    from tasks.gsm8k import GSM8K
    task = GSM8K("main", "test")
    result["rows"] = [type(task.ds) is CommittedRows, len(task)]
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def test_two_ranks_share_rank_zeros_decision_its_failure_and_the_task_data_source(tmp_path):
    spawn_ranks(_two_rank_worker, str(tmp_path / "pg"), str(tmp_path))
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["value"] for r in results] == ["chosen by rank 0"] * 2
    assert results[0]["calls"] == [0] and results[1]["calls"] == []
    assert [r["rows"] for r in results] == [[True, 1319]] * 2
    assert results[0]["error"] == "ValueError: hub said no"
    assert results[1]["error"] == ("RankZeroFailed: rank 0 failed while choosing the data source: "
                                   "ValueError: hub said no")
