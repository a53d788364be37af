"""What a saved model directory carries besides its weights, for every training command (train-rm, sft,
dpo, rloo, ppo): a model card (README.md), a chat template in the tokenizer that lays messages out as the
model was trained, and for policies a generation_config.json (docs/formats.md#model-directories).

Every stage trains on raw hh-rlhf text, "Human: ...\\n\\nAssistant: ..." (docs/method.md §2), never on
the base model's chat template, so the saved template renders that text: `apply_chat_template` then
gives exactly a policy's training prompt, or a reward model's input (`reward.format_rm_input`).

The card quotes text that the user or the data chose (paths, the command line, prompts). All of it goes
into fenced code blocks whose fence is longer than any run of backticks inside (`text.code_block`), so no
backtick, HTML tag or "# heading" in it can change the page.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rlcd.files import atomic_write_text, now, share_files
from rlcd.text import code_block
from rlcd.version import __version__

EVAL_SAMPLING = {"temperature": 1.0, "top_p": 0.9, "top_k": 0, "max_new_tokens": 300}
"""`rlcd generate`'s defaults (docs/method.md §8): the settings every policy is evaluated with."""

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
"""End-of-turn tokens of common chat formats (ChatML, Llama 3, Gemma, Phi-3): stop ids wherever the tokenizer has one."""

KEY_SETTINGS = ("steps", "max_steps", "epochs", "learning_rate", "batch_size", "gradient_accumulation_steps", "rollouts",
                "minibatch_size", "num_generations", "kl", "kl_target", "beta", "reward_scaling", "temperature", "max_new_tokens",
                "max_length", "eval_pairs", "lora", "lora_r", "lora_alpha", "bf16", "dtype", "seed")


@dataclass
class Card:
    """What a model card says about one training run."""

    stage: str
    """the rlcd command that trained the model: train-rm, sft, dpo, rloo or ppo"""
    base_model: str
    """--model / --policy as given"""
    base_path: str
    """what it resolved to (the converted default model lives in the cache)"""
    data: list[tuple[str, str]]
    """(input file, what of it was used: counts, skips)"""
    settings: dict
    """the command's flags; KEY_SETTINGS of them are shown, all are in manifest.json"""
    metrics: dict
    """final figures known at save time"""
    example: str = ""
    """one training prompt (policies) or reward-model input, to show the layout on real data"""
    sampling: dict = field(default_factory=dict)
    """ppo and rloo: how the training rollouts were sampled"""


# --------------------------------------------------------------------------------------------------
# Chat template and generation config
# --------------------------------------------------------------------------------------------------


def chat_template(tokenizer, reward_model: bool = False) -> str:
    """A Jinja chat template that renders messages as the hh-rlhf text the model was trained on.

    Turns are "Human: ..." and "Assistant: ..." joined by a blank line (a system message, which training
    never had, is a plain first paragraph); the generation prompt is "\\n\\nAssistant:". A conversation
    that ends with an assistant message ends with the end marker, as in training: "\\n\\nHuman:" for a
    reward model (`format_rm_input`), and the marker plus EOS for a policy (the sft and dpo target).
    The BOS token is written where the tokenizer would add one, so tokenizing the rendered text reproduces
    the training ids.
    """
    bos = "{{- bos_token -}}" if tokenizer.bos_token_id is not None and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id] else ""
    end = "'\\n\\nHuman:'" if reward_model else "'\\n\\nHuman:' + eos_token"
    return (
        bos
        + "{%- set ns = namespace(sep='') -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{{- ns.sep + 'Human: ' + (message['content'] | trim) -}}"
        "{%- elif message['role'] == 'assistant' -%}{{- ns.sep + 'Assistant: ' + (message['content'] | trim) -}}"
        "{%- elif message['role'] == 'system' -%}{{- ns.sep + (message['content'] | trim) -}}"
        "{%- else -%}{{- raise_exception('roles are user, assistant and system, not ' + message['role']) -}}"
        "{%- endif -%}"
        "{%- set ns.sep = '\\n\\n' -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- ns.sep + 'Assistant:' -}}"
        "{%- elif messages and messages[-1]['role'] == 'assistant' -%}{{- " + end + " -}}"
        "{%- endif -%}"
    )


def stop_ids(eos_token_id, tokenizer) -> list[int]:
    """End-of-sequence ids to stop at: the model's own (one id or a list), the tokenizer's, and any chat end-of-turn token."""
    ids = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [] if eos_token_id is None else [eos_token_id]
    added = tokenizer.get_added_vocab()
    for extra in [tokenizer.eos_token_id, *(added[t] for t in END_OF_TURN if t in added)]:
        if extra is not None and extra not in ids:
            ids.append(extra)
    return ids


def write_generation_config(out_dir: Path, tokenizer) -> None:
    """generation_config.json of a saved policy: the evaluation's sampling settings and every stop id.

    Starts from the one `save_pretrained` copied from the base model, so its other fields are kept.
    """
    from transformers import GenerationConfig

    config = GenerationConfig.from_pretrained(out_dir) if (Path(out_dir) / "generation_config.json").exists() else GenerationConfig()
    config.update(do_sample=True, **EVAL_SAMPLING, eos_token_id=stop_ids(config.eos_token_id, tokenizer), pad_token_id=tokenizer.pad_token_id)
    config._from_model_config = False  # else generate() may rebuild it from config.json and drop these settings
    config.save_pretrained(out_dir)


def save_policy_files(out_dir: Path, tokenizer, card: Card) -> None:
    """Beside a saved policy's weights: its tokenizer with the training layout as chat template, generation_config.json, README.md."""
    tokenizer.chat_template = chat_template(tokenizer)
    tokenizer.save_pretrained(out_dir)
    write_generation_config(out_dir, tokenizer)
    write_model_card(out_dir, tokenizer, card)


# --------------------------------------------------------------------------------------------------
# The model card
# --------------------------------------------------------------------------------------------------


def write_model_card(out_dir: Path, tokenizer, card: Card) -> None:
    """README.md: base model, data, command line, key settings, final metrics, input format and how to load it."""
    reward_model = card.stage == "train-rm"
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", card.base_model) and not Path(card.base_model).exists()
    settings = "\n".join(f"{k}: {card.settings[k]}" for k in KEY_SETTINGS if card.settings.get(k) not in (None, False))
    metrics = "\n".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in card.metrics.items() if v is not None)
    base = card.base_model if card.base_path == card.base_model else f"{card.base_model}\n(resolved to {card.base_path})"
    parts = [
        "---\nlibrary_name: transformers\n"
        f"pipeline_tag: {'text-classification' if reward_model else 'text-generation'}\n"
        f"tags:\n- rlcd\n- {card.stage}\n" + (f"base_model: {card.base_model}\n" if hub_id else "") + "---",
        f"# {'Reward model' if reward_model else 'Policy'} trained with rlcd {card.stage}",
        f"Written by `rlcd {card.stage}` (rlcd {__version__}, [RLCD](https://arxiv.org/abs/2307.12950)) on {now()}. "
        + ("A sequence classifier with one output, the reward. " if reward_model else "A causal language model. ")
        + ("LoRA adapters were trained and merged into these weights, so this is a plain transformers checkpoint. "
           if card.settings.get("lora") else "")
        + "The full configuration and counts are in `manifest.json`.",
        "## Base model", code_block(base),
        "## Training data", code_block("\n".join(f"{path}\n    {used}" for path, used in card.data)),
        "## Command line", code_block(command_line(), "sh"),
        "## Key settings", code_block(settings or "(defaults)"),
        "## Metrics at save time", code_block(metrics or "(none)"),
        "## Input format", reward_model_format(tokenizer, card) if reward_model else policy_format(out_dir, tokenizer, card),
    ]
    atomic_write_text(Path(out_dir) / "README.md", "\n\n".join(parts) + "\n")
    share_files(Path(out_dir))  # the card is the last file of a saved model: the weights were written 0600


def command_line() -> str:
    """The command as run (`python -m rlcd ...` under `rlcd pipeline`)."""
    argv = ["python", "-m", "rlcd", *sys.argv[1:]] if sys.argv[0].endswith("__main__.py") else sys.argv
    return shlex.join(argv)


def reward_model_format(tokenizer, card: Card) -> str:
    return "\n\n".join(part for part in [
        "The reward is the single logit at the last token of: the prompt (hh-rlhf turns), one space, the response "
        "(stripped), and the end marker `\\n\\nHuman:`:",
        code_block("Human: {question}\n\nAssistant: {response}\n\nHuman:"),
        f"Inputs longer than the tokenizer's `model_max_length` ({tokenizer.model_max_length} tokens) are cut on the left, "
        "so the end marker, where the score is read, stays. The tokenizer's chat template renders this layout: a "
        "conversation ending with the assistant message to score gives exactly the input above. An input from the "
        "training data:",
        code_block(card.example or "(none)"),
        "## Use",
        code_block("from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
                   'model = AutoModelForSequenceClassification.from_pretrained("MODEL_DIR")\n'
                   'tokenizer = AutoTokenizer.from_pretrained("MODEL_DIR")\n'
                   'messages = [{"role": "user", "content": "How do I bake bread?"},\n'
                   '            {"role": "assistant", "content": "Mix flour, water and yeast."}]\n'
                   'inputs = tokenizer.apply_chat_template(messages, return_dict=True, return_tensors="pt")\n'
                   "print(model(**inputs).logits[0, 0].item())", "python"),
        "`rlcd score --reward-model MODEL_DIR` and `rlcd eval-rm --model-path MODEL_DIR` read it as is.",
    ] if part)


def policy_format(out_dir: Path, tokenizer, card: Card) -> str:
    sampled = card.sampling
    stops = json.loads((Path(out_dir) / "generation_config.json").read_text(encoding="utf-8"))["eos_token_id"]
    return "\n\n".join(part for part in [
        "Trained on raw dialogue text, not on the base model's chat template. A prompt is the dialogue so far, "
        "ending with the Assistant marker; the model writes a space and its reply, and ends its turn with the next "
        "`\\n\\nHuman:` marker" + (" followed by the end-of-sequence token" if card.stage in ("sft", "dpo") else "") + ":",
        code_block("Human: {first message}\n\nAssistant: {reply}\n\nHuman: {next message}\n\nAssistant:"),
        "The saved tokenizer's chat template renders messages in this layout "
        "(`apply_chat_template(messages, add_generation_prompt=True)`; the base model's own template, which training "
        "did not use, is replaced). Stop at the string `\\n\\nHuman:` and cut it off. A prompt from the training data:",
        code_block(card.example or "(none)"),
        "## Sampling",
        f"`generation_config.json` samples as `rlcd generate` evaluates policies (rlcd's docs/method.md §8): temperature "
        f"{EVAL_SAMPLING['temperature']:g}, top-p {EVAL_SAMPLING['top_p']:g}, top-k off, at most {EVAL_SAMPLING['max_new_tokens']} "
        "new tokens, stopping at any of these end-of-sequence tokens:",
        code_block("\n".join(f"{i}: {tokenizer.convert_ids_to_tokens(i)}" for i in stops)),
        (f"Training rollouts were sampled at temperature {sampled['temperature']:g}, without top-p or top-k, at most "
         f"{sampled['max_new_tokens']} new tokens." if sampled else ""),
        "## Use",
        code_block("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                   'model = AutoModelForCausalLM.from_pretrained("MODEL_DIR")\n'
                   'tokenizer = AutoTokenizer.from_pretrained("MODEL_DIR")\n'
                   'messages = [{"role": "user", "content": "How do I bake bread?"}]\n'
                   'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")\n'
                   'out = model.generate(**inputs, stop_strings=["\\n\\nHuman:"], tokenizer=tokenizer)\n'
                   'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).removesuffix("\\n\\nHuman:"))',
                   "python"),
        "Served by any OpenAI-compatible server that applies the tokenizer's chat template, e.g. (some servers, "
        "`transformers serve` among them, keep the stop string at the end of the reply: cut it off):",
        code_block("transformers serve MODEL_DIR --port 8000\n"
                   "curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\\n"
                   "  -d '{\"model\": \"MODEL_DIR\", \"messages\": [{\"role\": \"user\", \"content\": \"How do I bake bread?\"}], "
                   "\"stop\": [\"\\n\\nHuman:\"]}'", "sh"),
        "`rlcd generate --model MODEL_DIR` samples from it with the prompt layout above.",
    ] if part)

