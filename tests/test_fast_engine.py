"""FastEngine (continuous batching over KV-cache slots) against HFEngine and plain `generate`."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlcd.engines import Completion, SamplingParams
from rlcd.engines.fast import PREFILL_TOKENS, FastEngine
from rlcd.engines.hf import HFEngine
from rlcd.models import load_causal_lm

# different lengths (so different left padding), more prompts than FastEngine's 3 slots
PROMPTS = [
    "Human: How do I bake bread?\n\nAssistant:",
    "Hi",
    "Human: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Why do some people hate cats so much?\n\nAssistant:",
    "Tell me a story.",
    "Human: " + "Please list every prime number below one hundred, with a short note on each. " * 4 + "\n\nAssistant:",
    "x y z",
    "Human: What is the capital of France?\n\nAssistant: Paris.\n\nHuman: And of Italy?\n\nAssistant:",
]
SEEDS = [5, 6, 7, 8, 9, 10, 11]


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    # fp32: the engines' attention kernels differ, and bf16 rounding would turn that into near-tie flips
    model, tokenizer = load_causal_lm(tiny_model_dir, device="cpu", dtype="float32")
    return HFEngine(model, tokenizer, batch_size=8), FastEngine(model, tokenizer, batch_size=3)


@pytest.fixture
def eos_on_some_rows(engines):
    """Force EOS whenever a row's top token id is a multiple of 7: rows end at different steps, decided by their own logits."""
    hf, _ = engines
    eos = hf.tokenizer.eos_token_id

    def push_eos(module, inputs, logits):
        logits[..., eos] += torch.where(logits.argmax(-1) % 7 == 0, 1e4, 0.0)
        return logits

    hook = hf.model.lm_head.register_forward_hook(push_eos)
    yield
    hook.remove()


def test_greedy_equals_hf_engine_and_plain_generate(engines):
    hf, fast = engines
    params = SamplingParams(max_new_tokens=20, temperature=0, stop_at_eos=False)
    ours = fast.generate(PROMPTS, params, SEEDS)
    assert ours == hf.generate(PROMPTS, params, SEEDS)
    tok = hf.tokenizer
    for prompt, completion in zip(PROMPTS, ours):
        enc = tok(prompt, return_tensors="pt")
        ref = hf.model.generate(**enc, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
        assert completion.text == tok.decode(ref[0, enc.input_ids.shape[1]:])
        assert completion.finish_reason == "length" and completion.num_tokens == 20


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=30, temperature=0),
    SamplingParams(max_new_tokens=30, temperature=1.0, top_k=50),
    SamplingParams(max_new_tokens=30, temperature=0.7, top_k=0, top_p=0.9),
], ids=["greedy", "top-k", "top-p"])
def test_rows_ending_early_refill_their_slots(engines, eos_on_some_rows, params):
    hf, fast = engines
    ours = fast.generate(PROMPTS, params, SEEDS)
    assert ours == hf.generate(PROMPTS, params, SEEDS)
    lengths = {c.num_tokens for c in ours if c.finish_reason == "eos"}
    assert len(lengths) >= 2, "rows should end at different steps"
    assert any(c.finish_reason == "length" for c in ours) or len(lengths) >= 3


def test_samples_do_not_depend_on_slots_or_neighbours(engines):
    hf, fast = engines
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=50)
    together = fast.generate(PROMPTS, params, SEEDS)
    wide = FastEngine(hf.model, hf.tokenizer, batch_size=16).generate(PROMPTS[::-1], params, SEEDS[::-1])[::-1]
    alone = [fast.generate([p], params, [s])[0] for p, s in zip(PROMPTS[:2], SEEDS[:2])]
    assert together == wide and together[:2] == alone
    assert fast.generate(PROMPTS[:1], params, [99])[0] != together[0]


def test_a_prompt_seen_in_the_call_before_reuses_its_prefill_with_the_same_samples(engines, monkeypatch):
    """With reuse_prefills (simulate's retries), a prompt prefilled by the previous call gets its keys/values copied in
    rather than recomputed, and samples what a fresh prefill would give it (a different seed: a redraw). Only the call
    just before counts, and the engine keeps nothing for a caller that did not ask (PPO changes its weights)."""
    from rlcd.engines import fast as fast_module

    hf, _ = engines
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=50, banned=("Human",))
    engine = FastEngine(hf.model, hf.tokenizer, batch_size=3)
    engine.reuse_prefills = True
    prefilled = []
    original = FastEngine._prefill
    monkeypatch.setattr(FastEngine, "_prefill", lambda self, chunk, rows, width: prefilled.extend(chunk) or original(self, chunk, rows, width))
    engine.generate(PROMPTS[:5], params, SEEDS[:5])
    assert len(prefilled) == 5
    prefilled.clear()
    redraw = engine.generate(PROMPTS[2:6], params, [40, 41, 42, 43])  # three seen in the call before, one new
    assert prefilled == [engine.tokenizer(PROMPTS[5]).input_ids]
    fresh = FastEngine(hf.model, hf.tokenizer, batch_size=3).generate(PROMPTS[2:6], params, [40, 41, 42, 43])
    assert redraw == fresh
    prefilled.clear()
    engine.generate(PROMPTS[:2], params, SEEDS[:2])  # not in the call just before
    assert len(prefilled) == 2
    monkeypatch.setattr(fast_module, "SAVED_BYTES", 0)  # nothing fits: everything is prefilled again
    engine.generate(PROMPTS[:2], params, SEEDS[:2])
    prefilled.clear()
    engine.generate(PROMPTS[:2], params, SEEDS[:2])
    assert len(prefilled) == 2
    plain = FastEngine(hf.model, hf.tokenizer, batch_size=3)  # not asked to: keeps nothing
    plain.generate(PROMPTS[:2], params, SEEDS[:2])
    assert plain._saved == {}


def test_stop_strings_and_banned_tokens(engines):
    hf, fast = engines
    stop_ids = hf.tokenizer("\nHuman", add_special_tokens=False).input_ids

    def push_stop_tokens(module, inputs, logits):
        logits[..., stop_ids] += 12.0
        return logits

    hook = hf.model.lm_head.register_forward_hook(push_stop_tokens)
    try:
        params = SamplingParams(max_new_tokens=40, temperature=1.0, top_k=0, stop=("\nHuman",), banned=("`", "Human:"))
        ours = fast.generate(PROMPTS, params, SEEDS)
        assert ours == hf.generate(PROMPTS, params, SEEDS)
    finally:
        hook.remove()
    assert sum(c.finish_reason == "stop" for c in ours) >= 4
    for c in ours:
        assert "`" not in c.text and "Human:" not in c.text
        if c.finish_reason == "stop":
            assert c.text.endswith("\nHuman") and c.text.count("\nHuman") == 1


def test_edge_cases(engines):
    _, fast = engines
    assert fast.generate([], SamplingParams(), []) == []
    one = fast.generate(PROMPTS[:4], SamplingParams(max_new_tokens=1, temperature=0, stop_at_eos=False), SEEDS[:4])
    assert all(c.num_tokens == 1 and c.finish_reason == "length" for c in one)


def test_next_token_logprobs_equal_hf_engine(engines):
    hf, fast = engines
    prompts = [p + " (A) yes (B) no. The answer is: (" for p in PROMPTS]
    ours, ids = fast.next_token_logprobs(prompts, ["A", "B"])
    theirs, hf_ids = hf.next_token_logprobs(prompts, ["A", "B"])
    assert ids == hf_ids
    # batches of 3 and of 8 pad differently: equal up to float noise
    assert torch.allclose(torch.tensor(ours), torch.tensor(theirs), atol=1e-5)


def test_auto_dtype_is_bf16_for_generation_only_where_the_cpu_computes_it(monkeypatch):
    import rlcd.models as models

    for native in (True, False):
        monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: native)
        assert models.resolve_dtype("auto", "cpu", generation=True) == (torch.bfloat16 if native else torch.float32)
        assert models.resolve_dtype("auto", "cpu") == torch.float32  # training and scoring stay fp32
        assert models.resolve_dtype("float32", "cpu", generation=True) == torch.float32
    assert models.resolve_dtype("auto", "cuda:0") == torch.bfloat16


def test_bf16_decoding_follows_the_fp32_model(tiny_model_dir):
    """What `--dtype auto` gives generation on CPUs with native bf16: the same greedy text, up to rounding."""
    model, tokenizer = load_causal_lm(tiny_model_dir, device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_at_eos=False)
    ours = FastEngine(model, tokenizer, batch_size=3).generate(PROMPTS, params, SEEDS)
    theirs = HFEngine(model, tokenizer, batch_size=8).generate(PROMPTS, params, SEEDS)
    assert sum(a == b for a, b in zip(ours, theirs)) >= len(PROMPTS) - 1  # the two attention kernels round differently
    reference, _ = load_causal_lm(tiny_model_dir, device="cpu", dtype="float32")
    fp32 = HFEngine(reference, tokenizer, batch_size=8).generate(PROMPTS, params, SEEDS)
    # the first tokens agree; a near-tie may flip a later one under bf16 rounding
    assert sum(a.token_ids[:4] == b.token_ids[:4] for a, b in zip(ours, fp32)) >= len(PROMPTS) - 1


class IdTokenizer:
    """Texts are space-separated token ids: a random model needs no real tokenizer."""

    padding_side, bos_token_id, eos_token_id, pad_token_id = "left", 1, 2, 2

    def __call__(self, texts, return_tensors=None, padding=False, add_special_tokens=True):
        ids = [[int(t) for t in text.split()] for text in texts]
        if return_tensors != "pt":
            return SimpleNamespace(input_ids=ids)
        width = max(map(len, ids))
        return SimpleNamespace(input_ids=torch.tensor([[2] * (width - len(x)) + x for x in ids]),
                               attention_mask=torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids]))

    def decode(self, ids):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the compiled, graph-captured step and the Triton kernel need a GPU"))])
def test_matches_hf_engine_on_each_device(device):
    """On a GPU this covers what the CPU tests cannot: torch.compile, the CUDA graph and the Triton attention."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [" ".join(map(str, torch.randint(3, 512, (n,), generator=gen).tolist())) for n in (3, 40, 17, 5, 29, 9, 33, 12, 21)]
    hf, fast = HFEngine(model, IdTokenizer(), batch_size=16), FastEngine(model, IdTokenizer(), batch_size=4)

    def push_eos(module, inputs, logits):
        logits[..., 2] += torch.where(logits.argmax(-1) % 7 == 0, 1e4, 0.0)
        return logits

    hook = model.lm_head.register_forward_hook(push_eos)
    try:
        for params in (SamplingParams(max_new_tokens=24, temperature=0), SamplingParams(max_new_tokens=24, temperature=1.0, top_k=20)):
            seeds = list(range(len(prompts)))
            assert fast.generate(prompts, params, seeds) == hf.generate(prompts, params, seeds)
            # again: the captured graph is replayed, not rebuilt
            assert fast.generate(prompts[::-1], params, seeds[::-1]) == hf.generate(prompts[::-1], params, seeds[::-1])
    finally:
        hook.remove()


KERNEL_CHECK = textwrap.dedent("""
    import torch
    from rlcd.engines import fast
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    cases = [(3, 4, 2, 8, 70, torch.float32, 1e-4), (2, 3, 3, 80, 130, torch.float32, 1e-4)]
    if device == "cuda":  # Triton's CPU interpreter does not compute bf16 products
        cases.append((3, 8, 2, 64, 100, torch.bfloat16, 2e-2))  # p is rounded to bf16 for the tensor-core product
    for batch, heads, kv_heads, dim, length, dtype, tol in cases:
        q = torch.randn(batch, heads, dim, device=device, dtype=dtype)
        k, v = torch.randn(2, batch, kv_heads, length, dim, device=device, dtype=dtype)
        start = torch.tensor([0, 5, 60][:batch], device=device)
        end = torch.tensor([70, 66, 61][:batch], device=device)
        out = torch.ops.rlcd.slot_attention(q, k, v, start, end, dim ** -0.5)
        group = heads // kv_heads
        cols = torch.arange(length, device=device)
        mask = ((cols >= start[:, None]) & (cols < end[:, None]))[:, None, None]
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, None].float(), k.repeat_interleave(group, 1).float(), v.repeat_interleave(group, 1).float(), attn_mask=mask)[:, :, 0]
        assert out.dtype == dtype and (out.float() - ref).abs().max() < tol, (dtype, (out.float() - ref).abs().max())
""")


def test_triton_decode_attention_matches_sdpa():
    """The CUDA attention kernel (on the GPU, or in Triton's interpreter on CPU) against masked SDPA."""
    pytest.importorskip("triton")
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"  # read when the kernel is defined, so in a fresh process
    result = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("lengths, chunks", [
    ([40, 10, 10], [(3, 40)]),  # little padding: one forward, though the short rows are a quarter as long
    ([1500, 200, 1400], [(2, 1500), (1, 200)]),  # the short row would add 1,300 padding tokens: its own forward
])
def test_prefill_chunks_take_padding_up_to_the_slack(lengths, chunks, monkeypatch):
    """FastEngine prefills prompts together while padding stays under a quarter of the chunk or PREFILL_SLACK tokens."""
    monkeypatch.setattr("rlcd.engines.fast.PREFILL_TOKENS_CPU", PREFILL_TOKENS)  # the rule, not the CPU's smaller bound
    assert _prefill_shapes(lengths) == chunks


def test_cpu_prefill_chunks_stay_under_their_smaller_bound():
    """On a CPU a chunk holds at most PREFILL_TOKENS_CPU (1,024) tokens: larger activations page-fault on every op."""
    assert _prefill_shapes([400, 400, 400, 1500]) == [(1, 1500), (2, 400), (1, 400)]


def _prefill_shapes(lengths):
    """The (rows, width) of each prefill forward when FastEngine on the CPU admits prompts of these lengths."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config).eval()
    engine = FastEngine(model, IdTokenizer(), batch_size=4)
    shapes = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                           with_kwargs=True)
    try:
        prompts = [" ".join(["7"] * n) for n in lengths]
        engine.generate(prompts, SamplingParams(max_new_tokens=1, stop_at_eos=False), seeds=list(range(len(prompts))))
    finally:
        hook.remove()
    return [s for s in shapes if s[1] > 1]


def test_compiled_prefill_layers_share_one_compilation():
    """On CUDA prefill runs the decoder layers compiled with dynamic shapes; the attention call (which knows its layer)
    stays outside the compiled code, so the compilations do not grow with the number of layers, and the one-prompt
    variant is compiled with the first chunk (not in the middle of a run). Dynamo's eager backend
    checks this on CPU (inductor's code is what the GPU adds)."""
    from torch._dynamo.utils import counters

    gen = torch.Generator().manual_seed(0)
    prompts = [" ".join(map(str, torch.randint(3, 512, (n,), generator=gen).tolist())) for n in (3, 40, 17, 5, 29, 9, 33, 12, 21)]
    params = SamplingParams(max_new_tokens=8, temperature=0)
    graphs = []
    for layers in (2, 6):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=2)
        model = LlamaForCausalLM(config).eval()
        fast = FastEngine(model, IdTokenizer(), batch_size=4)
        assert len(fast._layers) == layers and not fast._compiled_layers  # CPU: eager prefill
        fast._compiled_layers = [torch.compile(layer._call_impl, dynamic=True, backend="eager") for layer in fast._layers]
        torch._dynamo.reset()
        counters.clear()
        try:
            fast.generate(["5 6 7 8 9"] * 4, params, [0, 1, 2, 3])  # one chunk of four prompts
            first = counters["stats"]["unique_graphs"]
            fast.generate(prompts[:1], params, [0])  # a chunk of one prompt: compiled along with that first chunk
            assert counters["stats"]["unique_graphs"] == first
            assert fast.generate(prompts, params, list(range(9))) == HFEngine(model, IdTokenizer(), batch_size=16).generate(prompts, params, list(range(9)))
            graphs.append(counters["stats"]["unique_graphs"])
        finally:
            torch._dynamo.reset()
        assert all(layer._compiled_call_impl is None for layer in fast._layers)  # swapped in only while a prefill runs
    assert graphs[0] == graphs[1] > 0


def test_prefill_falls_back_to_eager_when_compiling_fails(engines):
    """A compiler error in the prefill layers warns once and prefills eagerly; the completions do not change."""
    hf, fast = engines

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    params = SamplingParams(max_new_tokens=6, temperature=0)
    torch._dynamo.reset()
    fast._compiled_layers = [torch.compile(layer._call_impl, dynamic=True, backend=broken_backend) for layer in fast._layers]
    try:
        with pytest.warns(UserWarning, match="compiling the prefill failed"):
            assert fast.generate(PROMPTS, params, SEEDS) == hf.generate(PROMPTS, params, SEEDS)
        assert fast._compiled_layers == []
    finally:
        fast._compiled_layers = []
        torch._dynamo.reset()


# --------------------------------------------------------------------------------------------------
# One end-of-completion rule (engines/ending.py) for both engines
# --------------------------------------------------------------------------------------------------


def replay(ending, completion):
    """What `Ending` makes of a completion's sampled tokens (its EOS token included), token by token."""
    tokens, result = [], None
    for token in [*completion.token_ids, *([completion.eos_token_id] if completion.finish_reason == "eos" else [])]:
        assert result is None, "a completion goes on after it ended"
        result = ending.add(tokens, token)
    return result if result is not None else ending.completion(tokens, "length")


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=30, temperature=1.0, top_k=0, stop=("\nHuman", "!"), banned=("`",)),
    SamplingParams(max_new_tokens=30, temperature=1.0, top_k=0, stop=("\nHuman",), stop_at_eos=False),
    SamplingParams(max_new_tokens=6, temperature=0),
], ids=["eos-and-stop", "stop-not-eos", "length"])
def test_both_engines_end_completions_by_the_one_rule(engines, params):
    """EOS (whichever of the model's EOS ids was sampled), stop strings and the token limit end a completion, and
    set its text, token ids and eos_token_id, the same way in HFEngine and FastEngine: each completion is what
    `Ending` makes of its tokens."""
    hf, fast = engines
    eos, second_eos = hf.tokenizer.eos_token_id, hf.tokenizer.convert_tokens_to_ids("<|im_start|>")
    stop_ids = hf.tokenizer("\nHuman", add_special_tokens=False).input_ids

    def push(module, inputs, logits):  # rows end at different steps, by their own logits
        top = logits.argmax(-1)
        logits[..., eos] += torch.where(top % 7 == 0, 1e4, 0.0)
        logits[..., second_eos] += torch.where(top % 7 == 1, 1e4, 0.0)
        logits[..., stop_ids] += 12.0
        return logits

    config, saved = hf.model.generation_config, hf.model.generation_config.eos_token_id
    config.eos_token_id = [eos, second_eos]  # a model with two end-of-sequence tokens, as Qwen's
    hook = hf.model.lm_head.register_forward_hook(push)
    try:
        ours = fast.generate(PROMPTS, params, SEEDS)
        theirs = hf.generate(PROMPTS, params, SEEDS)
        ending = hf.ending(params)
        assert ours == theirs
        assert [replay(ending, c) for c in ours] == ours
        assert [replay(fast.ending(params), c) for c in ours] == ours
    finally:
        hook.remove()
        config.eos_token_id = saved
    reasons = [c.finish_reason for c in ours]
    if params.stop_at_eos and params.stop:
        assert "stop" in reasons and {c.eos_token_id for c in ours if c.finish_reason == "eos"} == {eos, second_eos}
    elif params.stop:
        assert "eos" not in reasons and "stop" in reasons and any("<|im_start|>" in c.text for c in ours)
    else:
        assert reasons.count("length") + reasons.count("eos") == len(ours) and "length" in reasons
    for c in ours:
        assert c.num_tokens == len(c.token_ids) and (c.eos_token_id is not None) == (c.finish_reason == "eos")
        if c.finish_reason == "stop":
            assert any(c.text.endswith(s) for s in params.stop)


def test_the_rule_on_scripted_tokens():
    """The rule alone, on token ids whose text is the ids themselves."""
    from rlcd.engines.ending import Ending, stop_enders

    tok = IdTokenizer()
    texts = [str(i) for i in range(100)]
    params = SamplingParams(max_new_tokens=4, stop=("5 6",))
    ending = Ending(tok, params, eos={2}, enders=stop_enders(texts, params.stop))
    tokens = []
    assert [ending.add(tokens, t) for t in (7, 5)] == [None, None]
    assert ending.add(tokens, 6) == Completion("7 5 6", "stop", 3, (7, 5, 6))  # the stop string spans two tokens
    tokens = [9]
    assert ending.add(tokens, 2) == Completion("9", "eos", 1, (9,), 2)  # EOS: not in the text, which one reported
    tokens = []
    assert [ending.add(tokens, t) for t in (7, 8, 9)] == [None] * 3
    assert ending.add(tokens, 10) == Completion("7 8 9 10", "length", 4, (7, 8, 9, 10))
    no_eos = Ending(tok, SamplingParams(max_new_tokens=4, stop_at_eos=False), eos={2}, enders=set())
    tokens = []
    assert no_eos.add(tokens, 2) is None and tokens == [2]  # without stop_at_eos an EOS token is text like any other


def test_stop_strings_are_looked_for_after_every_token_that_may_complete_one():
    from rlcd.engines.ending import stop_enders

    texts = ["Hello", "\n", "Human", " Hum", "an", ":", " .", "\ufffd", "", "x"]
    assert stop_enders(texts, ("\nHuman",)) == {2, 4, 7, 8}  # a suffix of the stop first; part of a character; no text
    assert stop_enders(texts, ("end.",)) == {6, 7, 8}  # " ." decodes as "." where the tokenizer cleans up spaces


# --------------------------------------------------------------------------------------------------
# The transformers internals the fast engine relies on (engines/hf_internals.py)
# --------------------------------------------------------------------------------------------------


def test_the_internals_the_fast_engine_needs_are_all_found(engines):
    from rlcd.engines import hf_internals

    hf, fast = engines
    assert hf_internals.MISSING == [] and hf_internals.missing(hf.model) == []
    assert len(fast._layers) == hf.model.config.num_hidden_layers
    assert hf.cache_key == fast.cache_key == hf_internals.cache_argument(hf.model) in ("cache", "past_key_values")


def test_a_model_without_the_expected_layers_is_refused_in_one_line(monkeypatch):
    from rlcd.engines import hf_internals

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    monkeypatch.setattr(hf_internals, "GradientCheckpointingLayer", type("Elsewhere", (torch.nn.Module,), {}))
    with pytest.raises(hf_internals.IncompatibleTransformers) as e:
        FastEngine(model, IdTokenizer(), batch_size=2)
    message = str(e.value)
    assert "\n" not in message and "GradientCheckpointingLayer (0 found, config.num_hidden_layers = 2)" in message
    assert "--engine hf" in message


INCOMPATIBLE = textwrap.dedent("""
    import torch, transformers
    from transformers import LlamaConfig, LlamaForCausalLM
    import transformers.integrations.sdpa_attention as sdpa, transformers.modeling_layers as layers
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, eos_token_id=2)).eval()
    del sdpa.sdpa_attention_forward, layers.GradientCheckpointingLayer  # a transformers that moved both
    from rlcd.engines import SamplingParams, hf_internals, make_engine
    from rlcd.engines.fast import FastEngine
    from rlcd.engines.hf import HFEngine

    class Tok:
        eos_token_id, pad_token_id = 2, 2
        def decode(self, ids): return " ".join(map(str, ids))
    assert hf_internals.MISSING == ["transformers.integrations.sdpa_attention.sdpa_attention_forward",
                                    "transformers.modeling_layers.GradientCheckpointingLayer"], hf_internals.MISSING
    try:
        FastEngine(model, Tok())
    except hf_internals.IncompatibleTransformers as e:
        print(e)
    assert isinstance(make_engine(model, Tok()), HFEngine)  # auto on a CPU: the plain engine, which needs none of it
""")


def test_a_transformers_without_the_internals_fails_at_once_naming_them():
    """Import never fails; building a FastEngine does, in one line naming every missing piece."""
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-c", INCOMPATIBLE], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    message = result.stdout.strip()
    assert message.startswith("the fast engine cannot run on transformers ") and "\n" not in message
    assert "transformers.integrations.sdpa_attention.sdpa_attention_forward" in message
    assert "transformers.modeling_layers.GradientCheckpointingLayer" in message and message.endswith("use --engine hf")
