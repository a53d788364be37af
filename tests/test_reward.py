"""Reward model: loss, scoring, train-rm / eval-rm / score on a tiny random Llama (CPU, seconds).

The tokenizer is a word-level one built here, so these tests need neither the network nor the
embedded GGUF. It adds a BOS token, like Llama's, to check that truncation keeps it.
"""

from __future__ import annotations

import gzip
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch

from rlcd import files, reward
from rlcd.cli import main
from rlcd.dialogue import END_MARKER
from rlcd.files import UserError
from rlcd.reward import (
    PairCollator,
    agreement,
    encode_texts,
    format_rm_input,
    load_reward_model,
    orient_pair,
    preference_loss,
    read_hh_pairs,
    score_texts,
)

WORDS = "apple river stone cloud music paper green quick lamp chair bread water light table window garden story dream night plate".split()
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TRAIN_FLAGS = ["--batch-size", "8", "--gradient-accumulation-steps", "1", "--learning-rate", "3e-3", "--bf16", "false"]


# ---------------------------------------------------------------------------------------------
# fixtures: a tiny tokenizer + random Llama, synthetic preference tables, hh-rlhf style files
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and two threads on a busy 2-core machine run 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def base_model(tmp_path_factory) -> str:
    """A random 2-layer Llama causal LM with a word-level tokenizer, saved like a hub checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", "Human", "Assistant", ":", "tell", "me", "about", "great", "awful"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]")
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def marker_rows(n: int, seed: int = 0, soft: bool = False) -> list[dict]:
    """Pairs whose better response always contains the word 'great', in random slots."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = f"Human: tell me about {rng.choice(WORDS)}\n\nAssistant:"
        good = rng.sample(WORDS, 3)
        good.insert(rng.randrange(4), "great")
        good, bad = " ".join(good), " ".join(rng.sample(WORDS, 4))
        row = {"instruction": prompt, "input": ""}
        if rng.random() < 0.5:
            row.update(output_1=good, output_2=bad, preference=1)
        else:
            row.update(output_1=bad, output_2=good, preference=2)
        if soft:
            row["win2_prob"] = round(0.9 if row["preference"] == 2 else 0.1, 3)
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def hh_line(question: str, chosen: str, rejected: str) -> dict:
    prefix = f"\n\nHuman: {question}\n\nAssistant:"
    return {"chosen": f"{prefix} {chosen}", "rejected": f"{prefix} {rejected}"}


def run_cli(argv: list[str], capsys) -> list[str]:
    main(argv)
    return capsys.readouterr().out.strip().splitlines()


@pytest.fixture(scope="module")
def trained_rm(base_model, tmp_path_factory) -> tuple[Path, dict]:
    """A reward model trained on the marker table: (out_dir, metrics)."""
    tmp = tmp_path_factory.mktemp("rm")
    table = write_jsonl(tmp / "table.jsonl", marker_rows(160))
    out = tmp / "rm"
    main(["train-rm", "--data", str(table), "--model", base_model, "--out-dir", str(out), "--eval-pairs", "40", "--epochs", "3", *TRAIN_FLAGS])
    return out, json.loads((out / "metrics.json").read_text())


# ---------------------------------------------------------------------------------------------
# format and loss
# ---------------------------------------------------------------------------------------------


def test_format_rm_input_joins_with_one_space_and_ends_with_marker():
    assert format_rm_input("Human: hi\n\nAssistant:", " Hello there.\n ") == "Human: hi\n\nAssistant: Hello there.\n\nHuman:"
    assert format_rm_input("Human: hi\n\nAssistant:", "Hello").endswith(END_MARKER)


def test_soft_label_loss_equals_hand_computed_bce():
    r_chosen, r_rejected, p = 1.3, -0.4, 0.7
    s = 1 / (1 + math.exp(-(r_chosen - r_rejected)))
    expected = -(p * math.log(s) + (1 - p) * math.log(1 - s))
    got = preference_loss(torch.tensor([r_chosen]), torch.tensor([r_rejected]), torch.tensor([p]))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_hard_label_loss_is_minus_logsigmoid():
    rc, rr = torch.tensor([0.5, -2.0, 3.0]), torch.tensor([0.1, 1.0, 3.0])
    got = preference_loss(rc, rr, torch.ones(3))
    assert got.item() == pytest.approx((-torch.nn.functional.logsigmoid(rc - rr)).mean().item(), rel=1e-6)


@pytest.mark.parametrize("preference,win2", [(1, 0.3), (2, 0.8), (1, 0.6)])
def test_oriented_pair_gives_the_spec_soft_loss_on_output2_minus_output1(preference, win2):
    row = {"prompt": "Human: q\n\nAssistant:", "output_1": "one", "output_2": "two", "preference": preference, "win2_prob": win2}
    chosen, rejected, p = orient_pair(row)
    r = {format_rm_input(row["prompt"], "one"): 0.2, format_rm_input(row["prompt"], "two"): 1.1}
    ours = preference_loss(torch.tensor([r[chosen]]), torch.tensor([r[rejected]]), torch.tensor([p]))
    spec = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([1.1 - 0.2]), torch.tensor([win2]))
    assert ours.item() == pytest.approx(spec.item(), rel=1e-6)


def test_hard_row_is_oriented_by_preference_with_target_one():
    row = {"prompt": "Human: q\n\nAssistant:", "output_1": "one", "output_2": "two", "preference": 2, "win2_prob": None}
    chosen, rejected, p = orient_pair(row)
    assert (chosen.endswith("two" + END_MARKER), rejected.endswith("one" + END_MARKER), p) == (True, True, 1.0)


def test_trainer_loss_carries_soft_target_through_the_collator(base_model, tmp_path):
    """The RewardTrainer subclass computes the BCE against chosen_prob from the batch, not TRL's hard loss."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification

    from rlcd.models import load_tokenizer

    tokenizer = load_tokenizer(base_model)
    model = AutoModelForSequenceClassification.from_pretrained(base_model, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    texts = [format_rm_input("Human: tell me about lamp\n\nAssistant:", t) for t in ("great lamp", "stone", "water light table", "dream")]
    ids, _ = encode_texts(tokenizer, texts, 64)
    cols = {"chosen_ids": ids[:2], "rejected_ids": ids[2:], "chosen_prob": [0.8, 0.3]}
    from rlcd.cli import parse

    # every train-rm setting at its default (as the command parses them), then the few this test needs
    args = parse(["train-rm", "--data", "t.csv", "--out-dir", str(tmp_path), "--batch-size", "2", "--gradient-accumulation-steps", "1",
                  "--learning-rate", "1e-3", "--epochs", "1", "--max-steps", "1", "--save-steps", "0", "--seed", "0"])
    trainer = reward.soft_label_reward_trainer()(
        model=model, args=reward.reward_config(args, tmp_path, bf16=False, has_eval=False),
        data_collator=PairCollator(tokenizer.pad_token_id), train_dataset=Dataset.from_dict(cols), processing_class=tokenizer,
    )
    batch = PairCollator(tokenizer.pad_token_id)([{k: v[i] for k, v in cols.items()} for i in range(2)])
    loss = trainer.compute_loss(model, batch)
    scores = score_texts(model, tokenizer, texts)
    expected = preference_loss(torch.tensor(scores[:2]), torch.tensor(scores[2:]), torch.tensor([0.8, 0.3]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_packed_pairs_give_the_plain_layouts_loss_and_gradients(base_model, tmp_path):
    """A pair in one row (its conversation once, each side's reply masked from the other) trains exactly as TRL's
    layout of two padded rows: the same loss and gradients, from fewer tokens."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification

    from rlcd.models import load_tokenizer
    from rlcd.reward_model import score_head

    tokenizer = load_tokenizer(base_model)
    model = AutoModelForSequenceClassification.from_pretrained(base_model, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    rng = random.Random(4)
    examples = []
    for k in range(3):
        prompt = "Human: " + " ".join(rng.choices(WORDS, k=rng.randint(10, 30))) + "\n\nAssistant:"
        sides = [format_rm_input(prompt, " ".join(rng.choices(WORDS, k=rng.randint(1, 9)))) for _ in range(2)]
        ids, _ = encode_texts(tokenizer, sides, 64)
        examples.append({"chosen_ids": ids[0], "rejected_ids": ids[1], "chosen_prob": [1.0, 0.7, 0.2][k]})
    args = reward.reward_config(reward.TrainRmConfig(data="t.csv", out_dir=str(tmp_path)), tmp_path, bf16=False, has_eval=False)
    trainer = reward.soft_label_reward_trainer()(model=model, args=args, processing_class=tokenizer,
                                                 data_collator=PairCollator(tokenizer.pad_token_id),
                                                 train_dataset=Dataset.from_list(examples))
    results = []
    for collator in (PairCollator(tokenizer.pad_token_id), PairCollator(tokenizer.pad_token_id, torch.float32)):
        batch = collator(examples)
        model.zero_grad()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()], batch["input_ids"].numel()))
    (plain_loss, plain_grads, plain_tokens), (packed_loss, packed_grads, packed_tokens) = results
    assert score_head(model) is model.score and "reads" in batch
    assert packed_loss == pytest.approx(plain_loss, rel=1e-5)
    for a, b in zip(plain_grads, packed_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert packed_tokens < plain_tokens


# ---------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------


def test_scores_keep_input_order_and_match_unbatched_scores(trained_rm):
    """Length sorting and right padding change nothing: each score is read at the text's last real token."""
    model, tokenizer = load_reward_model(str(trained_rm[0]))
    rng = random.Random(3)
    texts = [format_rm_input("Human: tell me about lamp\n\nAssistant:", " ".join(rng.choices(WORDS + ["great"], k=rng.randint(1, 12)))) for _ in range(11)]
    batched = score_texts(model, tokenizer, texts, batch_size=4)
    one_by_one = [score_texts(model, tokenizer, [t], batch_size=1)[0] for t in texts]
    assert batched == pytest.approx(one_by_one, abs=1e-5)
    assert len(set(round(s, 6) for s in batched)) > 1  # the check means something only if scores differ


@pytest.mark.parametrize("packs", [True, False])
def test_texts_that_begin_alike_share_a_row_and_score_as_alone(trained_rm, packs, monkeypatch):
    """Replies to one conversation are scored in one row (the conversation once) where the model has a head at every
    position, in rows of their own where it has not; either way each score is the text's own, read at its last token."""
    from rlcd import reward_model

    model, tokenizer = load_reward_model(str(trained_rm[0]))
    if not packs:
        monkeypatch.setattr(reward_model, "score_head", lambda model: None)
    rng = random.Random(8)
    texts = []
    for _ in range(4):
        prompt = "Human: " + " ".join(rng.choices(WORDS, k=rng.randint(16, 30))) + "\n\nAssistant:"
        texts += [format_rm_input(prompt, " ".join(rng.choices(WORDS + ["great"], k=rng.randint(1, 9)))) for _ in range(3)]
    texts += [format_rm_input("Human: x\n\nAssistant:", "great")]  # nothing shared
    rng.shuffle(texts)
    rows = []
    hook = model.model.register_forward_hook(lambda module, args, out: rows.append(len(out.last_hidden_state)))
    try:
        scores = score_texts(model, tokenizer, texts, batch_size=3)
    finally:
        hook.remove()
    assert sum(rows) <= 6 if packs else sum(rows) == len(texts)  # 4 conversations of 3 replies, and one text alone
    with torch.no_grad():
        for text, score in zip(texts, scores):
            alone = model(**tokenizer(text, return_tensors="pt")).logits[0, 0].item()
            assert score == pytest.approx(alone, abs=1e-5)


def test_identical_texts_get_identical_scores(trained_rm):
    model, tokenizer = load_reward_model(str(trained_rm[0]))
    text = format_rm_input("Human: tell me about lamp\n\nAssistant:", "great lamp")
    others = [format_rm_input("Human: x\n\nAssistant:", " ".join(WORDS[:k])) for k in range(1, 8)]
    scores = score_texts(model, tokenizer, [text] + others + [text], batch_size=3)
    assert scores[0] == scores[-1]


def test_truncation_keeps_bos_and_the_end_marker(base_model):
    from rlcd.models import load_tokenizer

    tokenizer = load_tokenizer(base_model)
    text = format_rm_input("Human: " + " ".join(WORDS) + "\n\nAssistant:", "great lamp")
    (ids,), cut = encode_texts(tokenizer, [text], 6)
    assert cut == {0} and len(ids) == 6
    assert tokenizer.convert_ids_to_tokens(ids) == ["[BOS]", ":", "great", "lamp", "Human", ":"]


def test_agreement_counts_ties_as_wrong():
    result = agreement([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, -1.0])
    assert result["accuracy"] == 0.5 and result["ties"] == 1
    expected_prob = sum(1 / (1 + math.exp(-d)) for d in (1.0, 0.0, -1.0, 1.0)) / 4
    assert result["mean_prob"] == pytest.approx(expected_prob)


def test_length_controls_separate_length_from_what_else_was_learned():
    prompt = "Human: hi\n\nAssistant:"
    pairs = [(format_rm_input(prompt, c), format_rm_input(prompt, r)) for c, r in [
        ("a much longer kind reply", "short"),  # chosen longer, not matched
        ("brief no", "a long rude reply here"),  # chosen shorter, not matched
        ("ten chars.", "nine char"),  # matched (9/10), chosen longer
        ("nine char", "ten chars."),  # matched, chosen shorter
    ]]
    # a model that only prefers length: right on pairs 0 and 2, wrong on 1 and 3
    scores_c, scores_r = [24.0, 8.0, 10.0, 9.0], [5.0, 22.0, 9.0, 10.0]
    out = reward.length_controls(pairs, scores_c, scores_r)
    assert out["length_only"] == 0.5 and out["chosen_longer_share"] == 0.5
    assert out["length_matched_pairs"] == 2
    assert out["length_matched"]["accuracy"] == 0.5 and out["length_matched"]["length_only"] == 0.5
    assert reward.response_of(pairs[1][0]) == "brief no"


def test_bootstrap_interval_contains_the_point_estimate_and_is_seeded():
    rng = random.Random(0)
    chosen = [rng.gauss(0.3, 1) for _ in range(300)]
    rejected = [rng.gauss(0, 1) for _ in range(300)]
    a, b = agreement(chosen, rejected, seed=5), agreement(chosen, rejected, seed=5)
    lo, hi = a["accuracy_ci95"]
    assert lo < a["accuracy"] < hi and hi - lo < 0.2
    assert a == b


# ---------------------------------------------------------------------------------------------
# train-rm
# ---------------------------------------------------------------------------------------------


def test_train_rm_learns_the_marker_word(trained_rm, capsys):
    out, metrics = trained_rm
    assert metrics["heldout"]["accuracy"] >= 0.9, metrics["heldout"]
    assert metrics["pairs"] == {"usable": 160, "train": 120, "heldout": 40, "soft_labelled": 0, "truncated_to_max_length": 0}
    assert metrics["train_loss"] < 0.6
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.json", "manifest.json"):
        assert (out / name).exists(), name
    # shareable: every file of the model directory has the user's umask mode (safetensors writes the weights 0600)
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()} == \
        {p.name: files.FILE_MODE for p in out.iterdir() if p.is_file()}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "train-rm" and manifest["counts"]["train_steps"] == metrics["train_steps"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] == 0
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 512


def test_train_rm_directory_has_a_card_and_a_chat_template_that_gives_the_scored_input(trained_rm, capsys):
    from test_artifacts import card_snippet
    from transformers import AutoTokenizer

    from rlcd.dialogue import chat_messages

    out, metrics = trained_rm
    card = (out / "README.md").read_text()
    assert "# Reward model trained with rlcd train-rm" in card and "160 usable pairs: 120 trained on, 40 held out" in card
    assert f"heldout_accuracy: {metrics['heldout']['accuracy']:.4g}" in card and "(512 tokens)" in card
    assert not (out / "generation_config.json").exists()  # a classifier does not generate
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt, response = "Human: tell me about apple\n\nAssistant:", " great river stone "
    messages = chat_messages(prompt, None) + [{"role": "assistant", "content": response}]
    ids = tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"]
    assert ids == encode_texts(tokenizer, [format_rm_input(prompt, response)], None)[0][0]  # [BOS] included once
    # the card's snippet gives the score rlcd score gives
    exec(card_snippet(out / "README.md", "python"), {})
    model, tokenizer = load_reward_model(str(out))
    [expected] = score_texts(model, tokenizer, [format_rm_input("Human: How do I bake bread?\n\nAssistant:", "Mix flour, water and yeast.")])
    assert float(capsys.readouterr().out.strip()) == pytest.approx(expected, abs=1e-5)


def test_train_rm_prints_out_dir_last_and_reports_skips(base_model, tmp_path, capsys):
    rows = marker_rows(30, soft=True)
    rows[3]["output_2"] = "   "  # empty response
    rows[5]["win2_prob"] = "nan"
    rows[6]["win2_prob"] = 1.5
    table = write_jsonl(tmp_path / "scored.jsonl", rows)
    out = tmp_path / "rm"
    lines = run_cli(["train-rm", "--data", str(table), "--model", base_model, "--out-dir", str(out), "--eval-pairs", "5", "--max-steps", "2",
                     *TRAIN_FLAGS], capsys)
    assert lines[-1] == str(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped"] == {"empty response": 1, "win2_prob not a number in [0, 1]": 2}
    assert metrics["pairs"]["usable"] == 27 and metrics["pairs"]["soft_labelled"] == 27
    assert metrics["train_steps"] == 2
    assert any("skipped rows" in line and "empty response" in line for line in lines)


def test_train_rm_soft_labels_learn_too(base_model, tmp_path):
    table = write_jsonl(tmp_path / "soft.jsonl", marker_rows(100, seed=2, soft=True))
    out = tmp_path / "rm"
    main(["train-rm", "--data", str(table), "--model", base_model, "--out-dir", str(out), "--eval-pairs", "30", "--epochs", "4", *TRAIN_FLAGS])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["heldout"]["accuracy"] >= 0.8
    # a 0.9 target caps how sure the model should be: its mean probability stays well below 1
    assert metrics["heldout"]["mean_prob"] < 0.97


def test_group_by_length_batches_pairs_of_similar_length_in_a_random_order(base_model, tmp_path, monkeypatch):
    """--group-by-length: each micro-batch is a run of the pairs sorted by length (the short remainder last), every pair
    once an epoch, the runs in an order that changes with the epoch; the padding computed is less than random batches'."""
    rng = random.Random(3)
    rows = [{**row, "output_1": " ".join(rng.choices(WORDS, k=rng.randrange(1, 30)))} for row in marker_rows(30, seed=3)]
    table = write_jsonl(tmp_path / "t.jsonl", rows)
    seen: list[list[int]] = []
    collate = PairCollator.__call__
    monkeypatch.setattr(PairCollator, "__call__", lambda self, ex: seen.append([max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in ex])
                        or collate(self, ex))

    def train(*flags: str) -> list[list[int]]:
        seen.clear()
        main(["train-rm", "--data", str(table), "--model", base_model, "--out-dir", str(tmp_path / f"rm{flags}"), "--eval-pairs", "0",
              "--epochs", "2", *TRAIN_FLAGS, *flags])
        return list(seen)

    grouped = train("--group-by-length")
    ordered = sorted((n for batch in grouped[:4] for n in batch), reverse=True)
    runs = [ordered[k : k + 8] for k in range(0, 30, 8)]
    for epoch in (grouped[:4], grouped[4:]):
        assert len(epoch) == 4 and sorted(map(sorted, epoch)) == sorted(map(sorted, runs)) and sorted(epoch[-1]) == sorted(runs[-1])
    assert grouped[:3] != grouped[4:7] or grouped[:3] != [runs[0], runs[1], runs[2]]  # not simply longest first, every epoch
    padded = lambda batches: sum(len(b) * max(b) for b in batches)  # noqa: E731
    assert padded(grouped) < 0.9 * padded(train())


def test_train_rm_lora_saves_a_merged_plain_model(base_model, tmp_path):
    table = write_jsonl(tmp_path / "t.jsonl", marker_rows(40))
    out = tmp_path / "rm"
    main(["train-rm", "--data", str(table), "--model", base_model, "--out-dir", str(out), "--eval-pairs", "8", "--max-steps", "3",
          "--lora", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--lora-target-modules", "q_proj,v_proj",
          "--gradient-checkpointing", *TRAIN_FLAGS])
    assert not (out / "adapter_config.json").exists()
    from safetensors.torch import load_file

    keys = load_file(out / "model.safetensors").keys()
    assert "score.weight" in keys and not any("lora" in k or "modules_to_save" in k for k in keys)
    model, tokenizer = load_reward_model(str(out))
    assert all(math.isfinite(s) for s in score_texts(model, tokenizer, ["Human: a\n\nAssistant: b" + END_MARKER]))


class _Interrupt(Exception):
    pass


def test_resume_after_interrupt_matches_an_uninterrupted_run(base_model, tmp_path, capsys, monkeypatch):
    table = write_jsonl(tmp_path / "t.jsonl", marker_rows(60))
    flags = ["--data", str(table), "--model", base_model, "--eval-pairs", "10", "--max-steps", "8", "--save-steps", "4", *TRAIN_FLAGS]

    main(["train-rm", *flags, "--out-dir", str(tmp_path / "straight")])

    make_trainer = reward.soft_label_reward_trainer

    def interrupting_trainer():
        base = make_trainer()

        class Interrupted(base):
            def training_step(self, *args, **kwargs):
                if self.state.global_step == 6:  # after checkpoint-4 was written
                    raise KeyboardInterrupt
                return super().training_step(*args, **kwargs)

        return Interrupted

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(reward, "soft_label_reward_trainer", interrupting_trainer)
    with pytest.raises(SystemExit) as exit_info:
        main(["train-rm", *flags, "--out-dir", str(resumed)])
    assert exit_info.value.code == 130
    assert (resumed / "checkpoints" / "checkpoint-4").is_dir() and not (resumed / "metrics.json").exists()
    monkeypatch.setattr(reward, "soft_label_reward_trainer", make_trainer)

    with pytest.raises(SystemExit):  # a second run must not silently overwrite the first
        main(["train-rm", *flags, "--out-dir", str(resumed)])
    assert "pass --resume" in capsys.readouterr().err

    main(["train-rm", *flags, "--out-dir", str(resumed), "--resume"])
    manifest = json.loads((resumed / "manifest.json").read_text())
    assert manifest["resumed_from"].endswith("checkpoint-4")
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "straight", resumed))
    assert b["train_steps"] == 8 and not (resumed / "checkpoints").exists()
    assert b["heldout"]["loss"] == pytest.approx(a["heldout"]["loss"], rel=1e-4)

    capsys.readouterr()
    lines = run_cli(["train-rm", *flags, "--out-dir", str(resumed), "--resume"], capsys)
    assert "already trained" in lines[0] and lines[-1] == str(resumed)


@pytest.mark.parametrize(
    "rows,message",
    [
        ([{"instruction": "p", "output_1": "a", "output_2": "b"}], "missing columns"),
        ([{"instruction": "p", "output_1": "a", "output_2": "b", "preference": 1, "score": 3}], "unknown column"),
        ([{"instruction": "p", "output_1": "", "output_2": "b", "preference": 1}], "no usable rows"),
        (["not json"], "not JSON"),
    ],
)
def test_bad_tables_are_one_line_user_errors(base_model, tmp_path, capsys, rows, message):
    table = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(SystemExit) as exit_info:
        main(["train-rm", "--data", str(table), "--model", base_model, "--out-dir", str(tmp_path / "rm")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and len(err.splitlines()) == 1 and str(table) in err


def test_too_many_eval_pairs_is_a_user_error(base_model, tmp_path, capsys):
    table = write_jsonl(tmp_path / "t.jsonl", marker_rows(10))
    with pytest.raises(SystemExit):
        main(["train-rm", "--data", str(table), "--model", base_model, "--out-dir", str(tmp_path / "rm"), "--eval-pairs", "10"])
    assert "lower --eval-pairs" in capsys.readouterr().err


def test_missing_required_flag_is_a_user_error(capsys):
    with pytest.raises(SystemExit):
        main(["train-rm", "--out-dir", "x"])
    assert "--data is required" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# eval-rm and score
# ---------------------------------------------------------------------------------------------


def test_eval_rm_counts_ties_wrong_and_reports_skipped_lines(trained_rm, tmp_path, capsys):
    lines = [
        hh_line("tell me about lamp", "great lamp light", "lamp light"),
        hh_line("tell me about river", "river water", "river water"),  # identical: a tie
        "{broken",
        {"chosen": "\n\nHuman: hi"},
        hh_line("tell me about bread", "great bread", "bread plate"),
    ]
    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    out_file = tmp_path / "agreement.json"
    out = run_cli(["eval-rm", "--model-path", str(trained_rm[0]), "--data-path", str(path), "--json", "--out-file", str(out_file)], capsys)
    result = json.loads(out[0])
    assert out[-1] == str(out_file) and json.loads(out_file.read_text())["accuracy"] == result["accuracy"]
    assert result["pairs"] == 3 and result["ties"] == 1
    assert result["accuracy"] == pytest.approx(2 / 3)  # the marker pairs right, the tie wrong
    assert result["skipped"] == {"not JSON": 1, "field 'chosen' has no Assistant turn": 1}
    assert (tmp_path / "agreement.json.manifest.json").exists()


def test_eval_rm_refuses_a_model_that_scores_nan(trained_rm, tmp_path, capsys):
    """A diverged model scores NaN: its 'accuracy' would be 0.0 (NaN margins are never > 0), which is not a figure."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(trained_rm[0], broken)
    weights = load_file(broken / "model.safetensors")
    weights = {k: v.clone().fill_(float("nan")) if "score" in k else v for k, v in weights.items()}
    save_file(weights, broken / "model.safetensors")
    path = write_jsonl(tmp_path / "hh.jsonl", [hh_line("q", "a", "b")])
    with pytest.raises(SystemExit):
        main(["eval-rm", "--model-path", str(broken), "--data-path", str(path)])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading bars: one line
    assert err.startswith("rlcd eval-rm: error: --reward-model") and "2 of 2 scores are NaN or inf" in err


def test_train_rm_refuses_to_save_diverged_weights(base_model, tmp_path, capsys, monkeypatch):
    table = write_jsonl(tmp_path / "table.jsonl", marker_rows(16))
    real = reward.preference_loss
    monkeypatch.setattr(reward, "preference_loss", lambda *a: real(*a) * float("nan"))  # every gradient NaN
    with pytest.raises(SystemExit):
        main(["train-rm", "--data", str(table), "--model", base_model, "--out-dir", str(tmp_path / "rm"), "--eval-pairs", "0",
              *TRAIN_FLAGS])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "training diverged, the weights became NaN or inf" in err and "--bf16 false" in err
    assert not (tmp_path / "rm" / "model.safetensors").exists()


def test_eval_rm_num_pairs_takes_the_first_usable_pairs(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", ["junk"] + [hh_line(f"q{i}", "a", "b") for i in range(5)])
    pairs, skipped, problems = read_hh_pairs(path, 3)
    assert len(pairs) == 3 and pairs[0][0] == "Human: q0\n\nAssistant: a" + END_MARKER
    assert problems == [f"{path}:1: not JSON"] and skipped == {"not JSON": 1}


def test_eval_rm_refuses_a_causal_lm(base_model, tmp_path, capsys):
    path = write_jsonl(tmp_path / "hh.jsonl", [hh_line("q", "a", "b")])
    with pytest.raises(SystemExit):
        main(["eval-rm", "--model-path", base_model, "--data-path", str(path)])
    assert "not a reward model" in capsys.readouterr().err


@pytest.mark.skipif(not (SHARED_DATA / "hh-rlhf").is_dir(), reason=f"hh-rlhf test files not found in {SHARED_DATA} (../shared/data beside the repo)")
@pytest.mark.parametrize("task", ["harmless-base", "helpful-base"])
def test_real_hh_rlhf_files_parse_without_skips(task):
    pairs, skipped, _ = read_hh_pairs(SHARED_DATA / "hh-rlhf" / task / "test.jsonl.gz", 2000)
    assert len(pairs) == 2000 and not skipped
    for chosen, rejected in pairs:
        assert chosen.startswith("Human:") and chosen.endswith(END_MARKER) and rejected.endswith(END_MARKER)
        final_turn = chosen[chosen.rfind("\n\nAssistant:") + len("\n\nAssistant:") :]
        assert not final_turn.startswith("  ")  # one space after the final marker, as in training


def test_score_adds_scores_in_order(trained_rm, tmp_path, capsys):
    items = [{"instruction": f"Human: tell me about {w}\n\nAssistant:", "output": o, "id": i}
             for i, (w, o) in enumerate([("lamp", "great lamp"), ("stone", "stone"), ("river", "great river water light")])]
    src = tmp_path / "outputs.json"
    src.write_text(json.dumps(items))
    dst = tmp_path / "scored.json"
    lines = run_cli(["score", "--reward-model", str(trained_rm[0]), "--data-path", str(src), "--out-file", str(dst), "--batch-size", "2"], capsys)
    assert lines[-1] == str(dst)
    scored = json.loads(dst.read_text())
    assert [s["id"] for s in scored] == [0, 1, 2]
    model, tokenizer = load_reward_model(str(trained_rm[0]))
    expected = score_texts(model, tokenizer, [format_rm_input(i["instruction"], i["output"]) for i in items])
    assert [s["score"] for s in scored] == pytest.approx(expected, abs=1e-5)
    assert scored[0]["score"] > scored[1]["score"]  # the marker word


@pytest.mark.parametrize("content,message", [("{}", "expected a non-empty JSON list"), ("[]", "expected a non-empty JSON list"),
                                             ('[{"instruction": "p"}]', "item 0: field 'output'"), ("[", "not valid JSON")])
def test_score_rejects_bad_outputs_files(tmp_path, content, message):
    path = tmp_path / "outputs.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        reward.read_outputs(path)


def test_train_rm_takes_its_flags_from_a_config_file(base_model, tmp_path, capsys):
    table = write_jsonl(tmp_path / "t.jsonl", marker_rows(20))
    config = tmp_path / "rm.yaml"
    config.write_text(f"data: {table}\nmodel: {base_model}\nout-dir: {tmp_path / 'rm'}\neval-pairs: 4\nmax-steps: 2\nbf16: false\nbatch-size: 4\n")
    lines = run_cli(["train-rm", "--config", str(config), "--max-steps", "1"], capsys)
    assert lines[-1] == str(tmp_path / "rm")
    assert json.loads((tmp_path / "rm" / "metrics.json").read_text())["train_steps"] == 1  # the flag wins over the file


@pytest.mark.parametrize("command", ["train-rm", "sft"])
def test_one_process_that_sees_several_gpus_is_told_how_to_use_them(command, tmp_path, monkeypatch, capsys):
    # TRL's trainers refuse nn.DataParallel with a traceback after loading (seen on 2 H200s); say it first, in one line
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    pairs = Path(reward.__file__).parent / "data" / "demo_pairs.jsonl"
    with pytest.raises(SystemExit) as e:
        main([command, "--data", str(pairs), "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "sees 2 GPUs" in err and "accelerate launch" in err
    assert not (tmp_path / "out").exists()
