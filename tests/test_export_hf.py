"""scripts/export_hf and nanochat/hf_export: the export loads in `transformers` and matches our model,
tokenizer, chat format, Engine and base_eval numbers."""
import json
import os
import sys

import pytest
import torch

from nanochat import checkpoint_manager as cm
from nanochat import hf_export
from nanochat.common import BadFileError
from nanochat.engine import Engine
from nanochat.tokenizer import compute_token_bytes
from scripts import base_eval, export_hf

from conftest import exits_with_error, point_base_dir_at, write_tiny_checkpoint

transformers = pytest.importorskip("transformers", reason="needs the dev group (transformers)")

TEXTS = ["Hello there! How are you today?", "The answer is 42, or 1234567.",
         "Un café naïve, s'il vous plaît.", "  two  spaces\n\nand lines\r\n", "emoji 🙂 and 你好"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_tokenizer):
    """A base dir holding the tiny tokenizer and a depth-3 GQA checkpoint with S and L layers whose every
    feature is switched on (smear, backout and the scalars are 0 or 1 at init), and its export."""
    base = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:
        point_base_dir_at(mp, base)
        tiny_tokenizer.save(str(base / "tokenizer"))
        torch.save(compute_token_bytes(tiny_tokenizer), base / "tokenizer" / "token_bytes.pt")
        ckpt, model = write_tiny_checkpoint(base, "base", step=7, sequence_len=1024, perturb=0.1, n_layer=3,
                                            n_head=4, n_kv_head=2, window_pattern="SL")
        torch.manual_seed(1)
        with torch.no_grad():
            for p in (model.resid_lambdas, model.x0_lambdas, model.smear_lambda, model.backout_lambda):
                p.add_(0.3 * torch.randn_like(p))
        meta = json.load(open(os.path.join(ckpt, "meta_000007.json")))
        cm.save_checkpoint(ckpt, 7, model.state_dict(), None, {**meta, "total_batch_size": 1024})
        export_hf.main(["-i", "base", "-o", str(base / "hf")])
        ours, tokenizer, _ = cm.load_model("base", "cpu", phase="eval")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(base / "hf"), trust_remote_code=True)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(base / "hf"))
    return base, ours, tokenizer, hf_model.eval(), hf_tok


def test_logits_match_in_fp32(exported):
    _, ours, tokenizer, hf_model, _ = exported
    assert ours.window_sizes[0][0] == 256 < 300  # the S layers' window is shorter than the input below
    torch.manual_seed(0)
    idx = torch.randint(0, tokenizer.get_vocab_size(), (2, 300))
    with torch.no_grad():
        want, got = ours(idx), hf_model(idx).logits
    assert got.shape == want.shape == (2, 300, tokenizer.get_vocab_size())
    assert (got - want).abs().max().item() == 0.0, (got - want).abs().max().item()
    assert want.std() > 0.1  # the logits are spread out: the comparison is not of near-constants
    # transformers 4.x (4.57 is the lowest the hf extra allows) ties lm_head to wte unless the config says no
    assert hf_model.config.tie_word_embeddings is False


def test_tokenizer_encodes_and_decodes_as_ours(exported):
    _, _, tokenizer, _, hf_tok = exported
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False) == ids
        assert hf_tok(text)["input_ids"] == [tokenizer.get_bos_token_id()] + ids  # as in pretraining
        assert hf_tok.decode(ids) == text
    assert hf_tok.bos_token_id == tokenizer.get_bos_token_id()
    assert hf_tok.eos_token_id == tokenizer.encode_special("<|assistant_end|>")


def test_chat_template_renders_render_for_completion(exported):
    _, _, tokenizer, _, hf_tok = exported
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there!"},
        {"role": "assistant", "content": "I am fine, thank you."},
        {"role": "user", "content": "What is 6*7?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me see. "},
                                          {"type": "python", "text": "6*7"},
                                          {"type": "python_output", "text": "42"},
                                          {"type": "text", "text": " The answer is 42."}]},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You are welcome."},
    ]
    want = tokenizer.render_for_completion({"messages": messages})
    got = hf_tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True)
    got = got["input_ids"] if isinstance(got, dict) or hasattr(got, "keys") else got
    assert list(got) == want


def test_generate_greedy_matches_the_engine(exported):
    _, ours, tokenizer, hf_model, _ = exported
    engine = Engine(ours, tokenizer)
    terminal = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    for text in TEXTS[:3]:
        prompt = tokenizer.encode(text, prepend="<|bos|>")
        (want,), _ = engine.generate_batch(prompt, max_tokens=12, temperature=0.0)
        got = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0].tolist()
        if len(got) > len(prompt) and got[-1] in terminal:  # generate_batch leaves the terminal token out
            got = got[:-1]
        assert got == want and len(want) > len(prompt)


def test_the_readme_snippet_loads_an_export_and_generates(exported):
    # the README's code, run as a user would copy it: with the locked transformers 5, apply_chat_template
    # returns a dict unless told otherwise, so a snippet passing it to generate() as ids fails
    base, _, tokenizer, _, _ = exported
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    section = readme[readme.index("## Export to Hugging Face"):]
    snippet = section[section.index("```python\n") + len("```python\n"):]
    snippet = snippet[:snippet.index("```")].replace("out/nanochat-d20", str(base / "hf"))
    scope = {}
    exec(snippet, scope)
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "Hi!"},
                                                           {"role": "assistant", "content": ""}]})
    out = scope["out"][0].tolist()
    assert out[:len(prompt)] == prompt and len(out) > len(prompt)


def test_base_eval_gives_our_core_and_bpb_back(exported, monkeypatch, capsys):
    from nanochat.loss_eval import evaluate_bpb
    base = exported[0]
    point_base_dir_at(monkeypatch, base)
    argv = ["--max-per-task", "1", "--device-type", "cpu"]
    ours = base_eval.main(argv + ["--eval", "core"])
    capsys.readouterr()
    theirs = base_eval.main(argv + ["--eval", "core,sample", "--hf-path", str(base / "hf")])
    assert theirs["results"] == ours["results"] and theirs["core_metric"] == ours["core_metric"]
    printed = capsys.readouterr().out
    assert "Skipping sampling for HuggingFace models" in printed and "Model Samples" not in printed
    # bpb: the same table and context as our checkpoint, and the same number on a batch of our tokens
    # (base_eval's data loader is left out: it tokenises a thousand documents per split)
    from nanochat.tokenizer import get_token_bytes
    model, tokenizer, meta = cm.load_model("base", "cpu", phase="eval")
    token_bytes, sequence_len = get_token_bytes("cpu"), meta["model_config"]["sequence_len"]
    wrapped, hf_tokenizer, hf_token_bytes, hf_sequence_len = hf_export.load_hf_model(str(base / "hf"),
                                                                                      "cpu")[:4]
    assert hf_token_bytes.tolist() == token_bytes.tolist() and hf_sequence_len == sequence_len == 1024
    rows = [tokenizer.encode(text, prepend="<|bos|>")[:16] for text in TEXTS]
    assert [hf_tokenizer.encode(text, prepend="<|bos|>")[:16] for text in TEXTS] == rows
    ids = torch.tensor([row + [-1] * (17 - len(row)) for row in rows])
    batch = [(ids[:, :-1].clamp(min=0), ids[:, 1:])]
    with torch.no_grad():
        assert evaluate_bpb(wrapped, batch, 1, hf_token_bytes) == pytest.approx(
            evaluate_bpb(model, batch, 1, token_bytes), rel=1e-5)


def test_an_hf_path_with_no_model_ends_with_one_line_saying_what_to_pass(tmp_path, monkeypatch, capsys):
    point_base_dir_at(monkeypatch, tmp_path / "base")
    (tmp_path / "empty").mkdir()
    with exits_with_error(capsys, r"^base_eval: error: --hf-path .*empty: no model could be loaded from it "
                                  r"\(ValueError: .*\)\. Fix: pass a directory written by `python -m "
                                  r"scripts\.export_hf`"):
        base_eval.main(["--eval", "bpb", "--device-type", "cpu", "--hf-path", str(tmp_path / "empty")])


def test_export_files_generation_config_and_model_card(exported):
    base, _, tokenizer, _, _ = exported
    hf = base / "hf"
    assert sorted(os.listdir(hf)) == ["README.md", "config.json", "generation_config.json",
                                      "model.safetensors", "modeling_nanochat.py", "tokenizer.json",
                                      "tokenizer_config.json"]
    generation = json.load(open(hf / "generation_config.json"))
    terminal = [tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()]
    assert generation["eos_token_id"] == terminal
    card = (hf / "README.md").read_text()
    params = sum(p.numel() for p in exported[1].parameters())
    for row in ["| Source | nanochat base checkpoint, step 7 |", f"| Parameters | {params:,} |",
                "| Layers / width / heads (kv heads) | 3 / 64 / 4 (2) |",
                "| Context / window pattern | 1024 / SL |",
                "| Training tokens | 7,168 |"]:  # step 7 x total_batch_size 1024
        assert row in card


def test_export_refuses_l3_layers_and_a_non_empty_output(exported, tmp_path, capsys):
    from nanochat.hf_export import check_exportable
    from nanochat.gpt import GPTConfig
    with pytest.raises(BadFileError, match="--l3-after-layers=1"):
        check_exportable(GPTConfig(n_layer=2, l3_after_layers="1", l3_n_emb=40000))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.MonkeyPatch.context() as mp:
        point_base_dir_at(mp, exported[0])
        with exits_with_error(capsys, r"^export_hf: error: .*taken already exists and is not an empty "
                                      r"directory; remove it or choose another --output$"):
            export_hf.main(["-i", "base", "-o", str(tmp_path / "taken")])
    assert os.listdir(tmp_path) == ["taken"]  # no staging directory left behind


def test_export_without_safetensors_says_how_to_install_it_and_leaves_nothing(exported, tmp_path,
                                                                             monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # what `import` sees when it is not installed
    point_base_dir_at(monkeypatch, exported[0])
    with exits_with_error(capsys, "^export_hf: error: the export needs the `safetensors` package: uv sync "
                                  "--extra hf$"):
        export_hf.main(["-i", "base", "-o", str(tmp_path / "hf")])
    assert os.listdir(tmp_path) == []  # the staging directory went with the failure


def test_a_tokenizer_that_is_no_plain_bpe_is_refused():
    import tiktoken
    from types import SimpleNamespace
    from nanochat.tokenizer import SPECIAL_TOKENS
    # "abc" has rank 256 but neither "ab" nor "bc" is a token: no merge of lower rank makes it
    assert "not reachable by BPE merges" in str(pytest.raises(BadFileError, hf_export._last_merge, b"abc",
                                                                {b"a": 0, b"b": 1, b"c": 2, b"abc": 3}).value)
    ranks = {**{bytes([b]): b for b in range(256)}, b"ab": 257}
    # <|bos|> sits between the byte tokens and the merge, as in no tokenizer that tok_train writes
    specials = {name: 256 if i == 0 else 257 + i for i, name in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding("gap", pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens=specials)
    tokenizer = SimpleNamespace(enc=enc, encode_special=enc.encode_single_token)
    with pytest.raises(BadFileError, match="special tokens must take the ids right after the BPE tokens"):
        hf_export.hf_tokenizer(tokenizer)
    # no token has id 256: the merge "ab" took 257
    specials = {name: 258 + i for i, name in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding("gap", pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens=specials)
    tokenizer = SimpleNamespace(enc=enc, encode_special=enc.encode_single_token)
    with pytest.raises(BadFileError, match=r"token id 256 has no token: .* retrain the tokenizer"):
        hf_export.hf_tokenizer(tokenizer)


def test_export_draws_a_progress_bar_on_a_terminal(exported, tmp_path, monkeypatch):
    import contextlib
    from conftest import TerminalIO
    monkeypatch.delenv("NANOCHAT_QUIET", raising=False)
    point_base_dir_at(monkeypatch, exported[0])
    with contextlib.redirect_stderr(TerminalIO()) as terminal:
        export_hf.main(["-i", "base", "-o", str(tmp_path / "again")])
    # tqdm redraws at most every 0.1 s and erases the finished bar: its first frame is what is sure to show
    assert "export:   0%|" in terminal.getvalue() and "0/4 [" in terminal.getvalue(), terminal.getvalue()
    assert sorted(os.listdir(tmp_path / "again")) == sorted(os.listdir(exported[0] / "hf"))


def test_a_checkpoint_whose_meta_has_no_window_pattern_exports(tiny_base_dir):
    # older checkpoints' meta files lack window_pattern; the loader reads them as "L" (full context)
    ckpt, _ = write_tiny_checkpoint(tiny_base_dir, "base", step=2)
    meta_path = os.path.join(ckpt, "meta_000002.json")
    meta = json.load(open(meta_path))
    del meta["model_config"]["window_pattern"]
    json.dump(meta, open(meta_path, "w"))
    export_hf.main(["-i", "base", "-o", str(tiny_base_dir / "hf")])
    assert json.load(open(tiny_base_dir / "hf" / "config.json"))["window_pattern"] == "L"
    assert "| Context / window pattern | 128 / L |" in (tiny_base_dir / "hf" / "README.md").read_text()


def test_an_output_that_cannot_be_written_is_a_clear_error_that_leaves_nothing(exported, tmp_path,
                                                                              monkeypatch, capsys):
    import errno
    import safetensors.torch
    point_base_dir_at(monkeypatch, exported[0])
    (tmp_path / "a_file").write_text("x")
    with exits_with_error(capsys, r"^export_hf: error: could not write .*a_file/sub/hf \(.*Not a directory"
                                  r".*\).* Fix: choose an --output in a directory you can write to"):
        export_hf.main(["-i", "base", "-o", str(tmp_path / "a_file" / "sub" / "hf")])

    # a full disk as the writes report it: the JSON files' OSError, and safetensors' own error (seen on a
    # 40 MB tmpfs)
    for error in (OSError(errno.ENOSPC, "No space left on device"), safetensors.SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)")):
        def disk_full(*args, error=error, **kwargs):
            raise error
        monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
        with exits_with_error(capsys, r"^export_hf: error: could not write .*full.* \(.*No space left on "
                                      r"device.*\)"):
            export_hf.main(["-i", "base", "-o", str(tmp_path / "full")])
        assert os.listdir(tmp_path) == ["a_file"]  # no staging directory left behind


def test_the_weights_are_as_readable_as_the_other_files(exported):
    # whoever may read config.json may load the model: the weights get the same permissions
    hf = exported[0] / "hf"
    modes = {name: oct(os.stat(hf / name).st_mode & 0o777) for name in os.listdir(hf)}
    assert modes["model.safetensors"] == modes["config.json"] == modes["tokenizer.json"], modes


@pytest.mark.parametrize("messages, error", [
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}, {"role": "user", "content": "c"}],
     "message 1 is from tool but should be from assistant"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     "message 1 is from user but should be from assistant"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
     "must start with a user message"),
    ([{"role": "system", "content": "s"}], "must start with a user message"),
    ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
     "content of message 0 .* must be a string"),
])
def test_chat_template_refuses_conversations_our_renderer_refuses(exported, messages, error):
    _, _, tokenizer, _, hf_tok = exported
    with pytest.raises(ValueError):  # ours: roles alternate user, assistant, ... after an optional system
        tokenizer.render_for_completion({"messages": messages + [{"role": "assistant", "content": "x"}]})
    from jinja2.exceptions import TemplateError  # what the template's raise_exception raises
    with pytest.raises(TemplateError, match=error):
        hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def test_base_eval_does_not_crop_an_export_whose_path_says_gpt2(exported, tmp_path, monkeypatch):
    # "gpt2" in --hf-path crops CORE prompts to GPT-2's 1024 positions; our checkpoint is never cropped
    from nanochat.core_eval import crop_to_context
    point_base_dir_at(monkeypatch, exported[0])
    export_hf.main(["-i", "base", "-o", str(tmp_path / "nanochat-gpt2")])
    wrapped = hf_export.load_hf_model(str(tmp_path / "nanochat-gpt2"), "cpu")[0]
    tokens, starts, ends = [list(range(1100))], [1090], [1100]
    cropped = crop_to_context(tokens, starts, ends, getattr(wrapped, "max_seq_len", None))  # as core_eval
    assert cropped == (tokens, starts, ends)
