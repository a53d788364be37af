"""PPO: the arithmetic against hand-computed examples, rewards on the right token, resume, LoRA reference (tiny models, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlcd import ppo
from rlcd.cli import main
from rlcd.engines import Completion
from rlcd.files import UserError

EXAMPLES = Path(__file__).resolve().parents[1] / "src" / "rlcd" / "data" / "harmless_prompts.jsonl"
SMALL = ["--steps", "3", "--rollouts", "8", "--minibatch-size", "4", "--micro-batch-size", "2", "--forward-batch-size", "4",
         "--max-new-tokens", "6", "--save-every", "2", "--learning-rate", "1e-3", "--accept-eos"]
TIMES = ("time_rollout", "time_score", "time_forward", "time_train", "time_step")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_rm(tiny_model_dir, tmp_path_factory) -> str:
    """A random one-output sequence classifier sharing the tiny policy's config and tokenizer."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_labels = 1
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("tiny-rm")
    LlamaForSequenceClassification(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return str(out)


def ppo_cli(out: Path, policy: str, rm: str, *extra: str) -> list[dict]:
    main(["ppo", "--prompts", str(EXAMPLES), "--reward-model", rm, "--policy", policy, "--out-dir", str(out), *SMALL, *extra])
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# arithmetic
# ---------------------------------------------------------------------------------------------


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 0.1]])
    adv, ret = ppo.gae(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    assert torch.allclose(adv, torch.tensor([[0.5, 0.8, 0.9]]))
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0, 1.0]]))


def test_gae_hand_computed_with_discount_and_padding():
    # deltas: d2 = 1 - .1 = .9; d1 = .9*.1 - .2 = -.11; d0 = .9*.2 - .5 = -.32; gamma*lambda = .72
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.1, 9.0], [1.0, 1.0, 7.0, 7.0]])  # 9 and 7 sit on padding
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    adv, ret = ppo.gae(rewards, values, mask, 0.9, 0.8)
    a2 = 0.9
    a1 = -0.11 + 0.72 * a2
    a0 = -0.32 + 0.72 * a1
    # row 2: d1 = 2 - 1 = 1; d0 = .9*1 - 1 = -.1; a0 = -.1 + .72
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2, 0.0], [-0.1 + 0.72, 1.0, 0.0, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, adv + values * mask)


def test_kl_penalty_is_negative_only_where_the_policy_is_more_likely_and_score_goes_on_the_last_real_token():
    logprobs = torch.tensor([[-1.0, -2.0, -1.0, 0.0], [-1.0, -1.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -1.0, -5.0], [-3.0, -1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    rewards, kl = ppo.shape_rewards(torch.tensor([3.0, -1.0]), logprobs, ref, mask, kl_coef=0.1)
    # row 1: kl +0.5 (penalised), -1.0 (not: max(0, .)), 0; score 3 on token 3 (index 2), not on the padding
    assert torch.allclose(rewards[0], torch.tensor([-0.05, 0.0, 3.0, 0.0]))
    assert torch.allclose(rewards[1], torch.tensor([-0.2, -1.0, 0.0, 0.0]))
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]]))


def test_whiten_ignores_padding():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    w = ppo.whiten(x, torch.tensor([[1.0, 1.0, 0.0]]))
    assert torch.allclose(w, torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-4)


def test_whiten_without_shifting_keeps_the_masked_mean_and_gives_unit_masked_std():
    # the shaped-reward scaling: real tokens 1, 3, 5 have mean 3 and std sqrt(8/3); padding stays 0
    x = torch.tensor([[1.0, 3.0, 100.0], [5.0, -7.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0]])
    w = ppo.whiten(x, mask, shift_mean=False)
    s = (8 / 3) ** 0.5
    assert torch.allclose(w, torch.tensor([[3 - 2 / s, 3.0, 0.0], [3 + 2 / s, 0.0, 0.0]]), atol=1e-4)
    assert (w * mask).sum() / mask.sum() == pytest.approx(3.0)


def test_policy_loss_is_clipped_and_value_loss_is_the_larger_of_clipped_and_unclipped():
    mask = torch.ones(1, 2)
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    adv = torch.tensor([[1.0, -1.0]])
    pg, vf, clipped = ppo.ppo_losses(new, old, adv, torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2), torch.tensor([[0.0, 0.0]]), mask, 0.2, 0.2)
    # token 1: max(-1.5, -1.2) = -1.2; token 2: max(0.5, 0.8) = 0.8
    assert pg.item() == pytest.approx(-1.2 + 0.8)
    # value 1.0 vs old 0 clipped to 0.2; returns 0: max(1.0, 0.04) * 0.5
    assert vf.item() == pytest.approx(0.5)
    assert clipped.item() == 2


def test_end_of_response_cuts_at_the_marker_and_penalises_missing_or_empty():
    assert ppo.end_of_response(" Sure.\n\nHuman: more", False, False) == " Sure."
    assert ppo.end_of_response(" Sure.", True, False) is None
    assert ppo.end_of_response(" Sure.", True, True) == " Sure."
    assert ppo.end_of_response(" Sure.", False, True) is None  # hit the token limit
    assert ppo.end_of_response("  \n\nHuman: hi", False, True) is None


def test_adaptive_kl_moves_towards_the_target():
    ctl = ppo.KLController(0.1, target=6.0, horizon=100)
    ctl.update(12.0, 10)
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    fixed = ppo.KLController(0.1, target=None, horizon=100)
    fixed.update(12.0, 10)
    assert fixed.value == 0.1


# ---------------------------------------------------------------------------------------------
# the trainer on tiny models
# ---------------------------------------------------------------------------------------------


class SeededEngine:
    """Random token ids whose length and ending (EOS or length) follow the seed: rewards that vary, cheaply."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def generate(self, prompts, params, seeds):
        import random

        out = []
        for seed in seeds:
            rng = random.Random(seed)
            ids = tuple(rng.randrange(100, 2000) for _ in range(rng.randint(1, params.max_new_tokens)))
            reason = rng.choice(["eos", "length"])
            eos = self.tokenizer.eos_token_id if reason == "eos" else None
            out.append(Completion(self.tokenizer.decode(ids), reason, len(ids), ids, eos))
        return out


@pytest.fixture
def seeded_engine(monkeypatch):
    monkeypatch.setattr(ppo, "make_rollout_engine", lambda kind, policy, tokenizer, batch: SeededEngine(tokenizer))


class ScriptedEngine:
    """Returns fixed completions (with token ids) in prompt order."""

    def __init__(self, tokenizer, texts_and_reasons):
        self.tokenizer, self.script = tokenizer, texts_and_reasons

    def generate(self, prompts, params, seeds):
        out = []
        for k in range(len(prompts)):
            text, reason = self.script[k % len(self.script)]
            ids = tuple(self.tokenizer(text, add_special_tokens=False).input_ids)
            out.append(Completion(text, reason, len(ids), ids, self.tokenizer.eos_token_id if reason == "eos" else None))
        return out


def make_args(tiny_model_dir, tiny_rm, tmp_path, *extra):
    from rlcd.cli import parse

    return parse(
        ["ppo", "--prompts", str(EXAMPLES), "--reward-model", tiny_rm, "--policy", tiny_model_dir, "--out-dir", str(tmp_path), *SMALL, *extra])


def test_policy_and_reference_project_to_the_vocabulary_the_same_way(tiny_model_dir, tiny_rm, tmp_path):
    """The rollout engine sets the policy's output projection up vocabulary-first on CPU (engines/hf.py); the reference
    (full fine-tuning) gets the same, so both compute the same logits the same way and step 1's KL is exactly 0."""
    args = make_args(tiny_model_dir, tiny_rm, tmp_path)
    prompts, _ = ppo.load_ppo_prompts(args.prompts, ppo.load_tokenizer_for(args), args.max_prompt_tokens)
    trainer = ppo.PPO(args, prompts, "cpu")
    heads = [trainer.policy.get_output_embeddings(), trainer.reference.get_output_embeddings()]
    forwards = [vars(head).get("forward") for head in heads]  # set on the instance, in place of nn.Linear's
    assert None not in forwards and forwards[0].__func__ is forwards[1].__func__


def test_reward_sits_on_the_last_response_token_and_missing_marker_gets_minus_one(tiny_model_dir, tiny_rm, tmp_path):
    args = make_args(tiny_model_dir, tiny_rm, tmp_path, "--no-scale-rewards", "--kl", "0", "--rollouts", "4")
    prompts, _ = ppo.load_ppo_prompts(args.prompts, ppo.load_tokenizer_for(args), args.max_prompt_tokens)
    trainer = ppo.PPO(args, prompts, "cpu")
    trainer.engine = ScriptedEngine(trainer.tokenizer, [(" Hello there.\n\nHuman:", "stop"), (" no marker at all", "length"),
                                                       (" ended", "eos"), ("\n\nHuman:", "stop")])
    rows, stats = trainer.rollout(0)
    # the reward model scores prompt + " " + cut response + marker, exactly what score_texts gives for that text
    from rlcd.reward import format_rm_input, score_texts

    expected = score_texts(trainer.rm, trainer.rm_tokenizer, [format_rm_input(trainer.step_prompts(0)[0][1], " Hello there.")])[0]
    assert stats["missing_marker_frac"] == 0.5  # " no marker at all" and the empty response
    eos_row = rows[2]
    assert eos_row["response_ids"][-1] == trainer.tokenizer.eos_token_id  # an EOS ending is part of the response
    with torch.no_grad():
        for row, score in zip(rows, [expected, -1.0, None, -1.0]):
            # with kl 0 and gamma = lambda = 1, return_t = the sequence's score for every token t
            if score is not None:
                assert torch.allclose(row["returns"], torch.full_like(row["returns"], score), atol=1e-5)


def test_the_steps_of_a_rollout_fill_one_typed_rollout_per_response(tiny_model_dir, tiny_rm, tmp_path, seeded_engine):
    import pickle

    args = make_args(tiny_model_dir, tiny_rm, tmp_path, "--rollouts", "4")
    prompts, _ = ppo.load_ppo_prompts(args.prompts, ppo.load_tokenizer_for(args), args.max_prompt_tokens)
    trainer = ppo.PPO(args, prompts, "cpu")
    # docs/method.md §6, step by step, as PPO.rollout runs them
    rollouts = trainer.sample([0])[0]
    assert [r.k for r in rollouts] == [0, 1, 2, 3] and all(r.logprobs is None for r in rollouts)
    trainer.score(rollouts)
    assert {r.score for r in rollouts if not r.ended} == {-1.0} and any(r.ended for r in rollouts)
    trainer.evaluate(rollouts)
    assert all(len(r.logprobs) == len(r.ref_logprobs) == len(r.values) == len(r.response_ids) for r in rollouts)
    mask = ppo.response_mask(rollouts)
    rewards, _ = trainer.shaped_rewards(rollouts, torch.tensor([r.score for r in rollouts]), mask)
    trainer.estimate_advantages(rollouts, rewards, mask)
    again, _ = trainer.rollout(0)
    for a, b in zip(rollouts, again):
        assert a.score == b.score and torch.equal(a.advantages, b.advantages) and torch.equal(a.returns, b.returns)
    # what the processes send each other (all_gather_object): a rollout survives pickling, and reads by name as a row did
    copy = pickle.loads(pickle.dumps(again[1]))
    assert copy.response_ids == copy["response_ids"] == again[1].response_ids and torch.equal(copy.returns, again[1].returns)


def test_an_eos_ending_keeps_the_end_token_that_was_sampled(tiny_model_dir, tiny_rm, tmp_path):
    # like Qwen (<|im_end|> and <|endoftext|>): the generation config lists two end ids and the engine stops on either;
    # here the model always samples the one that is not tokenizer.eos_token_id
    args = make_args(tiny_model_dir, tiny_rm, tmp_path, "--rollouts", "4")
    prompts, _ = ppo.load_ppo_prompts(args.prompts, ppo.load_tokenizer_for(args), args.max_prompt_tokens)
    trainer = ppo.PPO(args, prompts, "cpu")
    tok = trainer.tokenizer
    other = tok.convert_tokens_to_ids("<|endoftext|>")
    assert other not in (tok.eos_token_id, tok.pad_token_id)
    trainer.policy.generation_config.eos_token_id = [tok.eos_token_id, other]

    def always_other(module, inputs, logits):
        logits[..., other] += 1e4
        return logits

    trainer.policy.get_output_embeddings().register_forward_hook(always_other)
    rows, _ = trainer.rollout(0)
    for row in rows:
        assert row["response_ids"] == [other]
        assert row["logprobs"][-1] > -1e-3  # the log-prob of the sampled token (the tokenizer's EOS would be ~ -1e4)


def test_log_probs_are_those_of_the_tempered_distribution_that_was_sampled(tiny_model_dir, tiny_rm, tmp_path, seeded_engine, monkeypatch):
    args = make_args(tiny_model_dir, tiny_rm, tmp_path, "--temperature", "0.7", "--rollouts", "4", "--minibatch-size", "4", "--epochs", "1")
    prompts, _ = ppo.load_ppo_prompts(args.prompts, ppo.load_tokenizer_for(args), args.max_prompt_tokens)
    trainer = ppo.PPO(args, prompts, "cpu")
    rows, _ = trainer.rollout(0)
    for r in rows:
        with torch.no_grad():
            logits = trainer.policy(input_ids=torch.tensor([r["prompt_ids"] + r["response_ids"]])).logits[0, len(r["prompt_ids"]) - 1 : -1]
        expected = (logits / 0.7).log_softmax(-1).gather(1, torch.tensor(r["response_ids"])[:, None]).squeeze(1)
        assert torch.allclose(r["logprobs"], expected, atol=1e-5)
        assert torch.allclose(r["ref_logprobs"], expected, atol=1e-5)  # the reference at the same temperature (step 1: same weights)
    # the update's new log-probs too: before its one optimizer step they equal the old ones (ratio 1)
    seen = []

    def spy(logprobs, old_logprobs, *rest):
        seen.append((logprobs.detach(), old_logprobs, rest[4]))  # rest[4]: the mask of real response tokens
        return real_losses(logprobs, old_logprobs, *rest)

    real_losses = ppo.ppo_losses
    monkeypatch.setattr(ppo, "ppo_losses", spy)
    trainer.train(rows, 0)
    new, old, mask = seen[0]
    assert torch.allclose(new * mask, old, atol=1e-5)


@pytest.mark.parametrize("scaling", ["shaped", "scores", "none"])
def test_each_reward_scaling_gives_the_rewards_it_promises(scaling, tiny_model_dir, tiny_rm, tmp_path, seeded_engine):
    args = make_args(tiny_model_dir, tiny_rm, tmp_path, "--reward-scaling", scaling, "--kl", "0.5")
    prompts, _ = ppo.load_ppo_prompts(args.prompts, ppo.load_tokenizer_for(args), args.max_prompt_tokens)
    trainer = ppo.PPO(args, prompts, "cpu")
    trainer.run_step()  # the policy moves away from the reference, so the KL penalty is not zero
    rows, stats = trainer.rollout(1)
    assert stats["reward_scaling"] == scaling
    width = max(len(r["response_ids"]) for r in rows)
    mask = torch.tensor([[1.0] * len(r["response_ids"]) + [0.0] * (width - len(r["response_ids"])) for r in rows])
    # with gamma = lambda = 1 the return at token t is the sum of the rewards from t on: read the rewards back from it
    returns = ppo.pad_rows(rows, "returns", width, "cpu")
    used = (returns - torch.nn.functional.pad(returns[:, 1:], (0, 1))) * mask
    scores = torch.tensor([r["score"] for r in rows])
    if scaling == "scores":
        scores = scores / scores.std()
    expected, kl = ppo.shape_rewards(scores, ppo.pad_rows(rows, "logprobs", width, "cpu"), ppo.pad_rows(rows, "ref_logprobs", width, "cpu"),
                                     mask, kl_coef=0.5)
    assert kl.abs().sum() > 0
    if scaling == "shaped":  # unit std over all response tokens of the step, mean kept
        mean = expected.sum() / mask.sum()
        assert used.sum() / mask.sum() == pytest.approx(float(mean), abs=1e-4)
        assert float(((((used - mean) * mask) ** 2).sum() / mask.sum()).sqrt()) == pytest.approx(1.0, abs=1e-3)
        expected = ppo.whiten(expected, mask, shift_mean=False)
    assert torch.allclose(used, expected, atol=1e-4)


def test_reward_scaling_defaults_to_shaped_and_no_scale_rewards_still_means_none(tiny_model_dir, tiny_rm, tmp_path, capsys):
    assert make_args(tiny_model_dir, tiny_rm, tmp_path).reward_scaling == "shaped"
    assert make_args(tiny_model_dir, tiny_rm, tmp_path, "--no-scale-rewards").reward_scaling == "none"
    with pytest.raises(SystemExit) as e:  # through main: the parser itself raises FlagError, which main prints in one line
        main(["ppo", "--prompts", str(EXAMPLES), "--reward-model", tiny_rm, "--policy", tiny_model_dir, "--out-dir", str(tmp_path),
              "--no-scale-rewards", "--reward-scaling", "scores"])
    assert e.value.code == 2
    assert "--no-scale-rewards" in capsys.readouterr().err


def test_ppo_cli_with_the_real_engine_writes_log_checkpoints_and_a_loadable_policy(tiny_model_dir, tiny_rm, tmp_path, capsys):
    log = ppo_cli(tmp_path / "run", tiny_model_dir, tiny_rm)
    assert [s["step"] for s in log] == [1, 2, 3]
    for key in ("reward_mean", "reward_std", "score_mean", "kl", "entropy", "response_length", "missing_marker_frac",
                "clip_frac", "value_loss", "policy_loss", "lr", *TIMES):
        assert key in log[-1]
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "run")
    from rlcd.models import load_causal_lm

    model, _ = load_causal_lm(str(tmp_path / "run"), device="cpu", dtype="float32")
    assert model.config.vocab_size > 0
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-2", "step-3"]  # --save-total-limit 2
    from rlcd.files import FILE_MODE

    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "run").iterdir() if p.is_file()} == {FILE_MODE}  # weights too, not 0600
    # the model directory: a card, the evaluation's sampling with every stop id, the training layout as chat template
    from transformers import AutoTokenizer, GenerationConfig

    card = (tmp_path / "run" / "README.md").read_text()
    assert "# Policy trained with rlcd ppo" in card and f"{EXAMPLES}\n    " in card and "step: 3" in card
    assert "Training rollouts were sampled at temperature 1, without top-p or top-k, at most 6 new tokens." in card
    config = GenerationConfig.from_pretrained(tmp_path / "run")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run")
    assert (config.top_p, config.max_new_tokens) == (0.9, 300) and tokenizer.convert_tokens_to_ids("<|im_end|>") in config.eos_token_id
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "Human: hi\n\nAssistant:"


def test_rewards_that_vary_move_the_policy_away_from_the_reference(tiny_model_dir, tiny_rm, tmp_path, seeded_engine):
    log = ppo_cli(tmp_path / "run", tiny_model_dir, tiny_rm)
    assert 0 < log[0]["missing_marker_frac"] < 1
    assert log[0]["kl"] == 0.0 and log[1]["kl"] != 0.0  # step 1 samples the reference itself
    from rlcd.models import load_causal_lm

    model, _ = load_causal_lm(str(tmp_path / "run"), device="cpu", dtype="float32")
    base, _ = load_causal_lm(tiny_model_dir, device="cpu", dtype="float32")
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))


@pytest.mark.parametrize("extra", [[], ["--shared-value-head"]])
def test_resume_after_interrupt_continues_exactly(extra, tiny_model_dir, tiny_rm, tmp_path, monkeypatch, seeded_engine):
    whole = ppo_cli(tmp_path / "whole", tiny_model_dir, tiny_rm, *extra)

    real_step = ppo.PPO.run_step

    def crash_at_step_3(self):
        if self.step == 2:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(ppo.PPO, "run_step", crash_at_step_3)
    with pytest.raises(SystemExit):
        ppo_cli(tmp_path / "cut", tiny_model_dir, tiny_rm, *extra)
    monkeypatch.setattr(ppo.PPO, "run_step", real_step)
    with pytest.raises(UserError, match="--resume"):
        ppo.run(make_args(tiny_model_dir, tiny_rm, tmp_path / "cut", *extra))
    resumed = ppo_cli(tmp_path / "cut", tiny_model_dir, tiny_rm, "--resume", *extra)

    def strip(log):
        return [{k: v for k, v in s.items() if k not in TIMES} for s in log]

    assert strip(resumed) == strip(whole)
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_reference_is_the_base_model_and_final_checkpoint_is_merged(tiny_model_dir, tiny_rm, tmp_path, seeded_engine):
    args = make_args(tiny_model_dir, tiny_rm, tmp_path, "--lora", "--lora-r", "4", "--learning-rate", "1e-2")
    prompts, _ = ppo.load_ppo_prompts(args.prompts, ppo.load_tokenizer_for(args), args.max_prompt_tokens)
    trainer = ppo.PPO(args, prompts, "cpu")
    trainer.run_step()
    trainer.run_step()
    from rlcd.models import load_causal_lm

    base, _ = load_causal_lm(tiny_model_dir, device="cpu", dtype="float32")
    batch = ppo.collate([{"prompt_ids": prompts[0][2], "response_ids": [5, 6, 7]}], trainer.pad_id, "cpu")
    with torch.no_grad():
        with trainer.reference_context():
            ref = ppo.response_logits(trainer.policy, batch, 1.0)
        adapted = ppo.response_logits(trainer.policy, batch, 1.0)
        expected = ppo.response_logits(base, batch, 1.0)
    assert torch.allclose(ref, expected, atol=1e-5)
    assert not torch.allclose(adapted, expected, atol=1e-3)  # the adapters did learn something
    trainer.save_final(tmp_path, ppo.artifacts.Card(stage="ppo", base_model=tiny_model_dir, base_path=tiny_model_dir, data=[],
                                                     settings=ppo.public_config(args), metrics={}))
    assert not (tmp_path / "adapter_config.json").exists() and "merged into these weights" in (tmp_path / "README.md").read_text()
    merged, _ = load_causal_lm(str(tmp_path), device="cpu", dtype="float32")
    with torch.no_grad():
        assert torch.allclose(ppo.response_logits(merged, batch, 1.0), adapted, atol=1e-4)


@pytest.mark.parametrize("lora", [False, True])
def test_a_shared_value_head_reads_the_policy_and_its_value_loss_trains_the_policy(lora, tiny_model_dir, tiny_rm, tmp_path, monkeypatch):
    """--shared-value-head: the value model is a head on the policy's last hidden states (no copy of the reward model
    is loaded for it), so the value loss alone moves the policy's weights; with a separate value model it does not."""
    loads = []
    real_load = ppo.load_reward_model
    monkeypatch.setattr(ppo, "load_reward_model", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    grads = {}
    for shared in (False, True):
        loads.clear()
        extra = (["--lora", "--lora-r", "4"] if lora else []) + (["--shared-value-head"] if shared else [])
        args = make_args(tiny_model_dir, tiny_rm, tmp_path, *extra)
        prompts, _ = ppo.load_ppo_prompts(args.prompts, ppo.load_tokenizer_for(args), args.max_prompt_tokens)
        trainer = ppo.PPO(args, prompts, "cpu")
        assert len(loads) == (1 if shared else 2)  # the reward model; and the value model's start unless shared
        if shared:
            assert trainer.value.backbone is None and set(ppo.trainable_state(trainer.value)) == {"head.weight", "head.bias"}
        torch.manual_seed(0)
        torch.nn.init.normal_(trainer.value.head.weight)  # a head that reads something (it starts at zero)
        batch = ppo.collate([{"prompt_ids": prompts[0][2], "response_ids": [5, 6, 7]}], trainer.pad_id, "cpu")
        logits, values = trainer.forward(batch)
        assert torch.allclose(logits, ppo.response_logits(trainer.policy, batch, 1.0))
        if shared:
            hidden = ppo.gather_positions(ppo.last_hidden(trainer.policy, batch), batch)
            assert torch.allclose(values, trainer.value.head(hidden).squeeze(-1))
        values.sum().backward()
        grads[shared] = [p.grad for p in trainer.policy.parameters() if p.requires_grad]
    assert all(g is None for g in grads[False])
    assert any(g is not None and g.abs().sum() > 0 for g in grads[True])


def test_absurd_settings_are_refused_with_one_line(tiny_model_dir, tiny_rm, tmp_path, capsys):
    for flags, needle in ((["--kl", "-0.1"], "--kl"), (["--minibatch-size", "64"], "--minibatch-size"), (["--rollouts", "0"], "--rollouts"),
                          (["--shared-value-head", "--value-model", tiny_rm], "exclude each other")):
        with pytest.raises(SystemExit) as e:
            main(["ppo", "--prompts", str(EXAMPLES), "--reward-model", tiny_rm, "--policy", tiny_model_dir,
                  "--out-dir", str(tmp_path), *SMALL, *flags])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["ppo", "--prompts", str(EXAMPLES), "--reward-model", tiny_model_dir, "--policy", tiny_model_dir, "--out-dir", str(tmp_path)])
    assert "not a reward model" in capsys.readouterr().err


def test_batched_response_logprobs_equal_one_row_at_a_time(tiny_model_dir):
    from rlcd.models import load_causal_lm

    model, _ = load_causal_lm(tiny_model_dir, device="cpu", dtype="float32")
    rows = [{"prompt_ids": [1, 50, 60, 70, 80], "response_ids": [90, 91]}, {"prompt_ids": [1, 40], "response_ids": [33, 34, 35, 36]}]
    batch = ppo.collate(rows, pad_id=0, device="cpu")
    with torch.no_grad():
        batched = ppo.token_logprobs(ppo.response_logits(model, batch, 1.0), batch["response_ids"])
        for b, r in enumerate(rows):
            ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
            logits = model(input_ids=ids).logits[0, len(r["prompt_ids"]) - 1 : -1]
            alone = logits.log_softmax(-1).gather(1, torch.tensor(r["response_ids"])[:, None]).squeeze(1)
            n = len(r["response_ids"])
            assert torch.allclose(batched[b, :n], alone, atol=1e-5)
            assert batch["mask"][b].sum() == n


@pytest.mark.parametrize("base, option", [([], "--gradient-checkpointing"), (["--lora", "--lora-r", "4"], "--gradient-checkpointing"),
                                          (["--shared-value-head"], "--gradient-checkpointing"), ([], "--sort-by-length")])
def test_each_training_speed_option_gives_the_same_losses_and_update(base, option, tiny_model_dir, tiny_rm, tmp_path, seeded_engine,
                                                                    monkeypatch):
    """The options change only how the work is batched or what is kept for the backward pass: one step (rollouts, losses,
    gradient norm, new weights) is the same with and without."""
    runs = []
    real_collate = ppo.collate
    for extra in (base, [*base, option]):
        args = make_args(tiny_model_dir, tiny_rm, tmp_path, "--rollouts", "8", "--minibatch-size", "8", "--micro-batch-size", "3",
                         "--forward-batch-size", "3", "--epochs", "1", "--learning-rate", "1e-2", *extra)
        prompts, _ = ppo.load_ppo_prompts(args.prompts, ppo.load_tokenizer_for(args), args.max_prompt_tokens)
        torch.manual_seed(0)  # the same LoRA initialisation
        trainer = ppo.PPO(args, prompts, "cpu")
        start = {k: v.clone() for k, v in ppo.trainable_state(trainer.policy).items()}  # (on CPU the state shares the weights)
        positions, mlp_calls = [], []  # token positions through the models (padding included); runs of the first layer's MLP
        monkeypatch.setattr(ppo, "collate", lambda rows, *a: positions.append(real_collate(rows, *a)["input_ids"].numel())
                            or real_collate(rows, *a))
        mlp = trainer.policy.get_decoder().layers[0].mlp
        monkeypatch.setattr(mlp, "forward", lambda x, forward=mlp.forward: mlp_calls.append(1) or forward(x))
        stats = trainer.run_step()
        weights = ppo.trainable_state(trainer.policy)
        assert any(not torch.equal(weights[k], start[k]) for k in weights)
        runs.append(({k: v for k, v in ppo.numbers(stats).items() if k not in TIMES}, weights, sum(positions), len(mlp_calls)))
    (before, weights_before, positions_before, calls_before), (after, weights_after, positions_after, calls_after) = runs
    assert after == pytest.approx(before, rel=1e-5, abs=1e-6)  # scores, KL, entropy, losses, clip fraction, gradient norm
    assert all(torch.allclose(weights_after[k], weights_before[k], atol=1e-6) for k in weights_before)
    if option == "--sort-by-length":
        assert positions_after < positions_before
    else:  # the first layer ran once more per micro-batch (8 rollouts in 3): it recomputed its activations in the backward pass
        assert calls_after == calls_before + 3


def test_report_to_tensorboard_writes_every_step(tiny_model_dir, tiny_rm, tmp_path, seeded_engine):
    pytest.importorskip("tensorboard", reason="needs the tensorboard package (in the test extra)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ppo_cli(tmp_path / "run", tiny_model_dir, tiny_rm, "--report-to", "tensorboard")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("ppo/score_mean")] == [1, 2, 3]


def test_only_the_last_save_total_limit_checkpoints_stay_and_a_crash_while_saving_keeps_them(tiny_model_dir, tiny_rm, tmp_path, monkeypatch,
                                                                                               seeded_engine):
    import safetensors.torch

    out = tmp_path / "run"
    real_save = safetensors.torch.save_file

    def disk_full_at_step_3(tensors, path, *a, **k):
        if "step-3" in str(path):
            raise KeyboardInterrupt  # killed while writing step 3
        return real_save(tensors, path, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_at_step_3)
    with pytest.raises(SystemExit):
        ppo_cli(out, tiny_model_dir, tiny_rm, "--save-every", "1", "--save-total-limit", "1")
    # step 2 replaced step 1 only once it was complete; the half-written step 3 is not a checkpoint
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-3.tmp"]
    assert [s for s, _ in ppo.checkpoints(out)] == [2]
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    log = ppo_cli(out, tiny_model_dir, tiny_rm, "--save-every", "1", "--save-total-limit", "1", "--resume")
    assert [s["step"] for s in log] == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3"]  # the leftover .tmp went too


def test_report_to_wandb_logs_every_step_offline(tiny_model_dir, tiny_rm, tmp_path, monkeypatch, seeded_engine):
    from wandb_offline import offline_env, offline_runs

    offline_env(monkeypatch, tmp_path)
    log = ppo_cli(tmp_path / "run", tiny_model_dir, tiny_rm, "--report-to", "wandb", "--run-name", "ppo-small")
    [run] = offline_runs(tmp_path)
    assert (run["name"], run["project"]) == ("ppo-small", "rlcd")
    rows = [row for row in run["history"] if "ppo/score_mean" in row]
    assert [row["_step"] for row in rows] == [1, 2, 3]
    assert [row["ppo/score_mean"] for row in rows] == pytest.approx([s["score_mean"] for s in log])


def test_learning_rate_warms_up_over_a_tenth_of_a_short_run_and_decays_to_zero():
    assert [ppo.lr_factor(s, 80) for s in (0, 4)] == [0.2, 1.0 * (1 - 4 / 80)]  # 5 warm-up steps from 50 steps on
    assert [round(ppo.lr_factor(s, 4), 3) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]  # a 4-step run starts at its peak
    assert ppo.lr_factor(0, 20) == 0.5 and ppo.lr_factor(1, 20) == 1 - 1 / 20  # 2 warm-up steps
    assert ppo.lr_factor(80, 80) == 0.0


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_compare_reference_scores_the_starting_policy_on_the_step_prompts_and_seeds(lora, tiny_model_dir, tiny_rm, tmp_path,
                                                                                     monkeypatch, capsys):
    """The real engine: --compare-reference logs, at every step, exactly the score the starting policy gets on that
    step's prompts and seeds (a run that never moves, lr 1e-12, samples it), and score_gain is the policy's score minus it.
    The reference's samples of several steps are drawn in one call: all 3 steps (full), steps 1-2 then 3 (LoRA, 16 rows)."""
    from rlcd.engines.hf import HFEngine

    monkeypatch.setattr(ppo, "end_of_response", lambda text, eos, accept_eos: text)  # the random model never ends: score it all
    extra = ["--max-new-tokens", "12", *(["--lora", "--lora-r", "4", "--generation-batch-size", "16"] if lora else [])]
    still = ppo_cli(tmp_path / "still", tiny_model_dir, tiny_rm, *extra, "--learning-rate", "1e-12")
    sampled, generate = [], HFEngine.generate
    monkeypatch.setattr(HFEngine, "generate", lambda self, prompts, *a: sampled.append(len(prompts)) or generate(self, prompts, *a))
    log = ppo_cli(tmp_path / "moving", tiny_model_dir, tiny_rm, *extra, "--learning-rate", "3e-2", "--compare-reference")
    # the reference's 3 steps, then the policy's steps 2 and 3: step 1's rollouts are the reference's (no update yet)
    assert sum(sampled) == 5 * 8 and sampled[-2:] == [8, 8]
    assert [s["reference_score_mean"] for s in log] == pytest.approx([s["score_mean"] for s in still], abs=1e-6)
    assert [s["score_gain"] for s in log] == pytest.approx([s["score_mean"] - s["reference_score_mean"] for s in log])
    assert log[0]["score_gain"] == pytest.approx(0, abs=1e-6)  # step 1 samples before any update
    assert any(abs(s["score_gain"]) > 1e-6 for s in log[1:])  # the policy moved (a random reward model: gains of ~1e-5)
    assert all(s["time_reference"] >= 0 for s in log) and "score_gain" not in still[0]
    out = capsys.readouterr().out
    assert f"step 3/3: score {log[2]['score_mean']:.3f} ({log[2]['score_gain']:+.3f} over the starting policy), kl" in out


def test_compare_reference_with_lora_refuses_the_fast_engine_on_a_gpu_in_one_line(tiny_model_dir, tiny_rm, tmp_path, monkeypatch,
                                                                                   capsys):
    from rlcd.engines.fast import FastEngine

    on_gpu = object.__new__(FastEngine)  # what --engine fast builds on a GPU: a captured graph keeps the adapters on
    on_gpu.on_cuda = True
    monkeypatch.setattr(ppo, "make_rollout_engine", lambda kind, policy, tokenizer, batch: on_gpu)
    with pytest.raises(SystemExit):
        ppo_cli(tmp_path, tiny_model_dir, tiny_rm, "--lora", "--compare-reference")
    err = capsys.readouterr().err
    assert "--compare-reference with --lora on a GPU needs --engine hf" in err and "Traceback" not in err
