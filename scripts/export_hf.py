"""
Export a checkpoint as a Hugging Face `transformers` model directory (needs `uv sync --extra hf`).

    python -m scripts.export_hf -i sft -o out/nanochat-d20
    python -m scripts.export_hf -i base -g d12 -s 5000 -o out/nanochat-d12-base

Load it with AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) and
AutoTokenizer.from_pretrained(DIR); `python -m scripts.base_eval --hf-path DIR` evaluates it.
"""

import argparse

from nanochat.checkpoint_manager import load_model
from nanochat.common import BadSettingError, exit_on_setup_error, setup_default_logging
from nanochat.hf_export import export


def build_parser():
    parser = argparse.ArgumentParser(description="Export a checkpoint to the Hugging Face format")
    parser.add_argument("-i", "--source", type=str, required=True, choices=["base", "sft", "rl"],
                        help="checkpoint family: base|sft|rl")
    parser.add_argument("-g", "--model-tag", type=str, default=None,
                        help="checkpoint tag (default: the largest model)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("-o", "--output", type=str, required=True,
                        help="directory to create (it may exist if empty)")
    return parser


@exit_on_setup_error("export_hf")
def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_default_logging()
    # on the CPU: the export is fp32, whatever the checkpoint was trained in
    model, tokenizer, meta = load_model(args.source, "cpu", phase="eval", model_tag=args.model_tag,
                                        step=args.step)
    try:  # export() raises a SetupError for a checkpoint it cannot export or a taken --output
        path = export(model, tokenizer, meta, args.source, args.output)
    except OSError as e:  # no permission, a read-only or full disk: export() removed what it had written
        raise BadSettingError(f"could not write {args.output} ({e}); nothing was left there. Fix: choose an "
                              f"--output in a directory you can write to, with room for the weights") from e
    print(f"Exported to {path}")


if __name__ == "__main__":
    main()
