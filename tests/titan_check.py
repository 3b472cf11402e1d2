"""Parse meshplan's torchtitan arguments with the installed torchtitan, as its trainer does.

    python tests/titan_check.py CASES.json      # prints one JSON result per case

CASES.json: [{"name", "args": [...], "world": W, "stages": [[first, n], ...],
              "shape": {...}}]. For each case, torchtitan's own ConfigManager.parse_args
parses the arguments (Trainer.Config.__post_init__ validates them: pipeline/cuda-graph,
micro-batch divisibility...), ParallelDims.from_config checks the degrees against the world
size, the sparse (expert) mesh dims are checked as ParallelDims.build_mesh computes them,
the model is built on the meta device and every module name of each model part must exist
in it, the stage split must be the plan's, and the model's shape (layers, width, heads,
KV heads, FFN width, vocabulary, parameter count) must be the plan's.

torchtitan modules that import triton (GPU kernels), `datasets` (data loading) and
torch.utils.tensorboard (logging) are replaced by empty stand-ins: none runs when parsing a
config or building a model on the meta device.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import json
import re
import sys
import types
from pathlib import Path


class _Anything(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(name, (), {})

    def __call__(cls, *args, **kwargs):
        return args[0] if len(args) == 1 and callable(args[0]) and not kwargs else cls


class _Module(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(name, (), {})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, names: set[str]):
        self.names = names

    def find_spec(self, name, path, target=None):
        if name in self.names or name.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Module(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def install_stubs() -> None:
    spec = importlib.util.find_spec("torchtitan")
    root = Path(spec.origin).parent
    names = {"torch.utils.tensorboard"}
    if importlib.util.find_spec("datasets") is None:
        names.add("datasets")
    for path in root.rglob("*.py"):
        if re.search(r"^(import triton|from triton)", path.read_text(errors="replace"), re.M):
            names.add(".".join(path.relative_to(root.parent).with_suffix("").parts)
                      .removesuffix(".__init__"))
    sys.meta_path.insert(0, _Finder(names))


def _shape(config) -> dict:
    model = config.model_spec.model
    layer = model.layers[0]
    attn = layer.attention
    heads = getattr(attn, "n_heads", None)
    rope = getattr(attn, "rope", None)
    return {"num_layers": len(model.layers), "hidden_size": model.dim,
            "vocab_size": model.vocab_size, "num_heads": heads,
            "num_kv_heads": getattr(attn, "n_kv_heads", None) or heads,
            "rope_theta": getattr(rope, "theta", None), "rope_scaling": getattr(rope, "scaling", None)}


def check(case: dict) -> dict:
    import torch
    from torchtitan.config.manager import ConfigManager
    from torchtitan.distributed import ParallelDims

    try:
        config = ConfigManager().parse_args(case["args"])
    except SystemExit as exc:
        return {"accepted": False, "error": f"tyro/ConfigManager exit {exc.code}"}
    except (ValueError, AssertionError, TypeError) as exc:
        return {"accepted": False, "error": f"{type(exc).__name__}: {exc}"}
    par = config.parallelism
    try:
        dims = ParallelDims.from_config(par, case["world"])
    except (AssertionError, ValueError) as exc:
        return {"accepted": False, "error": f"ParallelDims: {exc}"}
    errors = []
    if dims.ep > 1 and (dims.dp_shard * dims.cp * dims.tp) % dims.ep:
        errors.append(f"sparse mesh: dp_shard*cp*tp = {dims.dp_shard * dims.cp * dims.tp} "
                      f"is not a multiple of ep {dims.ep}")
    result = {"accepted": True, "dims": {k: getattr(dims, k) for k in
                                         ("dp_replicate", "dp_shard", "cp", "tp", "pp", "ep")},
              "reshard_after_forward": par.fsdp_reshard_after_forward,
              "compile": [config.compile.enable, config.compile.enable_async_tensor_parallel]}
    if config.model_spec is not None and not case.get("stand_in"):
        model_cfg = config.model_spec.model
        with torch.device("meta"):
            model = model_cfg.build()
        names = {n for n, _ in model.named_modules()}
        parts = par.module_fqns_per_model_part or [sorted(names)]
        missing = [n for part in parts for n in part if n not in names]
        if missing:
            errors.append(f"model parts name modules the model lacks: {missing[:5]}")
        result["params"] = sum(p.numel() for p in model.parameters())
        result["shape"] = _shape(config)
    if par.module_fqns_per_model_part is not None:
        split = []
        for part in par.module_fqns_per_model_part:
            layers = [int(n.split(".")[1]) for n in part if n.startswith("layers.")]
            split.append([min(layers), len(layers)] if layers else [None, 0])
        result["stages"] = split
    result["errors"] = errors
    return result


def main() -> None:
    install_stubs()
    cases = json.loads(Path(sys.argv[1]).read_text())
    out = {case["name"]: check(case) for case in cases}
    print("MESHPLAN-RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
