"""PPO against a reward model (docs/method.md §6), in one file.

One PPO step: each part is a method of `PPO`, named as below; in brackets the bullet of docs/method.md §6 it
implements. `PPO.rollout` runs parts 1-6 in order, each filling its fields of one `Rollout` per response.

1. sample [Rollouts]: `--rollouts` prompts (a seeded permutation of the prompt file, so a step's prompts
   depend only on --seed and the step) are sampled from the current policy with the same
   in-process engine as simulation, at --temperature (1 in docs/method.md §6), no top-k/top-p, up to
   --max-new-tokens. A response that ended on an end-of-sequence token keeps the one sampled (a
   model may have several). Every log-prob (old, new, reference) and the entropy are taken from
   logits / --temperature: the distribution actually sampled, as in AlpacaFarm.
2. score [Reward]: each response is cut at the first "\\n\\nHuman:" and scored by the reward model as
   prompt + " " + cut response + "\\n\\nHuman:" (`reward_model.format_rm_input`); a response without the
   marker (or empty before it) gets -1 instead (with --accept-eos a response that ended with the
   model's end-of-sequence token counts as ended).
3. evaluate: the old (sampling) and reference log-probs, the entropy and the value model's values of every response token.
4. gather: with several processes each runs 1-3 on every world-th rollout; from here on all hold the whole batch.
5. shaped_rewards [Shaping]: the score sits on the response's last real token;
   every token also gets -beta * max(0, log pi - log pi_ref) (the KL penalty to the frozen reference).
   --reward-scaling shaped (the default) then rescales these per-token rewards to unit standard
   deviation over all response tokens of the step, around their unchanged mean: AlpacaFarm's whiten_rewards,
   which the original RLCD kept, so the paper's beta of 0.002-0.004 was tuned under this scaling.
   `scores` divides only the scores by their std before shaping (this package's earlier default);
   `none` scales nothing.
6. estimate_advantages [Advantages and losses]: GAE (gamma = lambda = 1 by default) with the value model's estimates, whitened.
7. train and losses [Advantages and losses; Optimizer]: --epochs passes over the rollouts in minibatches of --minibatch-size (gradient
   accumulation over --micro-batch-size rows), clipped policy loss + --vf-coef * clipped value loss,
   one AdamW over policy and value parameters, gradient-norm clip, warm-up over min(5, steps/10) steps (at least 1), then linear decay to 0.

With --compare-reference each step also samples its prompts from the reference (the starting policy) with the
same seeds and scores them (`score_reference`: several steps' samples at once; step 1, before any update, takes
them as its rollouts): `reference_score_mean`, and `score_gain` = score_mean minus it. The two share the
prompt draw and the sampling noise, so score_gain shows what the updates did where score_mean alone follows
which prompts a step drew (docs/results.md: 8 rollouts a step hide a gain of 0.2 that this shows).

Models: the policy and reference start from --policy; with --lora the policy is LoRA adapters
and the reference is the same model with its adapters switched off (so a 7B policy fits one GPU).
The value model is the reward model's backbone with a new zero-initialised head (LoRA on the
backbone with --lora); with --shared-value-head it is only that head, on the policy's own last hidden states,
so one forward (and backward) of the policy serves both losses. The reward model stays frozen.

Outputs in --out-dir: `log.jsonl` (one line per step), `checkpoints/step-N/` every --save-every
steps, the last --save-total-limit of them kept (--resume continues from the last one exactly: same
prompts, same samples), and at the end the policy as a Hugging Face checkpoint (adapters merged) that
`rlcd generate --model` and stock transformers load, with its model card, generation config and a
chat template of the training layout (`artifacts`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from rlcd import artifacts, dialogue
from rlcd.dialogue import end_of_response
from rlcd.engines import SamplingParams
from rlcd.files import UserError, append_lines, atomic_write_text, ensure_dir, load_shard, now, write_manifest
from rlcd.options import non_negative_int, option, positive_int
from rlcd.reward_model import format_rm_input, load_reward_model, score_texts
from rlcd.seeds import DEFAULT_SEED, sample_seed
from rlcd.training import TrackingOptions, require_tracker

WARMUP_STEPS = 5  # at most: a run of fewer than 50 steps warms up over a tenth of them (at least one)


# --------------------------------------------------------------------------------------------------
# The PPO arithmetic: pure functions of tensors, tested against hand-computed examples
# --------------------------------------------------------------------------------------------------


def shape_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards [B, T] and the per-token KL estimate log pi - log pi_ref [B, T] (zero on padding).

    The penalty is -kl_coef * max(0, log pi - log pi_ref) on every response token; the sequence's
    score is added on its last real token (never on padding).
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl.clamp(min=0.0)
    last = mask.sum(1).long() - 1
    rewards[torch.arange(len(scores)), last] += scores
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns [B, T]; padding (mask 0) sits only after a row's last token."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, advantages + values


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the real tokens (zero on padding); shift_mean=False adds the mean back (scale only)."""
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


def ppo_losses(logprobs, old_logprobs, advantages, values, old_values, returns, mask, clip: float, clip_value: float):
    """Token sums (not means) of the clipped policy loss and the clipped value loss, and the clipped-token count."""
    ratio = torch.exp(logprobs - old_logprobs)
    pg = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    v_clipped = old_values + (values - old_values).clamp(-clip_value, clip_value)
    vf = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2)
    clipped = ((ratio - 1).abs() > clip).float()
    return (pg * mask).sum(), (vf * mask).sum(), (clipped * mask).sum()


def lr_factor(step: int, total: int) -> float:
    """The learning rate of PPO step `step` (from 0) of `total`, as a fraction of the peak: warm-up, then linear decay."""
    warmup = min(WARMUP_STEPS, max(1, total // 10))
    return min(1.0, (step + 1) / warmup) * max(0.0, 1 - step / total)


class KLController:
    """Fixed beta, or the adaptive rule of Ziegler et al. (2019) towards a target KL."""

    def __init__(self, value: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n / self.horizon


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


class ValueModel(torch.nn.Module):
    """A transformer backbone (the reward model's) with a zero-initialised scalar head on every position; without a
    backbone (--shared-value-head) the head reads the policy's hidden states (`PPO.forward`)."""

    def __init__(self, backbone, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask, position_ids):
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).last_hidden_state
        return self.read(hidden)

    def read(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head's value of each hidden state [..., H] -> [...]."""
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)


def with_lora(model, args, task_type=None):
    """The model with --lora-r/--lora-alpha adapters on all its linear layers, no dropout."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules="all-linear", task_type=task_type)
    return get_peft_model(model, config)


def build_models(args, device: str):
    """(policy, reference-or-None, value model, reward model, policy tokenizer, reward tokenizer)."""
    from transformers import AutoModelForCausalLM

    from rlcd.models import load_tokenizer, resolve_dtype, resolve_model

    # full fine-tuning keeps fp32 master weights (bf16 steps of lr 1e-5 round away); LoRA trains fp32 adapters on bf16 weights
    weights = resolve_dtype(args.dtype, device) if args.lora else torch.float32
    path = resolve_model(args.policy)
    try:
        tokenizer = load_tokenizer(path)
        policy = AutoModelForCausalLM.from_pretrained(path, dtype=weights).to(device)
        # same weights and dtype as the policy: both run under the same autocast, so step 1 has KL exactly 0
        reference = None if args.lora else AutoModelForCausalLM.from_pretrained(path, dtype=weights).to(device)
    except OSError as e:
        raise UserError(f"--policy {args.policy}: cannot load ({str(e).splitlines()[0]})") from None
    rm, rm_tokenizer = load_reward_model(args.reward_model, device=device, dtype=args.dtype, flag="--reward-model")
    rm.requires_grad_(False)
    if args.lora:
        policy = with_lora(policy, args, "CAUSAL_LM")
    else:
        reference.requires_grad_(False).eval()
    policy.eval()  # no dropout anywhere: rollouts, old log-probs and updates see the same function
    if args.shared_value_head:
        value = ValueModel(None, policy.config.hidden_size).to(device)
        return policy, reference, value, rm, tokenizer, rm_tokenizer
    critic, _ = load_reward_model(args.value_model or args.reward_model, device=device, dtype="float32" if not args.lora else args.dtype,
                                  flag="--value-model")
    backbone = critic.base_model
    if rm_tokenizer.get_vocab() != tokenizer.get_vocab():
        # the value model reads the policy's token ids, so both must share one vocabulary
        raise UserError(f"--reward-model {args.reward_model}: its tokenizer differs from the policy's; "
                        "train the reward model from the policy's base model, or pass --value-model")
    if args.lora:
        backbone = with_lora(backbone, args)
    value = ValueModel(backbone, critic.config.hidden_size).to(device)
    value.eval()
    return policy, reference, value, rm, tokenizer, rm_tokenizer


def trainable_state(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}


def checkpointed_layers(*models) -> list[torch.nn.Module]:
    """Turn on activation checkpointing in Hugging Face models (--gradient-checkpointing); their transformer layers,
    which then keep only their inputs and recompute the rest in the backward pass, while `recomputing`."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    for model in models:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable  # renamed in transformers 5
        enable({"use_reentrant": False})
    return [m for model in models for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


@contextmanager
def recomputing(layers: list[torch.nn.Module]):
    """Hugging Face checkpoints a layer only in training mode: these layers are put in it, and only they (dropout
    below them stays off, so the updates compute the function the rollouts were evaluated with)."""
    for m in layers:
        m.training = True
    try:
        yield
    finally:
        for m in layers:
            m.training = False


# --------------------------------------------------------------------------------------------------
# Rollouts, and batches of them: prompts followed by right-padded responses
# --------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One sampled response and what PPO computes for it, filled in by the steps of `PPO.rollout` in order.

    Fields can be read by name too (rollout["score"]): `collate` and `pad_rows` take rollouts or plain dicts.
    """

    # sample
    k: int  # position in the step's rollout batch: the order every process agrees on
    index: int  # the prompt's index in the prompt file
    prompt: str
    prompt_ids: list[int]
    response_ids: list[int]  # an end-of-sequence token the response ended on is part of it
    text: str  # the decoded response
    eos: bool  # ended on an end-of-sequence token
    # score
    score: float = 0.0  # the reward model's, or --missing-marker-reward
    ended: bool = False  # reached the end marker (with --accept-eos, or an end-of-sequence token)
    # evaluate: one value per response token [n]
    logprobs: torch.Tensor | None = None  # under the policy that sampled it (the "old" log-probs)
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    entropy: float = 0.0  # mean over the response's tokens
    # estimate advantages [n]
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def __getitem__(self, key: str):
        return getattr(self, key)


def response_mask(rollouts: list[Rollout]) -> torch.Tensor:
    """[B, R]: 1 on each rollout's response tokens, 0 on the padding after them."""
    width = max(len(r.response_ids) for r in rollouts)
    return torch.tensor([[1.0] * len(r.response_ids) + [0.0] * (width - len(r.response_ids)) for r in rollouts])


def collate(rows: list, pad_id: int, device) -> dict:
    """Prompt + response of some rollout rows as one right-padded batch, and where each response token sits.

    Right padding (rather than left-padded prompts) leaves no position that attends to nothing, which
    some fused attention kernels answer with NaN. `gather[b, j]` is the position whose output predicts
    response token j of row b (the one before it); `mask` [b, R] marks real response tokens.
    """
    width = max(len(r["prompt_ids"]) + len(r["response_ids"]) for r in rows)
    width_r = max(len(r["response_ids"]) for r in rows)
    ids, mask, rmask, gather, response = [], [], [], [], []
    for r in rows:
        p, q = r["prompt_ids"], r["response_ids"]
        ids.append(p + q + [pad_id] * (width - len(p) - len(q)))
        mask.append([1] * (len(p) + len(q)) + [0] * (width - len(p) - len(q)))
        rmask.append([1] * len(q) + [0] * (width_r - len(q)))
        gather.append([len(p) - 1 + min(j, len(q) - 1) for j in range(width_r)])
        response.append(q + [pad_id] * (width_r - len(q)))
    return {
        "input_ids": torch.tensor(ids, device=device),
        "attention_mask": torch.tensor(mask, device=device),
        "position_ids": torch.arange(width, device=device).expand(len(rows), -1),
        "gather": torch.tensor(gather, device=device),
        "response_ids": torch.tensor(response, device=device),
        "mask": torch.tensor(rmask, device=device, dtype=torch.float32),
        "width_r": width_r,
    }


def gather_positions(hidden: torch.Tensor, batch: dict) -> torch.Tensor:
    """hidden [b, T, ...] -> [b, R, ...] at the positions that predict each response token."""
    index = batch["gather"]
    return torch.gather(hidden, 1, index.view(*index.shape, *([1] * (hidden.dim() - 2))).expand(-1, -1, *hidden.shape[2:]))


def response_logits(model, batch: dict, temperature: float) -> torch.Tensor:
    """Logits [b, R, V] that predict each response token (the vocabulary projection only where needed).

    Divided by the sampling temperature, so their log-softmax is the distribution the rollouts were drawn from.
    """
    return project(model, last_hidden(model, batch), batch, temperature)


def last_hidden(model, batch: dict) -> torch.Tensor:
    """The causal LM's last hidden states [b, T, H] (before the vocabulary projection)."""
    return model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               position_ids=batch["position_ids"], use_cache=False).last_hidden_state


def project(model, hidden: torch.Tensor, batch: dict, temperature: float) -> torch.Tensor:
    return model.get_output_embeddings()(gather_positions(hidden, batch)).float() / temperature


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.gather(logits.log_softmax(-1), 2, tokens[:, :, None]).squeeze(-1)


def response_values(value_model, batch: dict) -> torch.Tensor:
    values = value_model(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    return gather_positions(values, batch).float()


def batches(rollouts: list[Rollout], size: int, by_length: bool = False) -> list[list[Rollout]]:
    """Consecutive batches of `size` rollouts; by_length: of the rollouts in length order (prompt + response), so
    that each batch, padded to its longest, pads less (--sort-by-length)."""
    if by_length:
        rollouts = sorted(rollouts, key=lambda r: len(r.prompt_ids) + len(r.response_ids))
    return [rollouts[i : i + size] for i in range(0, len(rollouts), size)]


def pad_rows(rows: list, key: str, width: int, device) -> torch.Tensor:
    """One per-token field of some rollouts as [b, width], zero-padded on the right."""
    return torch.stack([F.pad(r[key], (0, width - len(r[key]))) for r in rows]).to(device)


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------


class PPO:
    def __init__(self, args, prompts: list[tuple[int, str, list[int]]], device: str):
        self.args, self.prompts, self.device = args, prompts, device
        self.rank, self.world = process_rank()
        self.comm_device = device if device.startswith("cuda") else "cpu"  # nccl reduces GPU tensors, gloo CPU ones
        self.policy, self.reference, self.value, self.rm, self.tokenizer, self.rm_tokenizer = build_models(args, device)
        self.pad_id = self.tokenizer.pad_token_id
        self.engine = make_rollout_engine(args.engine, self.policy, self.tokenizer, args.generation_batch_size)
        if self.reference is not None:  # the projection the engine gave the policy: the same arithmetic, so step 1's KL is 0
            from rlcd.engines.hf import vocabulary_rows_first

            vocabulary_rows_first(self.reference)
        self.reference_engine = self.reference_rollout_engine() if args.compare_reference else None
        self.reference_scores: dict[int, float] = {}  # --compare-reference: the reference's mean score by step
        params = [p for m in (self.policy, self.value) for p in m.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=args.learning_rate, eps=1e-5, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(step, args.steps))
        self.kl = KLController(args.kl, args.kl_target, args.kl_horizon)
        self.step = 0
        models = [m for m in (self.policy, self.value.backbone) if m is not None]
        self.checkpointed = checkpointed_layers(*models) if args.gradient_checkpointing else []
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") and args.dtype != "float32" else nullcontext()

    # -- which prompts a step uses: a pure function of (seed, step), so resume repeats nothing -----------

    def step_prompts(self, step: int) -> list[tuple[int, str, list[int]]]:
        n, size = len(self.prompts), self.args.rollouts
        orders: dict[int, list[int]] = {}  # one seeded permutation of the prompts per pass over them
        chosen = []
        for k in range(step * size, (step + 1) * size):
            epoch, pos = divmod(k, n)
            if epoch not in orders:
                orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(self.args.seed * 1_000_003 + epoch)).tolist()
            chosen.append(self.prompts[orders[epoch][pos]])
        return chosen

    def reference_context(self):
        return self.policy.disable_adapter() if self.args.lora else nullcontext()

    def reference_rollout_engine(self):
        """The engine that samples the reference for --compare-reference: with --lora the policy's own engine run with
        the adapters off, which an eager forward honours and the fast engine's CUDA graph would not."""
        a = self.args
        if not a.lora:
            return make_rollout_engine(a.engine, self.reference, self.tokenizer, a.generation_batch_size)
        from rlcd.engines.fast import FastEngine

        if isinstance(self.engine, FastEngine) and self.engine.on_cuda:
            raise UserError("--compare-reference with --lora on a GPU needs --engine hf (the fast engine's captured CUDA graph "
                            "cannot switch the adapters off)")
        return self.engine

    # -- the steps of docs/method.md §6, in order --------------------------------------------------

    @torch.no_grad()
    def rollout(self, step: int) -> tuple[list[Rollout], dict]:
        """One step's rollouts up to the losses: this process samples, scores and evaluates its share of them, then,
        with every process holding the whole batch, rewards are shaped and advantages estimated over all of it."""
        reference_time, first = 0.0, None
        if self.reference_engine is not None and step not in self.reference_scores:
            t = time.time()
            self.reference_scores, first = self.score_reference(step)
            reference_time = time.time() - t
        t0 = time.time()
        # before any update the policy is the reference (LoRA adapters start at zero): step 1's rollouts are the
        # reference's samples of step 1, already drawn and scored
        rollouts = first if step == 0 and first is not None else self.sample([step])[0]
        t1 = time.time()
        if rollouts is not first:
            self.score(rollouts)
        t2 = time.time()
        self.evaluate(rollouts)
        rollouts = self.gather(rollouts)
        mask = response_mask(rollouts)
        raw = torch.tensor([r.score for r in rollouts], dtype=torch.float32)
        rewards, kl = self.shaped_rewards(rollouts, raw, mask)
        self.estimate_advantages(rollouts, rewards, mask)
        n = len(rollouts)
        stats = {
            "reward_mean": float(rewards.sum(1).mean()),
            "reward_std": float(rewards.sum(1).std()) if n > 1 else 0.0,
            "score_mean": float(raw.mean()),
            "score_std": float(raw.std()) if n > 1 else 0.0,
            "kl": float(kl.sum(1).mean()),
            "kl_coef": self.kl.value,
            "reward_scaling": self.args.reward_scaling,
            "entropy": sum(r.entropy for r in rollouts) / n,
            "response_length": float(mask.sum(1).mean()),
            "missing_marker_frac": 1 - sum(r.ended for r in rollouts) / n,
            "time_rollout": round(t1 - t0, 3),
            "time_score": round(t2 - t1, 3),
            "time_forward": round(time.time() - t2, 3),
        }
        if self.reference_engine is not None:
            reference = self.reference_scores[step]
            stats.update(reference_score_mean=reference, score_gain=stats["score_mean"] - reference, time_reference=round(reference_time, 3))
        return rollouts, stats

    @torch.no_grad()
    def score_reference(self, first: int) -> tuple[dict[int, float], list[Rollout]]:
        """--compare-reference: the mean score of the reference's responses to the prompts of step `first` and the
        steps after it, sampled with the policy's seeds, by step, and this process's scored rollouts of step `first`.
        The reference never changes, so the samples of as many steps as fill one generation batch are drawn together
        (6 steps of 8 rollouts on 2 CPU cores: 25 s in one batch of 48 rows, 6-8 s for each batch of 8); each is the
        same as if drawn on its own step."""
        a = self.args
        per_batch = max(1, a.generation_batch_size * self.world // a.rollouts)
        steps = range(first, min(a.steps, first + per_batch))
        with self.reference_context():
            drawn = self.sample(list(steps), self.reference_engine)
        self.score([r for rollouts in drawn for r in rollouts])
        return {step: sum(r.score for r in self.gather(rollouts)) / a.rollouts for step, rollouts in zip(steps, drawn)}, drawn[0]

    def sample(self, steps: list[int], engine=None) -> list[list[Rollout]]:
        """Rollouts of each of these steps (one call of the engine): this process's share of the step's prompts (every
        world-th), each with one response sampled from the current policy (or what `engine` holds) at --temperature,
        no top-k/top-p, seeded by (--seed, prompt, step)."""
        a = self.args
        positions = range(self.rank, a.rollouts, self.world)
        requests = []  # (step, position in its batch, prompt)
        for step in steps:
            prompts = self.step_prompts(step)
            requests += [(step, k, prompts[k]) for k in positions]
        params = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=0, top_p=1.0,
                                stop=(dialogue.END_MARKER,) if a.stop_at_marker else ())
        seeds = [sample_seed(a.seed, index, f"ppo{step}", k) for step, k, (index, _, _) in requests]
        completions = (engine or self.engine).generate([p for _, _, (_, p, _) in requests], params, seeds)
        by_step: dict[int, list[Rollout]] = {step: [] for step in steps}
        for (step, k, (index, prompt, prompt_ids)), c in zip(requests, completions):
            # the end-of-sequence token the engine sampled, not tokenizer.eos_token_id: the engine stops on any of
            # the generation config's end ids (Qwen has two), and the last log-prob must be of the sampled token
            if c.finish_reason == "eos" and c.eos_token_id is None:
                raise RuntimeError(f"rollout engine {type(self.engine).__name__} did not say which end-of-sequence token it sampled")
            eos = c.finish_reason == "eos"
            by_step[step].append(Rollout(k, index, prompt, prompt_ids, list(c.token_ids) + ([c.eos_token_id] if eos else []), c.text, eos))
        return list(by_step.values())

    def score(self, rollouts: list[Rollout]) -> None:
        """Reward: the reward model's score of prompt + " " + the response cut at its end marker + the marker; a response
        that never reaches the marker (nor, with --accept-eos, an end-of-sequence token) gets --missing-marker-reward."""
        a = self.args
        ended = [(r, cut) for r in rollouts if (cut := end_of_response(r.text, r.eos, a.accept_eos)) is not None]
        texts = [format_rm_input(r.prompt, cut) for r, cut in ended]
        for r in rollouts:
            r.score, r.ended = float(a.missing_marker_reward), False
        for (r, _), score in zip(ended, score_texts(self.rm, self.rm_tokenizer, texts, a.forward_batch_size)):
            r.score, r.ended = score, True

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The current policy's tempered logits [b, R, V] and the value model's values [b, R] at the response tokens;
        with --shared-value-head from one forward of the policy."""
        hidden = last_hidden(self.policy, batch)
        logits = project(self.policy, hidden, batch, self.args.temperature)
        if self.value.backbone is None:
            return logits, self.value.read(gather_positions(hidden, batch)).float()
        return logits, response_values(self.value, batch)

    def evaluate(self, rollouts: list[Rollout]) -> None:
        """Old (sampling) log-probs and entropy under the policy, reference log-probs and values: a forward batch at a time."""
        a = self.args
        for part in batches(rollouts, a.forward_batch_size, a.sort_by_length):
            batch = collate(part, self.pad_id, self.device)
            with self.autocast:
                logits, values = self.forward(batch)
                logprobs = token_logprobs(logits, batch["response_ids"])
                entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
                del logits
                with self.reference_context():
                    reference = self.policy if self.reference is None else self.reference
                    ref = token_logprobs(response_logits(reference, batch, a.temperature), batch["response_ids"])
            for k, r in enumerate(part):
                n = len(r.response_ids)
                r.logprobs, r.ref_logprobs = logprobs[k, :n].float().cpu(), ref[k, :n].float().cpu()
                r.values, r.entropy = values[k, :n].float().cpu(), entropy[k, :n].float().mean().item()

    def gather(self, rollouts: list[Rollout]) -> list[Rollout]:
        """Every process's rollouts, in the step's order: what follows is the same on every process."""
        if self.world == 1:
            return rollouts
        import torch.distributed as dist

        shards = [None] * self.world
        dist.all_gather_object(shards, rollouts)
        return sorted((r for shard in shards for r in shard), key=lambda r: r.k)

    def shaped_rewards(self, rollouts: list[Rollout], scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shaping: per-token rewards [B, R] (KL penalty, the score on the last token), scaled per --reward-scaling,
        and the per-token KL estimate."""
        a = self.args
        if a.reward_scaling == "scores" and len(scores) > 1 and scores.std() > 1e-6:
            scores = scores / scores.std()
        width = mask.shape[1]
        logprobs, ref = pad_rows(rollouts, "logprobs", width, "cpu"), pad_rows(rollouts, "ref_logprobs", width, "cpu")
        rewards, kl = shape_rewards(scores, logprobs, ref, mask, self.kl.value)
        if a.reward_scaling == "shaped":  # AlpacaFarm's whiten_rewards: unit std over all response tokens, mean kept
            rewards = whiten(rewards, mask, shift_mean=False)
        return rewards, kl

    def estimate_advantages(self, rollouts: list[Rollout], rewards: torch.Tensor, mask: torch.Tensor) -> None:
        """Advantages: GAE over the values, whitened over the whole rollout batch; and the value targets (returns)."""
        values = pad_rows(rollouts, "values", mask.shape[1], "cpu")
        advantages, returns = gae(rewards, values, mask, self.args.gamma, self.args.lam)
        advantages = whiten(advantages, mask)
        for k, r in enumerate(rollouts):
            n = len(r.response_ids)
            r.advantages, r.returns = advantages[k, :n], returns[k, :n]

    def losses(self, part: list[Rollout]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Losses of some rollouts under the current policy and value model: token sums of the clipped policy loss
        and the clipped value loss, and the clipped-token count (`ppo_losses`)."""
        a = self.args
        batch = collate(part, self.pad_id, self.device)
        width = batch["width_r"]
        with self.autocast, recomputing(self.checkpointed):
            logits, values = self.forward(batch)
            logprobs = token_logprobs(logits, batch["response_ids"])
        return ppo_losses(
            logprobs, pad_rows(part, "logprobs", width, self.device), pad_rows(part, "advantages", width, self.device),
            values, pad_rows(part, "values", width, self.device), pad_rows(part, "returns", width, self.device),
            batch["mask"], a.clip_range, a.clip_range_value,
        )

    def train(self, rollouts: list[Rollout], step: int) -> dict:
        """Updates: --epochs passes over the rollouts in shuffled minibatches; one optimizer step per minibatch on the
        gradient of (policy loss + --vf-coef * value loss) / its response tokens, accumulated over micro-batches."""
        a = self.args
        g = torch.Generator().manual_seed(a.seed * 7919 + step)
        totals = {"policy_loss": 0.0, "value_loss": 0.0, "clip_frac": 0.0, "tokens": 0.0, "grad_norm": 0.0}
        updates = skipped = 0
        for _ in range(a.epochs):
            order = torch.randperm(len(rollouts), generator=g).tolist()
            for start in range(0, len(order), a.minibatch_size):
                minibatch = [rollouts[i] for i in order[start : start + a.minibatch_size]]
                tokens = sum(len(r.response_ids) for r in minibatch)
                self.optimizer.zero_grad(set_to_none=True)
                for part in batches(minibatch, a.micro_batch_size, a.sort_by_length)[self.rank :: self.world]:  # this process's share
                    pg, vf, clipped = self.losses(part)
                    ((pg + a.vf_coef * vf) / tokens).backward()
                    totals["policy_loss"] += pg.item()
                    totals["value_loss"] += vf.item()
                    totals["clip_frac"] += clipped.item()
                params = [p for group in self.optimizer.param_groups for p in group["params"]]
                if self.world > 1:  # the minibatch's gradient is the sum of every process's share
                    self.sum_over_processes([self.grad_of(p) for p in params])
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm))
                totals["tokens"] += tokens
                if not math.isfinite(grad_norm):  # never let one bad minibatch turn every weight into NaN
                    skipped += 1
                    continue
                totals["grad_norm"] += grad_norm
                self.optimizer.step()
                updates += 1
        n = totals.pop("tokens")
        if self.world > 1:
            sums = torch.tensor([totals["policy_loss"], totals["value_loss"], totals["clip_frac"]], dtype=torch.float64)
            self.sum_over_processes([sums])
            totals["policy_loss"], totals["value_loss"], totals["clip_frac"] = sums.tolist()
        return {
            "policy_loss": totals["policy_loss"] / n, "value_loss": totals["value_loss"] / n, "clip_frac": totals["clip_frac"] / n,
            "grad_norm": totals["grad_norm"] / max(updates, 1), "optimizer_steps": updates, "nonfinite_updates_skipped": skipped,
        }

    @staticmethod
    def grad_of(p: torch.Tensor) -> torch.Tensor:
        if p.grad is None:  # a process whose micro-batches never reached this parameter
            p.grad = torch.zeros_like(p)
        return p.grad

    def sum_over_processes(self, tensors: list[torch.Tensor]) -> None:
        import torch.distributed as dist

        for t in tensors:
            on = t.to(self.comm_device)
            dist.all_reduce(on)
            t.copy_(on)

    def run_step(self) -> dict:
        step = self.step
        lr = self.scheduler.get_last_lr()[0]
        t0 = time.time()
        rollouts, stats = self.rollout(step)
        t1 = time.time()
        stats.update(self.train(rollouts, step))
        self.scheduler.step()
        self.kl.update(stats["kl"], len(rollouts))
        self.step += 1
        return {"step": self.step, **stats, "lr": lr, "time_train": round(time.time() - t1, 3), "time_step": round(time.time() - t0, 3)}

    # -- checkpoints -------------------------------------------------------------------------------

    def save_checkpoint(self, out_dir: Path) -> Path:
        from safetensors.torch import save_file

        final = out_dir / "checkpoints" / f"step-{self.step}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(trainable_state(self.policy), tmp / "policy.safetensors")
        save_file(trainable_state(self.value), tmp / "value.safetensors")
        torch.save({"step": self.step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "kl_coef": self.kl.value}, tmp / "trainer_state.pt")
        for item in tmp.iterdir():  # on disk before the rename makes it a checkpoint, and before older ones go
            fd = os.open(item, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        os.replace(tmp, final)
        # keep the last --save-total-limit complete checkpoints; anything else there (older ones, a .tmp or a
        # half-deleted one left by a crash) goes
        keep = {path for _, path in checkpoints(out_dir)[-self.args.save_total_limit :]}
        for item in (out_dir / "checkpoints").iterdir():
            if item not in keep:
                shutil.rmtree(item, ignore_errors=True)
        return final

    def load_checkpoint(self, path: Path) -> None:
        from safetensors.torch import load_file

        for module, name in ((self.policy, "policy"), (self.value, "value")):
            state = load_file(path / f"{name}.safetensors")
            missing = [n for n, p in module.named_parameters() if p.requires_grad and n not in state]
            if missing:
                raise UserError(f"{path}: checkpoint does not match these settings (no {missing[0]}); resume with the same --lora/--policy")
            with torch.no_grad():
                for n, p in module.named_parameters():
                    if n in state:
                        p.copy_(state[n].to(p.dtype))
        state = torch.load(path / "trainer_state.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl.value, self.step = state["kl_coef"], state["step"]

    def save_final(self, out_dir: Path, card: artifacts.Card) -> None:
        """The policy (LoRA adapters merged) as a plain Hugging Face checkpoint, with its model card, generation config
        and chat template (`artifacts`)."""
        model = self.policy.merge_and_unload() if self.args.lora else self.policy
        tmp = out_dir / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        artifacts.save_policy_files(tmp, self.tokenizer, card)
        for item in tmp.iterdir():
            os.replace(item, out_dir / item.name)
        tmp.rmdir()


def process_rank() -> tuple[int, int]:
    """(rank, number of processes): (0, 1) unless started by `accelerate launch` / torchrun with several."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def start_processes(device: str) -> None:
    """Join the process group when launched as several processes (gloo on CPU, nccl on GPUs)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")


def checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for p in (out_dir / "checkpoints").glob("step-*"):
        if p.name.split("-", 1)[1].isdigit() and (p / "trainer_state.pt").exists():
            found.append((int(p.name.split("-", 1)[1]), p))
    return sorted(found)


def make_rollout_engine(kind: str, policy, tokenizer, batch_size: int):
    from rlcd.engines.hf import HFEngine

    on_cuda = next(policy.parameters()).device.type == "cuda"
    if kind == "fast" or (kind == "auto" and on_cuda):
        from rlcd.engines.fast import FastEngine

        return FastEngine(policy, tokenizer, batch_size=batch_size)
    return HFEngine(policy, tokenizer, batch_size=batch_size)


def load_tokenizer_for(args):
    from rlcd.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(args.policy))


def load_ppo_prompts(path: str, tokenizer, max_prompt_tokens: int) -> tuple[list[tuple[int, str, list[int]]], dict]:
    prompts = dialogue.load_prompts(path)
    kept, skipped = [], dict(prompts.skipped)
    too_long = 0
    for index, prompt in prompts.items:
        ids = tokenizer(prompt, add_special_tokens=True).input_ids
        if len(ids) > max_prompt_tokens:
            too_long += 1
            continue
        kept.append((index, prompt, ids))
    if too_long:
        skipped[f"longer than {max_prompt_tokens} tokens"] = too_long
    if not kept:
        raise UserError(f"{path}: no usable prompts (skipped: {skipped or 'empty file'})")
    return kept, skipped


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def truncate_log(log: Path, last_step: int) -> None:
    """Drop log lines of steps after the checkpoint we resume from (they will run again)."""
    if not log.exists():
        return
    keep = []
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line torn by a crash
    atomic_write_text(log, "".join(x + "\n" for x in keep))


def run(args: PpoConfig) -> None:
    from rlcd.models import default_device, resolve_model

    require_tracker(args.report_to)
    out_dir = Path(args.out_dir)
    if (out_dir / "config.json").exists() and (out_dir / "manifest.json").exists():
        print(f"{out_dir}: already trained (final checkpoint exists); nothing to do")
        print(out_dir)
        return
    found = checkpoints(out_dir)
    if found and not args.resume:
        raise UserError(f"{out_dir}: holds PPO checkpoints; pass --resume to continue, or choose another --out-dir")
    ensure_dir(out_dir)
    device = args.device or default_device()
    start_processes(device)
    rank, world = process_rank()
    if args.rollouts % world or args.minibatch_size % world:
        raise UserError(f"--rollouts {args.rollouts} and --minibatch-size {args.minibatch_size} must divide by the {world} processes")
    main = rank == 0  # only the first process writes logs, checkpoints and the model
    prompts, skipped = load_ppo_prompts(args.prompts, load_tokenizer_for(args), args.max_prompt_tokens)
    if skipped and main:
        print(f"prompts: {len(prompts)} usable, skipped {skipped}")
    torch.manual_seed(args.seed)
    ppo = PPO(args, prompts, device)
    log = out_dir / "log.jsonl"
    started = now()
    if found and args.resume:
        ppo.load_checkpoint(found[-1][1])
        if main:
            print(f"resumed from {found[-1][1]} (step {ppo.step})")
    if main:
        truncate_log(log, ppo.step)
    with tracking(args, out_dir, main) as track:
        while ppo.step < args.steps:
            stats = ppo.run_step()
            if not main:
                continue
            append_lines(log, [stats])
            track(stats)
            gain = f" ({stats['score_gain']:+.3f} over the starting policy)" if "score_gain" in stats else ""
            print(f"step {stats['step']}/{args.steps}: score {stats['score_mean']:.3f}{gain}, kl {stats['kl']:.3f}, "
                  f"len {stats['response_length']:.0f}, no-marker {stats['missing_marker_frac']:.2f}, "
                  f"{stats['time_step']:.1f}s (rollout {stats['time_rollout']:.1f}s)", flush=True)
            if ppo.step % args.save_every == 0 or ppo.step == args.steps:
                ppo.save_checkpoint(out_dir)
    if main:
        last = load_shard(log)[-1]
        ppo.save_final(out_dir, artifacts.Card(
            stage="ppo", base_model=args.policy, base_path=resolve_model(args.policy), settings=public_config(args), example=prompts[0][1],
            data=[(args.prompts, f"{len(prompts)} usable prompts; skipped: {skipped or 0}"),
                  (args.reward_model, "the reward model" + ("" if args.value_model or args.shared_value_head else ", and the value model's start"))]
            + ([(args.value_model, "the value model's start")] if args.value_model else []),
            metrics={k: last.get(k) for k in ("step", "score_mean", "reward_mean", "kl", "kl_coef", "entropy", "response_length",
                                             "missing_marker_frac")},
            sampling={"temperature": args.temperature, "max_new_tokens": args.max_new_tokens}))
        write_manifest(out_dir / "manifest.json", stage="ppo", config=public_config(args), seed=args.seed, processes=world,
                       started_at=started, finished_at=now(), counts={"prompts": len(prompts), "skipped": skipped, "steps": ppo.step})
        print(out_dir)


@contextmanager
def tracking(args, out_dir: Path, main: bool):
    """A function that sends one step's figures to TensorBoard (OUT/tensorboard) or W&B (--report-to); closed at the end.

    Only the first process reports; elsewhere, and with 'none', the function does nothing.
    """
    if args.report_to == "none" or not main:
        yield lambda stats: None
    elif args.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(out_dir / "tensorboard"))

        def write(stats):
            for k, v in numbers(stats).items():
                tb.add_scalar(f"ppo/{k}", v, stats["step"])
            tb.flush()

        try:
            yield write
        finally:
            tb.close()
    else:
        import wandb

        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "rlcd"), name=args.run_name, config=public_config(args))
        try:
            yield lambda stats: run.log({f"ppo/{k}": v for k, v in numbers(stats).items()}, step=stats["step"])
        finally:
            run.finish()


def numbers(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k != "step" and isinstance(v, (int, float))}


def public_config(args) -> dict:
    return {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "config"}


@dataclass
class PpoConfig(TrackingOptions):
    """`rlcd ppo`: align a policy with PPO against a reward model (docs/method.md §6)."""

    command: ClassVar[str] = "ppo"
    prompts: str | None = option(None, "hh-rlhf dialogues (jsonl[.gz]) or a prompt list", flags=("--prompts-file", "--prompts"),
                                 required=True)
    reward_model: str | None = option(None, "reward model directory written by rlcd train-rm", required=True)
    policy: str = option("smollm2", "starting policy (and frozen reference)", flags=("--model", "--policy"))
    value_model: str | None = option(None, "initialise the value model from this reward model instead of --reward-model")
    shared_value_head: bool = option(False, "the value model is only a zero-initialised head on the policy's last hidden states, as in "
                                     "TRL's original PPOTrainer and trlx: one forward and backward of the policy serve both losses "
                                     "(about half the update compute of a separate value model, and no copy of the reward model), "
                                     "and the value loss, weighted by --vf-coef, trains the policy's weights too (default: off)")
    out_dir: str | None = option(None, "directory of the log, checkpoints and the final policy", required=True)
    steps: int = option(80, "PPO steps (docs/method.md §6: 40-80)", type=positive_int)
    rollouts: int = option(512, "rollouts per PPO step", type=positive_int)
    minibatch_size: int = option(256, "rows per optimizer step", type=positive_int)
    micro_batch_size: int = option(16, "rows per forward/backward (gradient accumulation)", type=positive_int)
    forward_batch_size: int = option(32, "rows per no-grad forward (log-probs, values, rewards)", type=positive_int)
    sort_by_length: bool = option(False, "fill forward batches and micro-batches with rollouts in length order (prompt + response), so "
                                  "each pads less: the same minibatches and losses up to float rounding, less compute (default: off)")
    gradient_checkpointing: bool = option(False, "in the updates, policy and value model keep only each layer's input and recompute the "
                                          "rest in the backward pass: activation memory for larger --micro-batch-size, for about one "
                                          "more forward pass (default: off)")
    generation_batch_size: int = option(256, "rows decoded at once by the rollout engine", type=positive_int)
    epochs: int = option(2, "passes over each rollout batch", type=positive_int)
    kl: float = option(0.002, "KL penalty coefficient beta (docs/method.md §6: 0.002 or 0.004)")
    kl_target: float | None = option(None, "adaptive KL: target KL per sequence (fixed beta when absent)")
    kl_horizon: int = option(10000, "adaptive KL: horizon of the update rule, in rollouts", type=positive_int)
    learning_rate: float = option(1e-5, "AdamW peak learning rate (warm-up over min(5, steps/10) steps, at least 1, then linear decay)")
    max_grad_norm: float = option(1.0, "clip the gradient norm of each optimizer step to this")
    clip_range: float = option(0.2, "PPO clip range of the policy ratio")
    clip_range_value: float = option(0.2, "clip range of the value model's change")
    vf_coef: float = option(0.1, "weight of the value loss")
    gamma: float = option(1.0, "GAE discount")
    lam: float = option(1.0, "GAE lambda")
    max_new_tokens: int = option(300, "token limit of a sampled response", type=positive_int)
    max_prompt_tokens: int = option(192, "prompts longer than this are skipped (counted)", type=positive_int)
    temperature: float = option(1.0, "sampling temperature (log-probs and KL are of this tempered distribution)")
    missing_marker_reward: float = option(-1.0, "reward of a response that never reaches the end marker")
    accept_eos: bool = option(False, "a response ended by the model's EOS token counts as ended (instruct models)")
    stop_at_marker: bool = option(True, "keep sampling after the end marker until EOS or the token limit (the original); by default "
                                  "rollouts stop there", flags=("--no-stop-at-marker",))
    reward_scaling: str = option("shaped", "shaped (default): rescale the per-token rewards (KL penalty included) to unit std over the "
                                 "step's response tokens, keeping their mean, as AlpacaFarm does: the scaling the paper's --kl "
                                 "0.002-0.004 was tuned under; scores: divide only the reward-model scores by their std before shaping "
                                 "(the earlier default); none: no scaling", choices=("shaped", "scores", "none"), exclusive="scaling",
                                 extra=((("--no-scale-rewards",), dict(action="store_const", const="none",
                                                                       help="same as --reward-scaling none (older flag)")),))
    lora: bool = option(False, "LoRA adapters for policy and value (reference = adapters off)")
    lora_r: int = option(16, "LoRA rank", type=positive_int)
    lora_alpha: int = option(32, "LoRA scaling alpha", type=positive_int)
    engine: str = option("auto", "rollout engine (auto: fast on GPU)", choices=("auto", "fast", "hf"))
    compare_reference: bool = option(False, "each step also samples its prompts from the reference with the same seeds and logs "
                                     "reference_score_mean and score_gain (the policy's score minus it): a curve that cancels the "
                                     "prompt draw and sampling noise, for one more generation and scoring a step (default: off; "
                                     "with --lora on a GPU it needs --engine hf)")
    dtype: str = option("auto", "dtype of the reward model and, with --lora, of the frozen weights of policy and value model "
                        "(auto: bf16 on GPU)", choices=("auto", "float32", "bfloat16", "float16"))
    device: str | None = option(None, "default: cuda if available, else cpu")
    seed: int = option(DEFAULT_SEED, "seeds sampling, prompt order and initialisation", type=non_negative_int)
    save_every: int = option(20, "checkpoint every N steps", type=positive_int)
    save_total_limit: int = option(2, "keep only the last N checkpoints; older ones are deleted once a new one is completely written",
                                   type=positive_int)
    resume: bool = option(False, "continue from the last checkpoint in --out-dir")

    def validate(self) -> None:
        super().validate()
        if self.kl < 0:
            raise UserError(f"--kl {self.kl}: the KL coefficient cannot be negative")
        if self.kl_target is not None and self.kl_target <= 0:
            raise UserError(f"--kl-target {self.kl_target}: must be positive")
        if self.learning_rate <= 0:
            raise UserError(f"--learning-rate {self.learning_rate}: must be positive")
        if self.temperature <= 0:
            raise UserError(f"--temperature {self.temperature}: PPO samples from the policy; use a positive temperature")
        if self.shared_value_head and self.value_model:
            raise UserError("--shared-value-head and --value-model exclude each other: the shared head starts from zero on the policy")
        if self.minibatch_size > self.rollouts:
            raise UserError(f"--minibatch-size {self.minibatch_size} is larger than --rollouts {self.rollouts}")
        if not 0 < self.clip_range < 1 or self.clip_range_value <= 0:
            raise UserError("--clip-range must be in (0, 1) and --clip-range-value positive")
        for flag, value in (("--gamma", self.gamma), ("--lam", self.lam)):
            if not 0 <= value <= 1:
                raise UserError(f"{flag} {value}: must be in [0, 1]")


CONFIGS = {"ppo": PpoConfig}
