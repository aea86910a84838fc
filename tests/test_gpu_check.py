"""dev/gpu_check.sh --cpu-smoke: the GPU acceptance script runs end to end on CPU and prints its one table."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ["FA3 loaded + probe", "FA3 vs SDPA max diff", "train step d12", "train step d20", "fp8 train step",
        "decode batch 1", "decode batch 8", "decode batch 32", "server 16 clients", "server 64 clients"]
CUDA_ONLY = {"FA3 loaded + probe", "FA3 vs SDPA max diff", "fp8 train step"}


def test_cpu_smoke_prints_every_row(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, NANOCHAT_BASE_DIR=str(tmp_path), NANOCHAT_OFFLINE="1")
    proc = subprocess.run(["bash", "dev/gpu_check.sh", "--cpu-smoke"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("gpu_check on cpu (smoke)"):].splitlines()[1:]
    assert [line.split(" | ")[0].strip() for line in table] == ["check"] + ROWS
    for line in table[1:]:
        check, config, result = (cell.strip() for cell in line.split(" | "))
        if check in CUDA_ONLY:
            assert result == "n/a (no CUDA)"
        else:
            assert "d2" in config and "tok/s" in result and "FAILED" not in result, line


def test_a_failed_row_shows_the_errors_last_line():
    from dev.gpu_check import run_row

    def fails(message):
        raise RuntimeError(message)
    rows, failures = [], []
    run_row(rows, failures, fails, "CUDA error\nout of memory", name="decode")
    run_row(rows, failures, fails, "", name="server")
    assert rows == [("decode", "", "FAILED: RuntimeError: out of memory"),
                    ("server", "", "FAILED: RuntimeError")]
    assert failures == ["decode", "server"]


def test_a_checkpoint_that_cannot_be_written_is_a_row_and_the_table_still_prints(monkeypatch, capsys):
    # the decode and server rows need the checkpoint: without it they are not run, and the table still ends
    # the output (the earlier rows' numbers are kept)
    from dev import gpu_check

    def no_space(base, cuda):
        raise OSError("No space left on device")
    monkeypatch.setattr(gpu_check, "write_checkpoint", no_space)
    monkeypatch.setattr(gpu_check, "fa3_rows", lambda cuda: [])  # quick rows before it
    monkeypatch.setattr(gpu_check, "train_row", lambda name, *rest: (name, "", "ok"))
    assert gpu_check.main(["--cpu-smoke"]) == 1
    table = capsys.readouterr().out.split("gpu_check on cpu (smoke)")[1].splitlines()[2:]
    assert table[-1].split(" | ")[0].strip() == "checkpoint"
    assert "FAILED: OSError: No space left on device" in table[-1]
