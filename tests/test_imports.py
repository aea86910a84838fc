"""Importing any nanochat module does no work: no CUDA query, no network, no files in the base
directory, no exit hooks, and no decision frozen at import (NANOCHAT_DTYPE and NANOCHAT_ATTN set afterwards
still take effect).
Each check runs in a fresh interpreter, since this test process has imported everything already."""

import ast
import json
import os
import pkgutil
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import nanochat

REPO = Path(__file__).resolve().parents[1]

# Runs in a child interpreter: records every CUDA query, network attempt and nanochat exit hook made while
# importing all modules, then decides the dtype and attention from the environment set after the imports.
CHILD = r"""
import importlib, json, os, socket, sys
import torch
seen = []
def record(name, result):
    def probe(*args, **kwargs):
        seen.append(name)
        if isinstance(result, Exception):
            raise result
        return result
    return probe
for name, result in [("is_available", False), ("device_count", 0), ("init", None), ("_lazy_init", None),
                     ("get_device_capability", (0, 0)), ("current_device", 0)]:
    setattr(torch.cuda, name, record("torch.cuda." + name, result))
for name in ("create_connection", "getaddrinfo"):
    setattr(socket, name, record("socket." + name, OSError("network used at import")))
socket.socket.connect = record("socket.connect", OSError("network used at import"))
import atexit
register = atexit.register
def register_from_nanochat(fn, *args, **kwargs):
    if getattr(fn, "__module__", "").startswith("nanochat"):
        seen.append("atexit.register(" + fn.__module__ + "." + fn.__qualname__ + ")")
    return register(fn, *args, **kwargs)
atexit.register = register_from_nanochat
for module in sys.argv[1:]:
    importlib.import_module(module)
atexit.register = register
os.environ["NANOCHAT_DTYPE"] = "bfloat16"
os.environ["NANOCHAT_ATTN"] = "sdpa"
import torch.nn as nn
from nanochat import common
from nanochat.gpt import GPT, GPTConfig
cfg = GPTConfig(sequence_len=16, vocab_size=32, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
model = GPT(cfg)
model.init_weights()
from nanochat.flash_attention import decide_backend
attention = decide_backend(torch.device("cpu"), 16).train_reason
print(json.dumps({"seen": seen, "dtype": str(common.COMPUTE_DTYPE), "rotary": str(model.cos.dtype),
                  "wte": str(model.transformer.wte.weight.dtype), "attention": attention}))
"""
def nanochat_modules():
    return sorted(f"nanochat.{m.name}" for m in pkgutil.iter_modules(nanochat.__path__))


def import_in_fresh_interpreter(modules, tmp_path):
    base = tmp_path / "base"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOCHAT_")}
    env.update(NANOCHAT_BASE_DIR=str(base), CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", CHILD, *modules], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), base


def test_importing_every_module_does_no_work_and_freezes_no_dtype(tmp_path):
    modules = nanochat_modules()
    assert {"nanochat.gpt", "nanochat.l3", "nanochat.common", "nanochat.engine"} <= set(modules)
    result, base = import_in_fresh_interpreter(modules, tmp_path)
    assert result["seen"] == [], f"imports did work (CUDA, network or exit hooks): {result['seen']}"
    assert not base.exists(), f"imports wrote into NANOCHAT_BASE_DIR: {sorted(base.rglob('*'))}"
    # NANOCHAT_DTYPE and NANOCHAT_ATTN were set only after nanochat.gpt and every other module were imported
    assert result == {"seen": [], "dtype": "torch.bfloat16", "rotary": "torch.bfloat16",
                      "wte": "torch.bfloat16", "attention": "NANOCHAT_ATTN=sdpa"}


def absolute_imports(path):
    """Every module an absolute import of the file names, lazy imports included: `import a.b` gives a.b,
    `from a import b` gives a and a.b (b may be a module or a name in a)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return found


def nanochat_imports(module):
    """The nanochat modules (and names in them) a module imports anywhere in its body."""
    found = absolute_imports(REPO / (module.replace(".", "/") + ".py"))
    return {name for name in found if name.startswith("nanochat.")} - {module}


def test_the_package_has_no_import_cycles():
    modules = nanochat_modules()
    graph = {m: nanochat_imports(m) & set(modules) for m in modules}

    def cycle_from(module, path):
        if module in path:
            return path[path.index(module):] + [module]
        for dep in sorted(graph[module]):
            cycle = cycle_from(dep, path + [module])
            if cycle:
                return cycle
        return None

    for module in modules:
        cycle = cycle_from(module, [])
        assert cycle is None, "import cycle: " + " -> ".join(cycle)


def distribution_name(name):
    return name.lower().replace("_", "-")  # PyPI treats "PyYAML" and "pyyaml", "a_b" and "a-b" alike


def declared_distributions():
    """The names of the project's dependencies and optional extras in pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + sum(project["optional-dependencies"].values(), [])
    return {distribution_name(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in requirements}


def test_every_third_party_import_is_a_declared_dependency():
    # a package that comes only under another one (pydantic under fastapi) can go away with its next release
    providers = packages_distributions()
    paths = [*REPO.glob("nanochat/*.py"), *REPO.glob("scripts/*.py"), *REPO.glob("tasks/*.py")]
    imported = {name.split(".")[0] for path in paths for name in absolute_imports(path)}
    third_party = imported - set(sys.stdlib_module_names) - {"nanochat", "scripts", "tasks"}
    declared = declared_distributions()
    undeclared = {name: providers.get(name) for name in sorted(third_party)
                  if not {distribution_name(d) for d in providers.get(name, [])} & declared}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
