"""scripts.infer_bench on a tiny checkpoint on CPU: the table, then one JSON line with the sweep."""
import json

import pytest

from nanochat.engine import decode_step_cost
from scripts import infer_bench

from conftest import exits_with_error, write_tiny_checkpoint


@pytest.fixture
def checkpoint(tiny_base_dir):
    _, model = write_tiny_checkpoint(tiny_base_dir, "base", step=7, perturb=0.1)
    return model


def test_sweep_reports_every_point_as_the_last_json_line(checkpoint, capsys):
    infer_bench.main(["--device-type=cpu", "--prompt-tokens=16,40", "--decode-tokens=6", "--batch-sizes=1,3",
                      "-t", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["device"] == "cpu" and report["dtype"] == "float32"
    assert report["config"]["n_layer"] == 2 and report["config"]["step"] == 7
    assert report["config"]["peaks"].startswith("estimated")
    sweep = report["sweep"]
    assert [(r["prompt_tokens"], r["batch_size"]) for r in sweep] == [(16, 1), (16, 3), (40, 1), (40, 3)]
    for r in sweep:
        assert r["decode_steps"] == 6  # a sampled <|assistant_end|> never ends a run early
        assert r["ttft_sec"] > 0 and r["tpot_sec"] > 0 and r["peak_memory_mb"] > 0
        assert r["tok_per_sec"] == pytest.approx(r["batch_size"] / r["tpot_sec"])
        assert r["mbu_percent"] > 0 and r["mfu_percent"] > 0
    assert any(line.split()[:2] == ["40", "3"] for line in lines[:-1])  # the human-readable table


def test_step_cost_counts_weights_once_and_kv_per_row(checkpoint):
    cfg = checkpoint.config
    kv_per_position = 2 * cfg.n_kv_head * (cfg.n_embd // cfg.n_head) * 4 * cfg.n_layer  # fp32 cache
    flops1, bytes1 = decode_step_cost(checkpoint, 1, 10)
    flops2, bytes2 = decode_step_cost(checkpoint, 2, 10)
    _, bytes_longer = decode_step_cost(checkpoint, 1, 11)
    assert bytes_longer - bytes1 == kv_per_position
    # a second row reads its own cache and lookup rows, not the weights again
    row = 10 * kv_per_position + 4 * cfg.n_embd * (1 + len(checkpoint.value_embeds))
    assert bytes2 - bytes1 == row
    padded_vocab = checkpoint.transformer.wte.weight.shape[0]  # wte and one value embedding, width 64 each
    weights = sum(p.numel() for p in checkpoint.parameters()) - 2 * padded_vocab * 64
    assert bytes1 - row == 4 * weights
    assert flops2 == 2 * flops1


def test_prompt_past_the_context_is_refused(checkpoint, capsys):
    with exits_with_error(capsys, r"^infer_bench: error: --prompt-tokens 120 \+ --decode-tokens 16 exceeds "
                                  r"the model's context of 128; lower one of them$"):
        infer_bench.main(["--device-type=cpu", "--prompt-tokens=120", "--decode-tokens=16", "-t", "1"])


@pytest.mark.parametrize("flag, message", [
    ("--prompt-tokens=16,0", "--prompt-tokens must be a comma list of integers >= 1"),
    ("--batch-sizes=", "--batch-sizes must be a comma list of integers >= 1"),
    ("--decode-tokens=1", "--decode-tokens must be >= 2 and -t/--trials >= 1"),
])
def test_sizes_out_of_range_are_usage_errors(flag, message, capsys):
    with pytest.raises(SystemExit) as info:
        infer_bench.parse_args([flag])
    assert info.value.code == 2 and message in capsys.readouterr().err
