"""Baselines through TRL: context distillation (sft), DPO and RLOO on a tiny random Llama (CPU, seconds).

Each trains a few steps through the CLI and must leave a checkpoint that `rlcd generate` loads;
the SFT tests also check what the loss covers and that a distilled target is really learned.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from rlcd import baselines
from rlcd.cli import main, parse
from rlcd.dialogue import END_MARKER
from rlcd.reward import format_rm_input

FAST = ["--batch-size", "2", "--gradient-accumulation-steps", "1", "--bf16", "false", "--save-steps", "0"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_table(path: Path, rows: list[dict]) -> Path:
    columns = list(rows[0])
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def preference_rows() -> list[dict]:
    """Every preferred output is 'great great great', in either slot; one row has an empty response."""
    rows = []
    for i in range(8):
        good, bad = "great great great", f"awful reply number {i}"
        pair = dict(output_1=good, output_2=bad, preference=1) if i % 2 else dict(output_1=bad, output_2=good, preference=2)
        rows.append({"instruction": f"Human: tell me about thing {i}\n\nAssistant:", "input": "", **pair})
    rows.append({"instruction": "Human: x\n\nAssistant:", "input": "", "output_1": "", "output_2": "y", "preference": 1})
    return rows


@pytest.fixture
def table(tmp_path) -> Path:
    return write_table(tmp_path / "prefs.csv", preference_rows())


@pytest.fixture(scope="module")
def distilled(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama after `rlcd sft` on the table above, at a learning rate that memorises the target."""
    work = tmp_path_factory.mktemp("sft")
    main(["sft", "--data", str(write_table(work / "prefs.csv", preference_rows())), "--model", tiny_model_dir,
          "--out-dir", str(work / "model"), *FAST, "--batch-size", "4", "--learning-rate", "1e-2", "--max-steps", "60"])
    return work / "model"


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"instruction": f"Human: tell me about thing {i}\n\nAssistant:", "input": "", "index": i} for i in range(4)]))
    return path


@pytest.fixture(scope="session")
def tiny_reward_model(tiny_model_dir, tmp_path_factory) -> str:
    """A random one-output sequence classifier on the tiny Llama's shape and tokenizer."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    config = AutoConfig.from_pretrained(tiny_model_dir, num_labels=1)
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("tiny-rm")
    LlamaForSequenceClassification(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return str(out)


def parsed(stage: str, argv: list[str]):
    """The config `rlcd <stage>` would run with (defaults filled in as `run` does)."""
    args = parse([stage, *argv])
    args.learning_rate = args.learning_rate or baselines.LEARNING_RATES[stage][0]
    args.bf16 = False
    return args


def generate_outputs(model_dir, prompts_file, out: Path, capsys, *extra) -> list[dict]:
    main(["generate", "--model", str(model_dir), "--prompts", str(prompts_file), "--out-file", str(out), "--engine", "hf",
          "--max-new-tokens", "12", *extra])
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------
# pure helpers
# ---------------------------------------------------------------------------------------------


def test_examples_take_the_preferred_output_as_target():
    rows = [{"prompt": "Human: hi\n\nAssistant:", "output_1": "bad", "output_2": " good ", "preference": 2, "win2_prob": 0.8}]
    assert baselines.sft_examples(rows, "</s>") == [{"prompt": "Human: hi\n\nAssistant:", "completion": " good\n\nHuman:</s>"}]
    assert baselines.dpo_examples(rows, "</s>") == [
        {"prompt": "Human: hi\n\nAssistant:", "chosen": " good\n\nHuman:</s>", "rejected": " bad\n\nHuman:</s>"}]


def test_marker_rewards_score_the_cut_response_and_penalize_the_rest():
    seen = []

    def score(texts):
        seen.extend(texts)
        return [float(len(t)) for t in texts]

    prompts = ["Human: a\n\nAssistant:"] * 4
    completions = [" fine answer\n\nHuman: more text", " never ends", " \n\nHuman: empty before the marker", " two\n\nHuman:\n\nHuman:"]
    rewards, penalized = baselines.marker_rewards(prompts, completions, score)
    assert seen == [format_rm_input(prompts[0], " fine answer"), format_rm_input(prompts[0], " two")]
    assert rewards == [float(len(seen[0])), -1.0, -1.0, float(len(seen[1]))] and penalized == 2
    assert all(t.endswith(END_MARKER) and t.count(END_MARKER) == 1 for t in seen)


# ---------------------------------------------------------------------------------------------
# sft (context distillation)
# ---------------------------------------------------------------------------------------------


def test_sft_loss_covers_the_completion_only(tmp_path, tiny_model_dir, table):
    args = parsed("sft", ["--data", str(table), "--model", tiny_model_dir, "--out-dir", str(tmp_path / "o"), *FAST])
    trainer, tokenizer, _, counts, example = baselines.build_sft(args, tmp_path / "o", bf16=False)
    assert example == "Human: tell me about thing 0\n\nAssistant:"
    assert counts["examples"] == 8 and counts["skipped_rows"] == {"empty response": 1}
    example = trainer.train_dataset[0]
    batch = trainer.data_collator([example])  # what the loss sees
    input_ids, labels = batch["input_ids"][0], batch["labels"][0]
    trained = input_ids[labels != -100].tolist()
    masked = input_ids[labels == -100].tolist()
    assert tokenizer.decode(masked) == "Human: tell me about thing 0\n\nAssistant:"  # row 0 prefers output_2
    assert tokenizer.decode(trained) == " great great great\n\nHuman:" + tokenizer.eos_token
    assert labels[: len(masked)].eq(-100).all()  # the prompt comes first, all of it masked


def test_sft_learns_the_target_and_its_checkpoint_loads_in_generate(tmp_path, distilled, prompts_file, capsys):
    out_dir = distilled
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["train_steps"] == 60 and metrics["counts"]["examples"] == 8
    losses = [e["loss"] for e in metrics["log"] if "loss" in e]
    assert losses[0] > 5 and losses[-1] < 0.5
    assert json.loads((out_dir / "manifest.json").read_text())["stage"] == "sft"
    assert not (out_dir / "checkpoints").exists()
    # greedy decoding of the distilled model gives the preferred output and stops at the end marker
    outputs = generate_outputs(out_dir, prompts_file, tmp_path / "out.json", capsys, "--temperature", "0")
    assert [o["output"] for o in outputs] == ["great great great"] * 4
    assert all(o["finish_reason"] == "stop" and o["raw_output"] == " great great great\n\nHuman:" for o in outputs)


def test_sft_resumes_from_its_last_checkpoint(tmp_path, tiny_model_dir, table, monkeypatch):
    from transformers import TrainerCallback

    steps = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2 and steps == [1, 2]:
                raise KeyboardInterrupt  # right after the first checkpoint

    build = baselines.BUILDERS["sft"]

    def watched(*a, **k):
        trainer, *rest = build(*a, **k)
        trainer.add_callback(Watch())
        return (trainer, *rest)

    out_dir = tmp_path / "sft"
    argv = ["sft", "--data", str(table), "--model", tiny_model_dir, "--out-dir", str(out_dir), *FAST, "--save-steps", "2", "--max-steps", "4"]
    monkeypatch.setitem(baselines.BUILDERS, "sft", watched)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 130 and (out_dir / "checkpoints" / "checkpoint-2").is_dir()
    with pytest.raises(SystemExit) as e:
        main(argv)  # without --resume an earlier run is never overwritten
    assert e.value.code == 2
    main(argv + ["--resume"])
    assert steps == [1, 2, 3, 4]  # the resumed run trained steps 3 and 4 only
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["train_steps"] == 4 and [e["step"] for e in metrics["log"] if "loss" in e] == [1]
    assert json.loads((out_dir / "manifest.json").read_text())["resumed_from"].endswith("checkpoint-2")


# ---------------------------------------------------------------------------------------------
# dpo, rloo
# ---------------------------------------------------------------------------------------------


def changed_weights(base_dir, trained_dir) -> bool:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(trained_dir).state_dict()
    return any(not torch.equal(base[k], trained[k]) for k in base)


def test_dpo_trains_and_writes_a_loadable_checkpoint(tmp_path, tiny_model_dir, table, prompts_file, capsys):
    out_dir = tmp_path / "dpo"
    main(["dpo", "--data", str(table), "--model", tiny_model_dir, "--out-dir", str(out_dir), *FAST, "--max-steps", "2",
          "--learning-rate", "1e-3"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out_dir)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["train_steps"] == 2 and metrics["counts"]["pairs"] == 8
    assert any("rewards/chosen" in e for e in metrics["log"])  # TRL's DPO log
    assert changed_weights(tiny_model_dir, out_dir)
    assert len(generate_outputs(out_dir, prompts_file, tmp_path / "out.json", capsys)) == 4


def test_dpo_with_lora_saves_a_merged_model(tmp_path, tiny_model_dir, table):
    out_dir = tmp_path / "dpo-lora"
    main(["dpo", "--data", str(table), "--model", tiny_model_dir, "--out-dir", str(out_dir), *FAST, "--max-steps", "2",
          "--lora", "--lora-r", "4", "--learning-rate", "1e-2"])
    assert (out_dir / "config.json").exists() and not (out_dir / "adapter_config.json").exists()
    assert changed_weights(tiny_model_dir, out_dir)
    assert "LoRA adapters were trained and merged into these weights" in (out_dir / "README.md").read_text()


def test_rloo_trains_against_the_reward_model(tmp_path, distilled, tiny_reward_model, prompts_file, capsys):
    # from the distilled model many completions end their turn with the marker and get a reward-model score,
    # others do not (-1), so the leave-one-out advantages are not all zero
    out_dir = tmp_path / "rloo"
    main(["rloo", "--prompts", str(prompts_file), "--reward-model", tiny_reward_model, "--model", str(distilled),
          "--out-dir", str(out_dir), *FAST, "--batch-size", "8", "--num-generations", "4", "--max-new-tokens", "10",
          "--max-steps", "2", "--learning-rate", "1e-3"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out_dir)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["train_steps"] == 2 and metrics["counts"]["prompts"] == 4
    penalized = [e["penalized_frac"] for e in metrics["log"] if "penalized_frac" in e]
    assert penalized and 0 <= penalized[0] < 1  # some completions were scored by the reward model
    assert changed_weights(distilled, out_dir)
    assert len(generate_outputs(out_dir, prompts_file, tmp_path / "out.json", capsys)) == 4
    card = (out_dir / "README.md").read_text()
    assert f"{tiny_reward_model}\n    the reward model" in card and "prompts: 4" in card
    assert "Training rollouts were sampled at temperature 1, without top-p or top-k, at most 10 new tokens." in card


# ---------------------------------------------------------------------------------------------
# user errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["sft", "--learning-rate", "5"], "--learning-rate 5: expected a value in (0, 1)"),
    (["dpo", "--beta", "-1"], "--beta -1: expected a value in [0, 100]"),
    (["rloo", "--num-generations", "3", "--batch-size", "4", "--gradient-accumulation-steps", "1"], "must be a multiple of --num-generations (3)"),
    (["rloo", "--num-generations", "1"], "--num-generations must be at least 2"),
    (["sft"], "--data is required"),
])
def test_absurd_settings_are_refused(tmp_path, table, prompts_file, capsys, argv, message):
    inputs = ["--prompts", str(prompts_file), "--reward-model", "rm"] if argv[0] == "rloo" else ["--data", str(table)]
    if argv == ["sft"]:
        inputs = []
    with pytest.raises(SystemExit) as e:
        main([*argv, *inputs, "--out-dir", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_bad_table_and_paths_are_one_line_errors(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("instruction,output_1\nHuman: hi,x\n")
    cases = [
        (["sft", "--data", str(bad), "--model", tiny_model_dir], "missing columns"),
        (["dpo", "--data", str(tmp_path / "none.csv"), "--model", tiny_model_dir], "no such file"),
        (["rloo", "--prompts", str(bad), "--reward-model", tiny_model_dir, "--model", tiny_model_dir], "not a reward model"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            main([*argv, "--out-dir", str(tmp_path / "o")])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


# ---------------------------------------------------------------------------------------------
# the saved model directory: card, generation config, chat template; loading, serving, tracking
# ---------------------------------------------------------------------------------------------


def test_sft_directory_has_a_card_generation_config_and_the_training_chat_template(distilled, table):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    card = (distilled / "README.md").read_text()
    for needle in ("# Policy trained with rlcd sft", "prefs.csv\n    examples: 8; skipped_rows: {'empty response': 1}",
                   "train_steps: 60", "learning_rate: 0.01", "Human: tell me about thing 0\n\nAssistant:"):
        assert needle in card, needle
    config = GenerationConfig.from_pretrained(distilled)
    tokenizer = AutoTokenizer.from_pretrained(distilled)
    assert tokenizer.eos_token == "<|im_end|>" and config.eos_token_id == [tokenizer.eos_token_id]
    assert (config.do_sample, config.top_p, config.max_new_tokens) == (True, 0.9, 300)
    # stock transformers, the saved chat template and greedy decoding give the distilled reply, ended by EOS
    model = AutoModelForCausalLM.from_pretrained(distilled)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "tell me about thing 3"}], add_generation_prompt=True,
                                           return_tensors="pt")
    assert tokenizer.decode(inputs["input_ids"][0]) == "Human: tell me about thing 3\n\nAssistant:"
    out = model.generate(**inputs, do_sample=False, max_new_tokens=20)[0, inputs["input_ids"].shape[1]:]
    assert tokenizer.decode(out) == " great great great\n\nHuman:<|im_end|>"


def test_the_cards_python_snippet_runs(distilled, capsys):
    from test_artifacts import card_snippet

    torch.manual_seed(0)
    exec(card_snippet(distilled / "README.md", "python"), {})  # samples as generation_config.json says
    assert capsys.readouterr().out.strip().startswith("great great great")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_saved_policy_is_served_by_transformers_serve(distilled, tmp_path):
    """`transformers serve` (OpenAI-compatible) answers chat and text completions from the saved directory, offline."""
    import os
    import shutil
    import subprocess
    import time
    import urllib.request

    if shutil.which("transformers") is None:
        pytest.skip("needs the transformers command line")
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(["transformers", "serve", str(distilled), "--port", str(port), "--host", "127.0.0.1", "--device", "cpu"],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})

    def post(path: str, body: dict) -> dict:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())

    try:
        deadline = time.time() + 180
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "transformers serve did not start in 180 s"
                time.sleep(1)
        greedy = {"model": str(distilled), "max_tokens": 12, "temperature": 0.0, "seed": 0}
        chat = post("/v1/chat/completions", {**greedy, "messages": [{"role": "user", "content": "tell me about thing 5"}],
                                              "stop": ["\n\nHuman:"]})
        assert chat["choices"][0]["message"]["content"].removesuffix("\n\nHuman:") == " great great great"
        assert chat["choices"][0]["finish_reason"] == "stop"
        assert chat["usage"]["prompt_tokens"] == len(AutoTokenizer_ids(distilled, "Human: tell me about thing 5\n\nAssistant:"))
        text = post("/v1/completions", {**greedy, "prompt": "Human: tell me about thing 6\n\nAssistant:"})
        assert text["choices"][0]["text"].startswith(" great great great")
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def AutoTokenizer_ids(model_dir, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)(text).input_ids


def test_sft_reports_to_tensorboard_beside_the_model(tmp_path, tiny_model_dir, table, monkeypatch):
    pytest.importorskip("tensorboard", reason="needs the tensorboard package (in the test extra)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "elsewhere"))  # training points it beside the model; undone after
    out_dir = tmp_path / "sft"
    main(["sft", "--data", str(table), "--model", tiny_model_dir, "--out-dir", str(out_dir), *FAST, "--max-steps", "2",
          "--report-to", "tensorboard"])
    events = EventAccumulator(str(out_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1]  # logging_first_step; then every 10 steps
    assert not (out_dir / "checkpoints").exists()


def test_dpo_reports_to_weights_and_biases_offline(tmp_path, tiny_model_dir, table, monkeypatch):
    from wandb_offline import offline_env, offline_runs

    offline_env(monkeypatch, tmp_path)
    main(["dpo", "--data", str(table), "--model", tiny_model_dir, "--out-dir", str(tmp_path / "dpo"), *FAST, "--max-steps", "2",
          "--report-to", "wandb", "--run-name", "dpo-small"])
    [run] = offline_runs(tmp_path)
    assert (run["name"], run["project"]) == ("dpo-small", "rlcd")
    logged = [row for row in run["history"] if "train/loss" in row]
    assert logged and logged[0]["train/global_step"] == 1 and "train/rewards/chosen" in logged[0]


def test_training_args_from_a_config_file_or_json_reach_the_trainer(tmp_path, table):
    from trl import DPOConfig, SFTConfig

    from rlcd.api import command_line
    from rlcd.cli import parse
    from rlcd.reward import training_config

    config = tmp_path / "sft.yaml"
    config.write_text("training-args: {adam_beta2: 0.95, adam_epsilon: 1e-6}\nsave-total-limit: 3\nrun-name: small\n")
    args = parse(["sft", "--config", str(config), "--data", str(table), "--out-dir", str(tmp_path / "o"), "--learning-rate", "1e-3"])
    trl = training_config(SFTConfig, args, tmp_path / "checkpoints", bf16=False)
    assert (trl.adam_beta2, trl.adam_epsilon, trl.save_total_limit, trl.run_name, trl.report_to) == (0.95, 1e-6, 3, "small", [])
    # on the command line, a JSON object; applied last, so it wins over a flag
    args = parse(["dpo", "--data", str(table), "--out-dir", str(tmp_path / "o"), "--training-args", '{"adam_beta2": 0.9, "learning_rate": 0.5}',
                  "--learning-rate", "1e-3"])
    trl = training_config(DPOConfig, args, tmp_path / "checkpoints", bf16=False)
    assert (trl.adam_beta2, trl.learning_rate, trl.save_total_limit) == (0.9, 0.5, 1)
    # from the Python API, a dict
    args = parse(command_line("rloo", {"prompts": "p.json", "reward_model": "rm", "out_dir": str(tmp_path / "o"),
                                       "training_args": {"gradient_checkpointing": True, "adam_epsilon": 1e-6}}))
    assert args.training_args == {"gradient_checkpointing": True, "adam_epsilon": 1e-6}


def test_gradient_checkpointing_is_set_by_the_flag_or_training_args_under_either_transformers_name(tmp_path, table):
    import warnings

    from trl import SFTConfig

    from rlcd.cli import parse
    from rlcd.reward import training_config

    base = ["sft", "--data", str(table), "--out-dir", str(tmp_path / "o")]
    for extra, on in (([], False), (["--gradient-checkpointing"], True), (["--training-args", '{"gradient_checkpointing": true}'], True)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # the renamed fields warn that they go in transformers 6
            trl = training_config(SFTConfig, parse(base + extra), tmp_path / "checkpoints", bf16=False)
        assert trl.gradient_checkpointing is on and getattr(trl, "activation_checkpointing", on) is on  # TRL's own default is on
        assert (trl.gradient_checkpointing_kwargs or {}).get("use_reentrant", False) is False


@pytest.mark.parametrize("value, message", [
    ('{"learning_rat": 1}', "unknown TrainingArguments key 'learning_rat'"),
    ('{"output_dir": "x"}', "'output_dir' is rlcd's to set"),
    ("[1, 2]", "expected a mapping of TrainingArguments names to values, got list"),
    ("{adam_beta2: [1", "expected a mapping such as"),
    ("yaml", "key 'training-args': unknown TrainingArguments key 'gradient_checkpointng'"),
])
def test_bad_training_args_are_refused_in_one_line(tmp_path, table, capsys, value, message):
    if value == "yaml":
        (tmp_path / "c.yaml").write_text("training-args:\n  gradient_checkpointng: true\n")
        flags = ["--config", str(tmp_path / "c.yaml")]
    else:
        flags = ["--training-args", value]
    with pytest.raises(SystemExit) as e:
        main(["sft", "--data", str(table), "--out-dir", str(tmp_path / "o"), *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_report_to_a_package_that_is_missing_is_one_line_before_any_loading(tmp_path, table, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now fails as if it were not installed
    with pytest.raises(SystemExit) as e:
        main(["sft", "--data", str(table), "--model", "no/such-model", "--out-dir", str(tmp_path / "o"), "--report-to", "wandb"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "rlcd sft: error: this needs the optional package 'wandb': pip install wandb"


@pytest.mark.parametrize("stage", ["train-rm", "sft", "dpo", "rloo", "ppo"])
def test_every_training_command_shows_its_tracking_and_checkpoint_flags_with_defaults(stage, capsys):
    with pytest.raises(SystemExit) as e:
        main([stage, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--report-to {none,tensorboard,wandb}", "--run-name RUN_NAME", "--save-total-limit SAVE_TOTAL_LIMIT"):
        assert flag in text
    assert "(default: none)" in text and f"(default: {2 if stage == 'ppo' else 1})" in text
    assert ("--training-args TRAINING_ARGS" in text) == (stage != "ppo")  # PPO is ours, not a Trainer
