"""Outputs on test prompts: format-prompts, generate (contract, determinism, resume), postprocess.

Generation runs a tiny random Llama with the default model's tokenizer on CPU; sampled outputs are
reproducible there (same seed, same device type), so equality across batch sizes and resume is exact.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from rlcd.cli import main
from rlcd.generate import postprocess

GEN_FLAGS = ["--max-new-tokens", "8", "--engine", "hf"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def dialogue_line(i: int) -> str:
    chosen = f"\n\nHuman: question number {i}?\n\nAssistant: answer {i}"
    return json.dumps({"chosen": chosen, "rejected": chosen + " (worse)"})


@pytest.fixture
def hh_file(tmp_path) -> Path:
    """An hh-rlhf style test file of 2100 dialogues; lines 3 and 1500 (indices 2 and 1499) are broken."""
    lines = [dialogue_line(i) for i in range(2100)]
    lines[2] = "{not json"
    lines[1499] = json.dumps({"chosen": "Human: no assistant turn here", "rejected": "x"})
    path = tmp_path / "test.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def run_cli(argv, capsys) -> list[str]:
    main(argv)
    return capsys.readouterr().out.strip().splitlines()


# ---------------------------------------------------------------------------------------------
# postprocess
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, clean",
    [
        (" Sure, here it is.\n\nHuman: thanks", "Sure, here it is."),
        ("Assistant: I can help.", "I can help."),
        ("  assistant : lower case tag", "lower case tag"),
        ("USER: shouting tag\nHuman: next", "shouting tag"),
        ("Assistant (harmless response): descriptor tag", "descriptor tag"),
        ("First line.\nUser: a new turn\nAssistant: more", "First line."),
        ("I said hi. Human: inline turn", "I said hi."),
        ("Humanity is great: yes.", "Humanity is great: yes."),  # not a tag
        ("the superuser: root", "the superuser: root"),  # inside a word: not a tag
        ("\n\nHuman: nothing before", ""),
        ("  plain text  \n", "plain text"),
    ],
)
def test_postprocess(raw, clean):
    assert postprocess(raw) == clean
    assert postprocess(clean) == clean  # idempotent


def test_postprocess_command_rewrites_outputs(tmp_path, capsys):
    src = tmp_path / "out.json"
    src.write_text(json.dumps([{"instruction": "Human: hi\n\nAssistant:", "output": "Assistant: hello\nUser: bye", "index": 7}]))
    lines = run_cli(["postprocess", "--in-file", str(src), "--out-file", str(tmp_path / "clean.json")], capsys)
    assert lines[-1] == str(tmp_path / "clean.json")
    assert "1 changed" in lines[0]
    assert json.loads((tmp_path / "clean.json").read_text()) == [{"instruction": "Human: hi\n\nAssistant:", "output": "hello", "index": 7}]


def test_postprocess_bad_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(SystemExit) as e:
        main(["postprocess", "--in-file", str(bad), "--out-file", str(tmp_path / "o.json")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "item 0: field 'output' missing" in err[0]


# ---------------------------------------------------------------------------------------------
# format-prompts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split, first, last, count", [("dev", 0, 999, 999), ("test", 1000, 1999, 999), ("all", 0, 2099, 2098)])
def test_format_prompts_splits_and_counts_skips(tmp_path, hh_file, capsys, split, first, last, count):
    out = tmp_path / f"{split}.json"
    lines = run_cli(["format-prompts", "--data-path", str(hh_file), "--out-file", str(out), "--split", split], capsys)
    items = json.loads(out.read_text())
    assert len(items) == count and items[0]["index"] == first and items[-1]["index"] == last
    assert items[-1] == {"instruction": f"Human: question number {last}?\n\nAssistant:", "input": "", "index": last}
    assert all(x["index"] not in (2, 1499) for x in items)
    assert lines[-1] == str(out) and "skipped lines: {" in lines[0]
    manifest = json.loads(out.with_name(out.name + ".manifest.json").read_text())
    assert sum(manifest["counts"]["skipped"].values()) == 2  # both broken lines, whichever split


def test_format_prompts_max_instances_and_plain_list(tmp_path, capsys):
    plain = tmp_path / "q.json"
    plain.write_text(json.dumps(["How do I bake bread?", "", "Why is the sky blue?", "Name a color."]))
    out = tmp_path / "p.json"
    run_cli(["format-prompts", "--data-path", str(plain), "--out-file", str(out), "--max-instances", "2"], capsys)
    items = json.loads(out.read_text())
    assert [x["index"] for x in items] == [0, 2]  # the empty item is skipped, indices stay file positions
    assert items[1]["instruction"] == "Human: Why is the sky blue?\n\nAssistant:"


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def test_prompts(tmp_path, hh_file, capsys) -> Path:
    out = tmp_path / "prompts.json"
    run_cli(["format-prompts", "--data-path", str(hh_file), "--out-file", str(out), "--split", "test", "--max-instances", "6"], capsys)
    return out


def run_generate(model, prompts, out, capsys, *extra) -> list[dict]:
    lines = run_cli(["generate", "--model", str(model), "--prompts", str(prompts), "--out-file", str(out), *GEN_FLAGS, *extra], capsys)
    assert lines[-1] == str(out)
    return json.loads(Path(out).read_text())


def test_generate_writes_the_contract_and_is_deterministic(tmp_path, tiny_model_dir, test_prompts, capsys):
    outputs = run_generate(tiny_model_dir, test_prompts, tmp_path / "a.json", capsys, "--batch-size", "2", "--seed", "1")
    prompts = json.loads(test_prompts.read_text())
    assert [o["index"] for o in outputs] == [p["index"] for p in prompts] == list(range(1000, 1006))
    for o, p in zip(outputs, prompts):
        assert list(o) == ["instruction", "output", "raw_output", "finish_reason", "num_tokens", "index"]
        assert o["instruction"] == p["instruction"]
        assert o["output"] == postprocess(o["raw_output"])
        assert o["finish_reason"] in ("stop", "eos", "length") and 1 <= o["num_tokens"] <= 8
    # seeds come from --seed and the prompt index: another batch size gives the same outputs
    assert run_generate(tiny_model_dir, test_prompts, tmp_path / "b.json", capsys, "--batch-size", "5", "--seed", "1") == outputs
    other_seed = run_generate(tiny_model_dir, test_prompts, tmp_path / "c.json", capsys, "--seed", "2")
    assert [o["raw_output"] for o in other_seed] != [o["raw_output"] for o in outputs]
    manifest = json.loads((tmp_path / "a.json.manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["outputs"] == 6 and manifest["engine"]["engine"] == "hf"


def test_resume_after_a_partial_progress_file_equals_the_uninterrupted_run(tmp_path, tiny_model_dir, test_prompts, capsys):
    full = run_generate(tiny_model_dir, test_prompts, tmp_path / "full.json", capsys, "--batch-size", "1")
    progress = (tmp_path / "full.json.progress.jsonl").read_text().splitlines()
    assert json.loads(progress[0])["settings"] == {"model": tiny_model_dir, "seed": 42, "max_new_tokens": 8, "temperature": 1.0,
                                                   "top_p": 0.9, "top_k": 0, "stop": "\n\nHuman:"}
    # an interrupted run: the settings line, two finished batches and a torn third line
    (tmp_path / "part.json.progress.jsonl").write_text("\n".join(progress[:3]) + "\n" + progress[3][:20])
    resumed = run_generate(tiny_model_dir, test_prompts, tmp_path / "part.json", capsys, "--batch-size", "4")
    assert resumed == full
    records = [json.loads(x) for x in (tmp_path / "part.json.progress.jsonl").read_text().splitlines()[1:]]
    assert sorted(r["index"] for r in records) == list(range(1000, 1006))  # nothing duplicated
    assert json.loads((tmp_path / "part.json.manifest.json").read_text())["counts"]["generated_this_run"] == 4
    # a finished run re-run generates nothing and writes the same file
    assert run_generate(tiny_model_dir, test_prompts, tmp_path / "part.json", capsys) == full
    assert json.loads((tmp_path / "part.json.manifest.json").read_text())["counts"]["generated_this_run"] == 0


def test_progress_of_other_settings_is_refused(tmp_path, tiny_model_dir, test_prompts, capsys):
    run_generate(tiny_model_dir, test_prompts, tmp_path / "o.json", capsys, "--max-instances", "1")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", tiny_model_dir, "--prompts", str(test_prompts), "--out-file", str(tmp_path / "o.json"),
              *GEN_FLAGS, "--top-p", "0.5"])
    assert e.value.code == 2
    assert "made with other settings (top_p)" in capsys.readouterr().err


def test_generate_reads_hh_rlhf_and_outputs_files(tmp_path, tiny_model_dir, hh_file, test_prompts, capsys):
    first = run_generate(tiny_model_dir, test_prompts, tmp_path / "a.json", capsys)
    # an outputs file as prompts: same prompts, same indices, so the same samples
    assert run_generate(tiny_model_dir, tmp_path / "a.json", tmp_path / "b.json", capsys) == first
    from_hh = run_generate(tiny_model_dir, hh_file, tmp_path / "c.json", capsys, "--max-instances", "3")
    assert [o["index"] for o in from_hh] == [0, 1, 3]  # line 3 is broken: skipped, counted
    manifest = json.loads((tmp_path / "c.json.manifest.json").read_text())
    assert sum(manifest["counts"]["skipped"].values()) == 2


def test_generate_loads_a_lora_adapter_directory(tmp_path, tiny_model_dir, test_prompts, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # a fresh LoRA adapter is the identity (B = 0), so it must generate what its base model does
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "adapter")
    base = run_generate(tiny_model_dir, test_prompts, tmp_path / "base.json", capsys, "--max-instances", "2")
    assert run_generate(tmp_path / "adapter", test_prompts, tmp_path / "lora.json", capsys, "--max-instances", "2") == base


@pytest.mark.parametrize("flag, value, message", [
    ("--top-p", "0", "--top-p must be in (0, 1]"),
    ("--batch-size", "0", "--batch-size must be at least 1"),
    ("--temperature", "-1", "--temperature must be in [0, 100]"),
])
def test_bad_settings_are_one_line_errors(tmp_path, test_prompts, capsys, flag, value, message):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompts", str(test_prompts), "--out-file", str(tmp_path / "o.json"), flag, value])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_model_directory_is_one_line_error(tmp_path, test_prompts, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(tmp_path / "nope"), "--prompts", str(test_prompts), "--out-file", str(tmp_path / "o.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model" in err[0]


@pytest.mark.slow
def test_default_model_outputs_do_not_depend_on_batch_size(tmp_path, default_model_path, capsys):
    from conftest import EXAMPLE_PROMPTS

    # fp32: under bf16 (auto on CPUs that compute it natively, and on GPUs) padding changes rounding, hence near-tie tokens
    one = run_generate("smollm2", EXAMPLE_PROMPTS, tmp_path / "a.json", capsys, "--max-instances", "3", "--batch-size", "1",
                       "--max-new-tokens", "24", "--dtype", "float32")
    assert run_generate("smollm2", EXAMPLE_PROMPTS, tmp_path / "b.json", capsys, "--max-instances", "3", "--batch-size", "3",
                        "--max-new-tokens", "24", "--dtype", "float32") == one
    assert all(o["raw_output"].strip() and o["output"] == postprocess(o["raw_output"]) for o in one)
