"""The in-process engine against plain transformers `generate`, and the seeded sampler's distribution."""

import math
from types import SimpleNamespace

import pytest
import torch

from rlcd.engines import SamplingParams, hf, sampling
from rlcd.engines.hf import HFEngine
from rlcd.engines.sampling import sample, uniform
from rlcd.models import load_causal_lm

PROMPTS = [
    "Human: How do I bake bread?\n\nAssistant:",
    "Human: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Why do some people hate cats so much?\n\nAssistant:",
    "Human: Tell me a story.\n\nAssistant:",
]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    model, tokenizer = load_causal_lm(tiny_model_dir, device="cpu", dtype="float32")
    return HFEngine(model, tokenizer, batch_size=8)


def test_greedy_equals_plain_generate(engine):
    params = SamplingParams(max_new_tokens=24, temperature=0, stop_at_eos=False)
    ours = engine.generate(PROMPTS, params, seeds=[0, 1, 2])
    enc = engine.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    ref = engine.model.generate(**enc, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=engine.tokenizer.pad_token_id)
    for i, completion in enumerate(ours):
        expected = engine.tokenizer.decode(ref[i, enc.input_ids.shape[1]:])
        assert completion.text == expected
        assert completion.finish_reason == "length" and completion.num_tokens == 24


def test_samples_do_not_depend_on_batch_or_position(engine):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=50)
    together = engine.generate(PROMPTS, params, seeds=[11, 12, 13])
    alone = [engine.generate([p], params, seeds=[s])[0] for p, s in zip(PROMPTS, [11, 12, 13])]
    reversed_ = engine.generate(PROMPTS[::-1], params, seeds=[13, 12, 11])[::-1]
    assert [c.text for c in together] == [c.text for c in alone] == [c.text for c in reversed_]
    other_seed = engine.generate(PROMPTS[:1], params, seeds=[99])[0]
    assert other_seed.text != together[0].text


def test_stop_strings_and_banned_tokens(engine):
    # push the random model towards the stop string's tokens so it appears quickly
    stop_ids = engine.tokenizer("\nHuman", add_special_tokens=False).input_ids
    banned = engine.banned_token_ids(("`",))
    assert len(banned) > 0 and all("`" in engine.tokenizer.decode([i]) for i in banned.tolist())
    def push_stop_tokens(module, inputs, logits):
        logits[..., stop_ids] += 20.0
        return logits

    hook = engine.model.lm_head.register_forward_hook(push_stop_tokens)
    try:
        params = SamplingParams(max_new_tokens=40, temperature=1.0, top_k=0, stop=("\nHuman",), banned=("`",))
        outs = engine.generate(PROMPTS, params, seeds=[1, 2, 3])
    finally:
        hook.remove()
    for c in outs:
        assert c.finish_reason == "stop" and c.text.endswith("\nHuman") and c.text.count("\nHuman") == 1
        assert "`" not in c.text


def test_next_token_logprobs_match_a_forward_pass(engine):
    prompts = [p + " (A) yes (B) no. The answer is: (" for p in PROMPTS]
    logprobs, ids = engine.next_token_logprobs(prompts, ["A", "B"])
    tok = engine.tokenizer
    assert [tok.convert_ids_to_tokens(i) for i in ids] == ["A", "B"]  # the pieces that really follow "("
    for prompt, (la, lb) in zip(prompts, logprobs):
        enc = tok(prompt, return_tensors="pt")
        ref = engine.model(**enc).logits[0, -1].log_softmax(-1)
        assert la == pytest.approx(ref[ids[0]].item(), abs=1e-4)
        assert lb == pytest.approx(ref[ids[1]].item(), abs=1e-4)


def test_sampler_draws_from_softmax_with_top_k_and_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 20000
    seeds = torch.arange(n)
    rows = logits.expand(n, -1)

    def freq(**kw):
        drawn = sample(rows, seeds, step=3, **kw)
        return torch.bincount(drawn, minlength=6).float() / n

    full = logits.softmax(-1)[0]
    assert torch.allclose(freq(temperature=1.0, top_k=0, top_p=1.0), full, atol=0.015)
    top3 = logits[0, :3].softmax(-1)
    got = freq(temperature=1.0, top_k=3, top_p=1.0)
    assert torch.allclose(got[:3], top3, atol=0.015) and got[3:].sum() == 0
    # top-p 0.8: tokens 0 and 1 hold 0.56 + 0.21 < 0.8, token 2 brings it to 0.89, the rest are dropped
    got = freq(temperature=1.0, top_k=0, top_p=0.8)
    assert torch.allclose(got[:3], top3, atol=0.015) and got[3:].sum() == 0
    hot = freq(temperature=2.0, top_k=0, top_p=1.0)
    assert torch.allclose(hot, (logits[0] / 2).softmax(-1), atol=0.015)
    assert (sample(rows[:5], seeds[:5], 0, temperature=0, top_k=0, top_p=1.0) == 0).all()


@pytest.mark.parametrize("kw", [dict(temperature=1.0, top_k=0, top_p=1.0), dict(temperature=0.7, top_k=5, top_p=1.0),
                                dict(temperature=1.0, top_k=0, top_p=0.9)])
def test_cpu_draws_a_few_rows_at_a_time_and_gets_the_same_tokens(monkeypatch, kw):
    logits, seeds = torch.randn(11, 64) * 3, torch.arange(11) * 7919 + 5
    for step in (4, torch.arange(11) + 2):
        whole = sample(logits, seeds, step, **kw)
        monkeypatch.setattr(sampling, "CPU_CHUNK", 3 * 64)  # chunks of 3 rows: 3 + 3 + 3 + 2
        assert torch.equal(sample(logits, seeds, step, **kw), whole)
        monkeypatch.undo()
    assert len(set(whole.tolist())) > 3  # the rows differ: a draw that ignored its row would fail above


def test_uniforms_are_uniform_and_keyed_by_seed_step_token():
    ids = torch.arange(1000).expand(50, -1)
    u = uniform(torch.arange(50), 7, ids)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    assert torch.equal(u, uniform(torch.arange(50), 7, ids))
    assert not torch.equal(u, uniform(torch.arange(50), 8, ids))
    assert torch.equal(u[3], uniform(torch.tensor([3]), 7, ids[:1])[0])
    # no correlation between neighbouring seeds
    corr = torch.corrcoef(torch.stack([u[0], u[1]]))[0, 1].item()
    assert abs(corr) < 0.1 and not math.isnan(corr)


def test_letter_logprobs_of_a_bf16_model_come_from_an_fp32_projection(tiny_model_dir):
    """In bf16, logits are rounded to a few bits, so two letters often tie exactly (a judge's "no preference");
    the engine lifts the last hidden state and the output projection to fp32."""
    model, tokenizer = load_causal_lm(tiny_model_dir, device="cpu", dtype="bfloat16")
    engine = HFEngine(model, tokenizer, batch_size=8)
    prompts = [p + " (A) yes (B) no. The answer is: (" for p in PROMPTS]
    logprobs, ids = engine.next_token_logprobs(prompts, ["A", "B"])
    for prompt, lp in zip(prompts, logprobs):
        enc = tokenizer(prompt, return_tensors="pt")
        hidden = model.get_decoder()(**enc).last_hidden_state[0, -1].float()
        expected = (hidden @ model.get_output_embeddings().weight.float().T).log_softmax(-1)[ids]
        assert lp == pytest.approx(expected.tolist(), abs=1e-4)
        bf16 = model(**enc).logits[0, -1].log_softmax(-1)[ids].float()
        assert lp != pytest.approx(bf16.tolist(), abs=1e-6)  # not the bf16 logits: those are coarser


def test_a_cpu_engine_projects_to_the_vocabulary_rows_first_with_the_same_logits_and_gradients(tiny_model_dir):
    """vocabulary_rows_first (done when an engine is built): a float32 CPU model's output projection gives nn.Linear's
    logits and input gradients, contiguous, with the same state dict, and a deep copy projects with its own weights;
    a bf16 model keeps nn.Linear's."""
    import copy

    model, tokenizer = load_causal_lm(tiny_model_dir, device="cpu", dtype="float32")
    head, keys = model.get_output_embeddings(), list(model.state_dict())
    hidden = torch.randn(2, 5, head.in_features, requires_grad=True)
    expected = torch.nn.functional.linear(hidden, head.weight, head.bias)
    (grad,) = torch.autograd.grad(expected.square().sum(), hidden)
    HFEngine(model, tokenizer)
    assert "forward" in vars(head) and list(model.state_dict()) == keys
    logits = head(hidden)
    assert logits.shape == expected.shape and logits.is_contiguous() and torch.allclose(logits, expected, atol=1e-5)
    assert torch.allclose(torch.autograd.grad(logits.square().sum(), hidden)[0], grad, atol=1e-4)
    wide = torch.nn.Linear(8, 2 * hf.VOCAB_BLOCK + 5)  # without gradients a block of vocabulary rows at a time
    hf.vocabulary_rows_first(SimpleNamespace(get_output_embeddings=lambda: wide))
    with torch.no_grad():
        x = torch.randn(3, 4, 8)
        assert torch.allclose(wide(x), torch.nn.functional.linear(x, wide.weight, wide.bias), atol=1e-5)
    many = torch.randn(hf.VOCAB_FIRST_ROWS + 1, head.in_features)  # past the bound: nn.Linear's own product
    assert torch.equal(head(many), torch.nn.functional.linear(many, head.weight, head.bias))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.get_output_embeddings().weight.mul_(2)
    assert torch.allclose(twin.get_output_embeddings()(hidden), 2 * head(hidden), atol=1e-5)
    bf16, _ = load_causal_lm(tiny_model_dir, device="cpu", dtype="bfloat16")
    HFEngine(bf16, tokenizer)
    assert "forward" not in vars(bf16.get_output_embeddings())


def test_auto_means_the_fast_engine_on_cuda_and_the_plain_one_elsewhere(tiny_model_dir):
    """One place decides what --engine auto means, for simulate, generate and PPO's rollouts alike."""
    from rlcd.engines import engine_kind, load_engine, make_engine
    from rlcd.engines.fast import FastEngine

    assert engine_kind("auto", "cuda:1") == "fast" and engine_kind("auto", torch.device("cuda", 0)) == "fast"
    assert engine_kind("auto", "cpu") == "hf" and engine_kind("auto", torch.device("cpu")) == "hf"
    assert engine_kind("fast", "cpu") == "fast" and engine_kind("hf", "cuda:0") == "hf"
    with pytest.raises(ValueError):
        engine_kind("vllm", "cpu")
    model, tokenizer = load_causal_lm(tiny_model_dir, device="cpu", dtype="float32")
    assert type(make_engine(model, tokenizer, batch_size=4)) is HFEngine
    fast = make_engine(model, tokenizer, kind="fast", batch_size=4)
    assert isinstance(fast, FastEngine) and fast.batch_size == 4
    engine, info = load_engine(tiny_model_dir, kind="auto", device="cpu", dtype="float32", batch_size=3)
    assert type(engine) is HFEngine and engine.batch_size == 3
    assert info == {"backend": "hf", "engine": "hf", "model": tiny_model_dir, "path": tiny_model_dir, "device": "cpu",
                    "dtype": "torch.float32"}


def test_simulate_and_generate_build_their_engine_through_the_one_factory(tiny_model_dir):
    from types import SimpleNamespace

    from rlcd import generate, simulate
    from rlcd.engines import load_engine

    flags = SimpleNamespace(backend="hf", model=tiny_model_dir, engine="fast", device="cpu", dtype="float32", batch_size=2)
    expected = load_engine(tiny_model_dir, kind="fast", device="cpu", dtype="float32", batch_size=2)[1]
    for stage in (simulate, generate):
        engine, info = stage.make_engine(flags)
        assert engine.name == "fast" and engine.batch_size == 2 and info == expected
