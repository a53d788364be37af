import gzip
import json

import pytest
from conftest import HARMLESS_TEST, need_shared_data

from rlcd import dialogue
from rlcd.files import UserError

DIALOGUE = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour and water."


def test_prompt_is_chosen_cut_after_last_assistant_marker():
    assert dialogue.prompt_from_dialogue(DIALOGUE) == (
        "Human: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: How do I bake bread?\n\nAssistant:"
    )
    with pytest.raises(ValueError, match="no 'Assistant:'"):
        dialogue.prompt_from_dialogue("\n\nHuman: only a question")


def test_contrast_prompts_put_descriptor_on_final_marker_and_opposite_on_earlier_ones():
    prompt = dialogue.prompt_from_dialogue(DIALOGUE)
    plus, minus = dialogue.contrast_prompts(prompt, "(good)", "(bad)")
    assert plus == "Human: Hi there\n\nAssistant (bad): Hello! How can I help?\n\nHuman: How do I bake bread?\n\nAssistant (good):"
    assert minus == "Human: Hi there\n\nAssistant (good): Hello! How can I help?\n\nHuman: How do I bake bread?\n\nAssistant (bad):"
    one_turn = dialogue.wrap_question("Why is the sky blue?")
    assert dialogue.contrast_prompts(one_turn, "(good)", "(bad)") == (
        "Human: Why is the sky blue?\n\nAssistant (good):", "Human: Why is the sky blue?\n\nAssistant (bad):")


@pytest.mark.parametrize("text, finish, accept_eos, expected", [
    (" Sure, here it is.\n\nHuman: thanks", "stop", False, "Sure, here it is."),
    (" Line one.\nLine two.\n\nHuman:", "stop", False, "Line one.\nLine two."),
    (" Human rights matter.\nYes.\n\nHuman:", "stop", False, "Human rights matter.\nYes."),  # mid-line 'Human' is no turn
    (" never ends", "length", False, None),
    (" ends at eos", "eos", False, None),
    (" ends at eos", "eos", True, "ends at eos"),
    (" Assistant: the real reply\n\nHuman:", "stop", False, "the real reply"),
    (" junk\nAssistant (harmless response): reply\n\nHuman:", "stop", False, "reply"),
    ("\n\nHuman: nothing before", "stop", False, None),
    (" use `rm -rf`\n\nHuman:", "stop", False, None),
])
def test_acceptance_filter(text, finish, accept_eos, expected):
    response, reason = dialogue.filter_completion(text, finish, accept_eos)
    assert response == expected, reason


def test_filter_reasons_are_named():
    assert dialogue.filter_completion(" x", "length")[1] == "no Human turn within max_new_tokens"
    assert dialogue.filter_completion("\nHuman:", "stop")[1] == "empty"
    assert dialogue.filter_completion(" a\\b\n\nHuman:", "stop")[1] == "banned string"


def test_load_prompts_counts_and_locates_bad_lines(tmp_path):
    path = tmp_path / "p.jsonl.gz"
    lines = [
        json.dumps({"chosen": DIALOGUE, "rejected": DIALOGUE}),
        "{not json",
        json.dumps({"chosen": 5}),
        json.dumps({"chosen": "\n\nHuman: no answer marker"}),
        "",
        json.dumps({"chosen": DIALOGUE, "rejected": "x"}),
        json.dumps("a plain question?"),
        json.dumps(["wrong type"]),
    ]
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    prompts = dialogue.load_prompts(path, dedupe=True)
    assert [i for i, _ in prompts.items] == [0, 5]  # indices are positions among non-blank lines
    assert prompts.items[1][1] == "Human: a plain question?\n\nAssistant:"
    assert sum(prompts.skipped.values()) == 5
    assert prompts.skipped["duplicate"] == 1
    assert any(e.startswith(f"{path}:2: not JSON") for e in prompts.examples)
    assert any(e.startswith(f"{path}:3: field 'chosen' is not text") for e in prompts.examples)


def test_load_prompts_plain_list_and_exclude(tmp_path):
    plain = tmp_path / "q.json"
    plain.write_text(json.dumps(["How do I bake bread?", "Hi there", "  "]))
    exclude = tmp_path / "test.jsonl"
    exclude.write_text(json.dumps({"chosen": DIALOGUE}) + "\n")
    prompts = dialogue.load_prompts(plain, exclude=exclude)
    assert prompts.items == [(0, "Human: How do I bake bread?\n\nAssistant:")]
    assert prompts.skipped == {"excluded (also in the exclude file)": 1, "empty prompt": 1}
    bad = tmp_path / "bad.json"
    bad.write_text("{\n  oops")
    with pytest.raises(UserError, match=r"bad.json:2: not valid JSON"):
        dialogue.load_prompts(bad)


def test_load_real_hh_rlhf_test_split():
    need_shared_data()
    prompts = dialogue.load_prompts(HARMLESS_TEST)
    assert len(prompts.items) == 2312 and not prompts.skipped
    assert all(p.startswith("Human:") and p.endswith("Assistant:") for _, p in prompts.items)
    assert sum(not p.endswith("\n\nAssistant:") for _, p in prompts.items) == 1  # line 1561: "  \nAssistant:"
    multi = sum(p.count("\n\nAssistant:") > 1 for _, p in prompts.items)
    assert multi == 1650  # SOURCES.md: multi-turn rows


def test_judge_prompt_ends_in_open_parenthesis():
    text = dialogue.judge_prompt("Human: q\n\nAssistant:", "Which is better?", " first ", "second")
    assert text.endswith("The answer is: (")
    assert "(A) first\n\n\n\n(B) second" in text


def test_chat_messages_carry_descriptor_as_system_message():
    prompt = dialogue.prompt_from_dialogue(DIALOGUE)
    messages = dialogue.chat_messages(prompt, "(kind response)")
    assert messages[0] == {"role": "system", "content": "Write the assistant's next reply. The reply is: kind response."}
    assert [m["role"] for m in messages[1:]] == ["user", "assistant", "user"]
    assert messages[-1]["content"] == "How do I bake bread?"
