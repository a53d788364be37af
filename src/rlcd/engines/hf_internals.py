"""The parts of transformers (and one of torch) that the engines use beyond their public API, in one place.

FastEngine routes a model's attention to its own functions and keeps keys and values in its own slot
cache. That leans on things transformers does not promise to keep; each is named here, looked up once
at import (which never fails), and checked when a FastEngine is built, so a transformers release that
moves one fails at once, in one line naming what is missing, instead of inside a decode step:

- `AttentionInterface.register` (public), and the model reading `config._attn_implementation` (private)
  at every attention call: how prefill and decode send attention to the engine's functions (`routed`);
- `masking_utils.ALL_MASK_ATTENTION_FUNCTIONS`: an attention name that is not a mask function makes
  `create_causal_mask` skip the mask, so a decode step builds none (the slot attention knows each row's columns);
- `integrations.sdpa_attention.sdpa_attention_forward` (internal): the SDPA call both attention functions end in;
- `modeling_layers.GradientCheckpointingLayer` (internal): the base class of decoder layers, found to compile them;
- each attention module's `layer_idx`, and the cache call `cache.update(key, value, layer_idx, ...)` that
  the slot cache answers;
- the cache's keyword in `forward` (`cache_argument`): `cache` from transformers 5.24, `past_key_values` before;
- torch's `nn.Module._compiled_call_impl` (private): where a compiled decoder layer's call is swapped in.

HFEngine uses only `cache_argument` from here.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from contextlib import contextmanager

from rlcd.files import UserError


def _find(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


_REQUIRED = {
    "AttentionInterface": ("transformers", "AttentionInterface"),
    "ALL_MASK_ATTENTION_FUNCTIONS": ("transformers.masking_utils", "ALL_MASK_ATTENTION_FUNCTIONS"),
    "sdpa_attention_forward": ("transformers.integrations.sdpa_attention", "sdpa_attention_forward"),
    "GradientCheckpointingLayer": ("transformers.modeling_layers", "GradientCheckpointingLayer"),
}
_found = {key: _find(module, name) for key, (module, name) in _REQUIRED.items()}
MISSING = [f"{module}.{name}" for key, (module, name) in _REQUIRED.items() if _found[key] is None]
"""What transformers lacks of the above, found at import; FastEngine refuses to start while it is not empty."""

AttentionInterface = _found["AttentionInterface"]
sdpa_attention_forward = _found["sdpa_attention_forward"]
GradientCheckpointingLayer = _found["GradientCheckpointingLayer"]


class IncompatibleTransformers(UserError):
    """This transformers lacks what the fast engine relies on: the message names each missing piece."""


def register_attention(name: str, function) -> None:
    """Make `function` the attention implementation called `name` (nothing happens where transformers cannot)."""
    if AttentionInterface is not None:
        AttentionInterface.register(name, function)


def base_model(model):
    """The transformers model under a PEFT wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def cache_argument(model) -> str:
    """The KV cache's keyword in forward's arguments and its key in the outputs: `cache` from transformers 5.24,
    `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(base_model(model).forward).parameters else "past_key_values"


def decoder_layers(model) -> list:
    """The model's decoder layers, in order (what the fast engine compiles for prefill)."""
    if GradientCheckpointingLayer is None:
        return []
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def missing(model) -> list[str]:
    """What the fast engine needs and this transformers (or this model) lacks; empty when it can run."""
    gaps = list(MISSING)
    config = model.config
    if not hasattr(config, "_attn_implementation"):
        gaps.append("config._attn_implementation (how a model picks its attention function)")
    mask_functions = _found["ALL_MASK_ATTENTION_FUNCTIONS"]
    if mask_functions is not None and not hasattr(mask_functions, "_global_mapping"):
        gaps.append("masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping (a custom attention name skips the causal mask)")
    if GradientCheckpointingLayer is not None:
        layers = decoder_layers(model)
        if len(layers) != getattr(config, "num_hidden_layers", len(layers)) or not layers:
            gaps.append(f"decoder layers as modeling_layers.GradientCheckpointingLayer ({len(layers)} found, "
                        f"config.num_hidden_layers = {getattr(config, 'num_hidden_layers', '?')})")
        elif not all(hasattr(layer, "_compiled_call_impl") for layer in layers):
            gaps.append("torch nn.Module._compiled_call_impl (where a compiled layer's call is swapped in)")
        elif not all(any(hasattr(m, "layer_idx") for m in layer.modules()) for layer in layers):
            gaps.append("an attention module with layer_idx in every decoder layer")
    if "cache" not in inspect.signature(base_model(model).forward).parameters and \
            "past_key_values" not in inspect.signature(base_model(model).forward).parameters:
        gaps.append("a cache or past_key_values argument of the model's forward")
    return gaps


def check(model) -> None:
    """Refuse, in one line naming every missing piece, a transformers (or model) the fast engine cannot drive."""
    gaps = missing(model)
    if gaps:
        import transformers

        raise IncompatibleTransformers(
            f"the fast engine cannot run on transformers {transformers.__version__}: it lacks {'; '.join(gaps)} "
            "(rlcd/engines/hf_internals.py lists what the fast engine relies on); use --engine hf")


@contextmanager
def routed(model, attention: str, layers: Sequence = (), calls: Sequence = ()):
    """While inside: the model's attention is the implementation registered as `attention`, and layers[i] runs calls[i]
    (its compiled code) instead of its own forward. Only the layers given calls are touched, so routing costs little
    (the CPU's decode step comes through here every step)."""
    config = model.config
    own, own_calls = config._attn_implementation, [layer._compiled_call_impl for layer in layers[: len(calls)]]
    config._attn_implementation = attention
    for layer, call in zip(layers, calls):
        layer._compiled_call_impl = call
    try:
        yield
    finally:
        config._attn_implementation = own
        for layer, call in zip(layers, own_calls):
            layer._compiled_call_impl = call
