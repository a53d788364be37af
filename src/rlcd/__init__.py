"""RLCD: Reinforcement Learning from Contrast Distillation (Yang et al., arXiv 2307.12950).

Every command is a function here (`rlcd.simulate(...)`, `rlcd.train_rm(...)`, ...): see rlcd/api.py.
Importing the package loads nothing heavy; a stage's libraries load when it runs.
"""

__version__ = "0.1.0"

__all__ = ["UserError", "run_command", "simulate", "consolidate", "train_rm", "eval_rm", "score", "format_prompts", "generate",
           "postprocess", "sft", "dpo", "rloo", "ppo", "report", "compare", "refusals", "judge_agreement", "pipeline", "demo"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'rlcd' has no attribute '{name}'")
    import importlib

    api = importlib.import_module("rlcd.api")
    if name == "UserError":
        return api.UserError
    if name == "run_command":
        return api.run_command
    if name in api.FUNCTIONS:
        return api.FUNCTIONS[name]
    raise AttributeError(f"module 'rlcd' has no attribute '{name}'")


def __dir__():
    return sorted(__all__ + ["__version__"])
