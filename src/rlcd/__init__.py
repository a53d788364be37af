"""RLCD: Reinforcement Learning from Contrast Distillation (Yang et al., arXiv 2307.12950).

Every command is a function of `rlcd.api` (`from rlcd.api import simulate, train_rm`) taking its typed config
(`rlcd.api.TrainRmConfig`, also here: `from rlcd import TrainRmConfig`) and/or keywords; the functions whose name
no stage module takes are here too (`rlcd.train_rm(...)`): see rlcd/api.py.
Importing the package loads nothing heavy; a stage's libraries load when it runs.
"""

from rlcd.version import __version__  # noqa: F401 - rlcd.__version__

_STAGE_MODULES = ("simulate", "generate", "ppo", "report", "pipeline")  # until they move: their functions are in rlcd.api
__all__ = ["UserError", "run_command", "consolidate", "train_rm", "eval_rm", "score", "format_prompts", "postprocess", "sft", "dpo",
           "rloo", "compare", "refusals", "judge_agreement", "demo"]


def __getattr__(name: str):
    import importlib

    if name in _STAGE_MODULES:  # a stage module of the same name: `from rlcd import simulate` must import it
        return importlib.import_module(f"rlcd.{name}")
    if name.endswith("Config") and name in importlib.import_module("rlcd.api").CONFIG_NAMES:
        return getattr(importlib.import_module("rlcd.api"), name)
    if name not in __all__:
        raise AttributeError(f"module 'rlcd' has no attribute '{name}'")
    api = importlib.import_module("rlcd.api")
    return getattr(api, name) if name in ("UserError", "run_command") else api.FUNCTIONS[name]


def __dir__():
    return sorted(__all__ + ["__version__"])
