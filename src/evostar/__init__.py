"""evostar: self-evolving training (M-STaR) for multimodal reasoning models.

    from evostar import load_config, run_experiment
    summary = run_experiment(load_config("run.yaml", ["evolve.iterations=6"]))

The names below are imported on first use, so `import evostar` stays cheap.
"""

import importlib

import torch as _torch

# Adam moments and gradients of rarely used weights decay into denormal floats, which make CPU
# training steps many times slower after a few dozen steps. The flag is per thread and OpenMP
# workers copy it when they start, so it must be set before the first parallel torch op: at import.
_torch.set_flush_denormal(True)

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "evostar.config",
    "load_config": "evostar.config",
    "ConfigError": "evostar.config",
    "UserError": "evostar.errors",
    "Sample": "evostar.records",
    "Response": "evostar.records",
    "load_samples": "evostar.data.loaders",
    "build_gym": "evostar.data.gym",
    "check_steps": "evostar.data.gym",
    "load_model": "evostar.models.hub",
    "load_processor": "evostar.models.hub",
    "VLMInputs": "evostar.models.inputs",
    "generate": "evostar.rollout.hf",
    "reward_responses": "evostar.reward.answer",
    "select": "evostar.select",
    "SFTTrainer": "evostar.train",
    "evaluate": "evostar.evaluate",
    "run_experiment": "evostar.pipeline",
    "run_demo": "evostar.demo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'evostar' has no attribute {name!r}")
