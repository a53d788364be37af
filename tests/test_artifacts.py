"""Model directories: the card keeps hostile text inert, the chat template reproduces the training text, the
generation config stops where training ended a turn (a word-level tokenizer built here: no network, no GGUF)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from rlcd import artifacts, dialogue
from rlcd.baselines import completion_text
from rlcd.reward import encode_texts, format_rm_input

WORDS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "Human", "Assistant", ":", "hi", "there", "how", "are", "you", "fine", "thanks", "be", "nice"]


def word_tokenizer(bos: bool = True, chat_end: bool = False):
    """A word-level tokenizer that adds [BOS] (like Llama's) or nothing (like SmolLM2's); optionally with a ChatML end token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]")
    if chat_end:
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    return tokenizer


PROMPT = "Human: hi there\n\nAssistant: how are you\n\nHuman: be nice\n\nAssistant:"


@pytest.mark.parametrize("bos", [True, False])
def test_chat_template_renders_the_text_each_stage_trained_on(bos):
    tokenizer = word_tokenizer(bos)
    messages = dialogue.chat_messages(PROMPT, None)
    start = "[BOS]" if bos else ""

    tokenizer.chat_template = artifacts.chat_template(tokenizer)
    # a policy's prompt (ppo, rloo, generate), token for token as ppo encodes it
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == start + PROMPT
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids == tokenizer(PROMPT, add_special_tokens=True).input_ids
    # a finished conversation is the sft / dpo training text: prompt + completion (marker and EOS included)
    reply = [{"role": "assistant", "content": " fine thanks "}]
    assert tokenizer.apply_chat_template(messages + reply, tokenize=False) == start + PROMPT + completion_text("fine thanks", "[EOS]")

    tokenizer.chat_template = artifacts.chat_template(tokenizer, reward_model=True)
    # a reward model's input, token for token as score_texts encodes it
    ids = tokenizer.apply_chat_template(messages + reply, return_dict=True)["input_ids"]
    assert ids == encode_texts(tokenizer, [format_rm_input(PROMPT, " fine thanks ")], None)[0][0]


def test_chat_template_puts_a_system_message_first_and_refuses_unknown_roles():
    tokenizer = word_tokenizer(bos=False)
    tokenizer.chat_template = artifacts.chat_template(tokenizer)
    messages = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == "be nice\n\nHuman: hi\n\nAssistant:"
    with pytest.raises(Exception, match="not tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_generation_config_samples_as_the_evaluation_and_stops_at_every_end_token(tmp_path):
    from transformers import GenerationConfig

    tokenizer = word_tokenizer(chat_end=True)
    GenerationConfig(eos_token_id=3, bos_token_id=2).save_pretrained(tmp_path)  # as save_pretrained copies it from the base model
    artifacts.write_generation_config(tmp_path, tokenizer)
    config = GenerationConfig.from_pretrained(tmp_path)
    assert config.eos_token_id == [3, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert (config.do_sample, config.temperature, config.top_p, config.top_k, config.max_new_tokens) == (True, 1.0, 0.9, 0, 300)
    assert config.bos_token_id == 2 and config.pad_token_id == 0
    assert json.loads((tmp_path / "generation_config.json").read_text())["_from_model_config"] is False


def test_generation_config_uses_the_settings_generate_evaluates_with():
    from rlcd.cli import build_parser

    args = build_parser("generate").parse_args(["generate"])
    assert {"temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens} == \
        {k: artifacts.EVAL_SAMPLING[k] for k in ("temperature", "top_p", "max_new_tokens")}


HOSTILE = "x ```` y\n# Fake heading\n<script>alert(1)</script>\n</code></pre><h1>escaped</h1>\n````````"


@pytest.mark.parametrize("stage", ["sft", "train-rm"])
def test_model_card_keeps_hostile_text_inert(stage, tmp_path, monkeypatch):
    markdown_it = pytest.importorskip("markdown_it", reason="markdown-it-py parses the card as a Markdown renderer would")
    monkeypatch.setattr(sys, "argv", ["rlcd", stage, "--data", f"a`b``c{HOSTILE}.csv"])
    tokenizer = word_tokenizer()
    if stage != "train-rm":
        artifacts.write_generation_config(tmp_path, tokenizer)
    card = artifacts.Card(stage=stage, base_model=f"owner/{HOSTILE}", base_path=f"/models/{HOSTILE}", settings={"lora": True, "seed": 1},
                          data=[(f"data/{HOSTILE}.csv", "8 rows")], metrics={"train_loss": 0.25}, example=f"Human: {HOSTILE}\n\nAssistant:",
                          sampling={"temperature": 0.7, "max_new_tokens": 20})
    artifacts.write_model_card(tmp_path, tokenizer, card)
    text = (tmp_path / "README.md").read_text()

    tokens = markdown_it.MarkdownIt("commonmark").parse(text)
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert headings == [f"{'Reward model' if stage == 'train-rm' else 'Policy'} trained with rlcd {stage}", "Base model", "Training data",
                        "Command line", "Key settings", "Metrics at save time", "Input format", *(["Sampling"] if stage == "sft" else []), "Use"]
    assert not [t for t in tokens if "html" in t.type or any("html" in c.type for c in t.children or [])]
    code = "\n".join(t.content for t in tokens if t.type == "fence")
    for hostile in (HOSTILE, f"a`b``c{HOSTILE}.csv", f"data/{HOSTILE}.csv"):
        assert hostile in code
    assert "base_model:" not in text.split("---")[1]  # not a hub id: no model-hub metadata
    assert "lora: True" in code and "train_loss: 0.25" in code


def test_model_card_names_a_hub_base_model_in_its_metadata(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["rlcd", "train-rm"])
    card = artifacts.Card(stage="train-rm", base_model="Qwen/Qwen2.5-0.5B", base_path="Qwen/Qwen2.5-0.5B", data=[], settings={}, metrics={})
    artifacts.write_model_card(tmp_path, word_tokenizer(), card)
    front = (tmp_path / "README.md").read_text().split("---")[1]
    assert "base_model: Qwen/Qwen2.5-0.5B" in front and "pipeline_tag: text-classification" in front


def card_snippet(readme: Path, language: str) -> str:
    """The card's code block of one language, with MODEL_DIR filled in."""
    import markdown_it

    blocks = [t.content for t in markdown_it.MarkdownIt("commonmark").parse(readme.read_text()) if t.type == "fence" and t.info == language]
    return blocks[0].replace("MODEL_DIR", str(readme.parent))
