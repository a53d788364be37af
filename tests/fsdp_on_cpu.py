"""`rlcd` under `accelerate launch --config_file configs/accelerate/fsdp.yaml` with FSDP really on, on CPU processes.

Not a test module: tests/test_distributed.py launches it. torch's FSDP2 (`fully_shard`) runs on CPU with gloo,
but accelerate 1.15 turns FSDP on only for accelerator devices: with ACCELERATE_USE_CPU its AcceleratorState
keeps MULTI_CPU and ignores the FSDP plugin (so fsdp.yaml trains as plain DDP there), and every later
AcceleratorState() copies MULTI_CPU back from PartialState. This shim sets FSDP again whenever a plugin is
known; everything else -- sharding, gathering the full state dict, sharded checkpoints, resume -- is the
real code path a GPU run takes.

RLCD_TEST_STOP_AT_STEP=N interrupts training (KeyboardInterrupt on every rank) when step N begins, to test --resume.
"""

from __future__ import annotations

import os
import runpy
import sys

import accelerate.state as state

_init = state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if self.distributed_type == state.DistributedType.MULTI_CPU:
        if fsdp_plugin is not None:
            self.fsdp_plugin = fsdp_plugin
        if getattr(self, "fsdp_plugin", None) is not None:
            self.distributed_type = state.DistributedType.FSDP


state.AcceleratorState.__init__ = _fsdp_on_cpu

if os.environ.get("RLCD_TEST_STOP_AT_STEP"):
    from transformers import Trainer

    stop_at, _step = int(os.environ["RLCD_TEST_STOP_AT_STEP"]), Trainer.training_step

    def _interrupted(self, *args, **kwargs):
        if self.state.global_step == stop_at:
            raise KeyboardInterrupt
        return _step(self, *args, **kwargs)

    Trainer.training_step = _interrupted

sys.argv[0] = "rlcd"
runpy.run_module("rlcd", run_name="__main__", alter_sys=True)
