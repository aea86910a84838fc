"""
Read the numbers a sweep records from what scripts/base_train.py prints. This file is the one
place that knows those line formats; runs/miniseries.sh and runs/scaling_laws.sh call it.

Lines read (the last occurrence wins, so a log holding a resumed run reports its final values):
    Model config:                         followed by indented JSON holding "n_embd": <d>
    <key padded to 24>: <value:,>         parameter counts (wte, value_embeds, lm_head, ...)
    Using user-provided number of iterations: <n:,>   (or "Calculated number of iterations ...: <n:,>")
    Total batch size <B:,> => gradient accumulation steps: <k>
    Step <s:05d> | Validation bpb: <v:.6f>
    Step <s:05d> | CORE metric: <x:.4f>

Usage: python runs/parse_train_log.py LOG [--columns a,b,c]
Without --columns it prints one name=value line per field; with it, the named fields as one CSV row.
Required fields that are missing make it exit with status 1 and a message; a missing val bpb or
CORE score is left empty (with a warning) rather than recorded as a fake 0.0.
Standard library only: it runs under any python3, without torch.
"""

import argparse
import re
import sys

PARAM_KEYS = ("wte", "value_embeds", "lm_head", "transformer_matrices", "l3_embeds", "l3_matrices",
              "scalars", "total")
_NUM = r"([\d,]+)"
_PARAM_RE = re.compile(rf"^({'|'.join(PARAM_KEYS)})\s*: {_NUM}\s*$", re.M)
_ITERATIONS_RE = re.compile(rf"^(?:Using user-provided|Calculated) number of iterations.*: {_NUM}\s*$", re.M)
_BATCH_RE = re.compile(rf"^Total batch size {_NUM} => gradient accumulation steps: \d+\s*$", re.M)
_N_EMBD_RE = re.compile(r'^Model config:\s*\{[^}]*?"n_embd": (\d+)', re.M)
_VAL_BPB_RE = re.compile(r"^Step \d+ \| Validation bpb: ([-\d.naif]+)\s*$", re.M)
_CORE_RE = re.compile(r"^Step \d+ \| CORE metric: ([-\d.naif]+)\s*$", re.M)

# fields an experiment row cannot do without: a log missing one is from a run that did not start
REQUIRED = ("model_dim", "params_total", "num_iterations", "total_batch_size")


def _last(pattern, text):
    matches = pattern.findall(text)
    return matches[-1] if matches else None


def _int(s):
    return None if s is None else int(s.replace(",", ""))


def parse_train_log(text):
    """The recorded fields of one base_train log, as a dict; absent values are None."""
    params = {key: _int(value) for key, value in _PARAM_RE.findall(text)}
    fields = {f"params_{key}": params.get(key) for key in PARAM_KEYS}
    fields["params_transformer"] = fields["params_transformer_matrices"]
    fields["num_params"] = fields["params_total"]
    # the scaling-law parameter count of base_train (Kaplan-style: transformer matrices + lm_head)
    if params.get("transformer_matrices") is not None and params.get("lm_head") is not None:
        fields["num_scaling_params"] = params["transformer_matrices"] + params["lm_head"]
    else:
        fields["num_scaling_params"] = None
    fields["model_dim"] = _int(_last(_N_EMBD_RE, text))
    fields["num_iterations"] = _int(_last(_ITERATIONS_RE, text))
    fields["total_batch_size"] = _int(_last(_BATCH_RE, text))
    if fields["num_iterations"] is not None and fields["total_batch_size"] is not None:
        fields["tokens_trained"] = fields["num_iterations"] * fields["total_batch_size"]
    else:
        fields["tokens_trained"] = None
    if fields["tokens_trained"] is not None and fields["num_scaling_params"]:
        fields["param_data_ratio"] = round(fields["tokens_trained"] / fields["num_scaling_params"], 2)
    else:
        fields["param_data_ratio"] = None
    val_bpb, core = _last(_VAL_BPB_RE, text), _last(_CORE_RE, text)
    fields["val_bpb"] = None if val_bpb is None else float(val_bpb)
    fields["core_score"] = None if core is None else float(core)
    return fields


def _format(value):
    return "" if value is None else str(value)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Extract sweep results from a base_train log")
    parser.add_argument("log", help="path to the captured stdout of scripts.base_train")
    parser.add_argument("--columns", default="", help="comma-separated field names to print as one CSV row")
    args = parser.parse_args(argv)
    with open(args.log, encoding="utf-8", errors="replace") as f:
        fields = parse_train_log(f.read())
    missing = [name for name in REQUIRED if fields[name] is None]
    if missing:
        print(f"parse_train_log: {args.log} lacks {', '.join(missing)} (did the run start?)", file=sys.stderr)
        return 1
    for name in ("val_bpb", "core_score"):
        if fields[name] is None:
            print(f"parse_train_log: warning: no {name} in {args.log}; leaving it empty", file=sys.stderr)
    columns = [c for c in args.columns.split(",") if c]
    unknown = [c for c in columns if c not in fields]
    if unknown:
        parser.error(f"unknown columns {unknown}; known: {sorted(fields)}")
    if columns:
        print(",".join(_format(fields[c]) for c in columns))
    else:
        for name, value in fields.items():
            print(f"{name}={_format(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
