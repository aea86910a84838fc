"""dev/kill_survival.py: one kill and resume of a 2-step run ends as the uninterrupted run, in a scratch
directory that is gone afterwards (its checkpoints of every step reach gigabytes at the defaults)."""
import tempfile

import pytest

from dev import kill_survival


@pytest.mark.slow  # five subprocesses: the sample, a tokenizer, base_train three times (about 45 s)
def test_one_kill_survives_and_leaves_no_scratch_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", "")  # main() points it at its scratch directory; restored after
    assert kill_survival.main(["--kills=1", "--steps=2"]) == 0
    out = capsys.readouterr().out
    assert "kills survived: 1/1; final weights equal to the uninterrupted run: True" in out
    assert list(tmp_path.iterdir()) == []
