"""Faster in-process engine: continuous batching over fixed KV-cache slots.

`HFEngine` runs batches the way `generate` does, so a batch's decode steps get
cheaper as rows finish but never fuller. Here the batch is `batch_size` slots of
a preallocated KV cache; when a row finishes (EOS, stop string or length) its slot
is refilled with the next waiting prompt, so the decode batch stays full until the
queue runs dry.

- Slots are independent: slot b holds its prompt's keys/values in columns
  [start_b, end_b) of its own row of the cache (left padding from the prefill sits
  before start_b), and each decode step writes column end_b. Nothing is shared
  between rows, so no compaction is ever needed.
- Prefill runs the waiting prompts (longest first, a few at a time, left padded)
  through the model with our own attention function, which stores each layer's
  keys/values straight into the free slots. On CUDA the decoder layers run
  compiled with dynamic shapes: one compilation serves every layer and every chunk
  shape (the attention call, which knows the layer, stays outside it; a chunk of one
  prompt gets its own, compiled with the first chunk), and it
  fuses the norms, rotary embedding and activations that an eager forward runs as
  separate kernels (7B on an H100: a 256-prompt prefill 0.86 s -> 0.67 s, ~8 s to
  compile; compiling the whole model the same way took ~110 s).
- The decode step calls the model with our own cache object and attention
  function: on CUDA a small Triton kernel reads only each row's live columns
  (a padded static cache would read every slot's full length); elsewhere SDPA
  with a per-row mask over the columns in use.
- On CUDA the whole step (model, banned tokens, sampling, advancing the slot
  state) is compiled with torch.compile and captured once as a CUDA graph; each
  step is then one graph replay plus one small transfer of the sampled ids.
- Without CUDA graphs (CPU) a step costs what its rows cost, so once nothing
  waits the idle slots are dropped (the live rows' cache is compacted, at most
  log2(batch) times).
- Sampling is `sampling.sample` with each row's own seed and step, so a
  completion is still a pure function of (prompt, seed).

For decoder-only models with full attention and the usual transformers layout
(Llama, Qwen2, SmolLM, ...); prefill and decode route the model's attention to
`_prefill_attention` and `_slot_attention` through transformers' AttentionInterface.
What this takes from transformers beyond its public API is in `hf_internals.py`,
checked when the engine is built. Rows end by the rule of `ending.py`, as in HFEngine.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Sequence

import torch

from rlcd.engines import Completion, SamplingParams, hf_internals, no_cudnn_attention
from rlcd.engines.hf import HFEngine
from rlcd.engines.hf_internals import sdpa_attention_forward
from rlcd.engines.sampling import sample

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the SDPA path is used
    triton = None

PREFILL_TOKENS = 8192
"""Most prompt tokens (padding included) in one prefill call: bounds the prefill's own KV cache and activations."""

PREFILL_TOKENS_CPU = 1024
"""The same bound on a CPU. Larger chunks' activations (over 32 MB: glibc's largest mmap threshold) are mapped and
unmapped by every op, and each of their pages faults again when touched: a 64-prompt prefill of the default model took
1.5M page faults with 8192 (fp32 568 -> 794 prompt tok/s with 1024, bf16 1510 -> 2047, 2 cores)."""

PREFILL_SLACK = 1024
"""Padding tokens a prefill chunk may always carry: below this, one forward more costs more (7B on an H100: about
15 ms of weight reads and eager launches per forward vs about 20 us of compute per padded token)."""

SAVED_BYTES = 1 << 30
"""On a CPU, the most keys/values kept from one `generate` call for the next: a simulation redraws a rejected sample
from the same prompt in its next round, and its prefill (about a fifth of the demo's simulation) is then a copy. The
demo's first round keeps about 400 MB."""

_ATTN, _PREFILL_ATTN = "rlcd_slots", "rlcd_prefill"
_prefill_target = None
"""(slots, rows, width) while a prefill forward runs: where `_prefill_attention` stores the keys/values.

A module global on purpose, not an engine attribute or a forward argument. `_prefill_attention` is the one
function registered under its name and runs with torch.compile disabled, so reading a global there is
invisible to the compiled decoder layers on CUDA. Passed through forward's keyword arguments, the slot cache
(every layer's keys and values) and the row tensor would become inputs of those compiled layers, and a
per-engine attention name would be a new guard: either changes what torch.compile traces and when it
recompiles, which the CPU tests cannot show. One prefill runs at a time (`_prefill` sets and clears it)."""


class FastEngine(HFEngine):
    name = "fast"
    reuse_prefills = False
    """On a CPU, keep what a `generate` call prefilled for the next call (within SAVED_BYTES) and copy it in for a
    prompt seen again. Only for a caller whose model does not change between calls: `simulate` sets it."""

    def __init__(self, model, tokenizer, batch_size: int = 32):
        super().__init__(model, tokenizer, batch_size)
        types = getattr(model.config, "layer_types", None) or []
        if any(t != "full_attention" for t in types):
            raise ValueError("FastEngine supports decoder models whose layers all use full attention")
        hf_internals.check(model)  # one line naming what this transformers lacks, before anything is built
        self.on_cuda = self.device.type == "cuda"
        self._slots: _Slots | None = None
        self._graph = None
        self._graph_key = None
        # compiling fuses the many small per-layer kernels; the CUDA graph removes their launch cost
        self._forward = torch.compile(self._decode_forward, dynamic=False) if self.on_cuda else self._decode_forward
        # prefill: decoder layers compiled with dynamic shapes, swapped in only while a prefill runs
        self._layers = hf_internals.decoder_layers(model)
        self._compiled_layers = [torch.compile(layer._call_impl, dynamic=True) for layer in self._layers] if self.on_cuda else []
        self._one_row_compiled = False
        self._saved: dict[tuple[int, ...], tuple] = {}  # CPU: prompt ids -> (keys, values, last logits) of the last call

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], params: SamplingParams, seeds: Sequence[int]) -> list[Completion]:
        if not prompts:
            return []
        ids = self.tokenizer(list(prompts), add_special_tokens=True).input_ids
        if params.max_new_tokens <= 0:
            return [Completion("", "length", 0) for _ in prompts]
        # one column more than any row needs: idle slots park there
        self._reserve(min(self.batch_size, len(prompts)), max(map(len, ids)) + params.max_new_tokens + 1)
        slots = self._slots
        banned = self.banned_token_ids(params.banned) if params.banned else None
        banned = banned if banned is not None and len(banned) else None
        ending = self.ending(params)
        if self.on_cuda:
            self._capture(params, banned)
        slots.park(range(slots.batch))

        # what this call prefills is kept for the next call only (a simulation's retries come in the next round)
        self._saving, self._saving_bytes = {}, 0
        # longest first: prompts prefilled together have similar lengths
        waiting = deque(sorted(range(len(prompts)), key=lambda i: -len(ids[i])))
        occupant: list[int | None] = [None] * slots.batch  # prompt index in each slot
        tokens: list[list[int]] = [[] for _ in prompts]
        results: list[Completion | None] = [None] * len(prompts)
        # on a GPU a prefill costs about a decode step (both read every weight): batch the refills
        refill_at = max(1, slots.batch // 8) if self.on_cuda else 1

        def take(slots_and_tokens) -> None:
            ended = []
            for slot, tok in slots_and_tokens:
                i = occupant[slot]
                if i is None:
                    continue
                done = ending.add(tokens[i], tok)
                if done is not None:
                    results[i], occupant[slot] = done, None
                    ended.append(slot)
            slots.park(ended)

        while True:
            free = [s for s in range(slots.batch) if occupant[s] is None]
            busy = len(free) < slots.batch
            if waiting and free and (len(free) >= refill_at or len(waiting) <= len(free) or not busy):
                admitted = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
                first = self._admit(free, [ids[i] for i in admitted], [seeds[i] for i in admitted], params, banned)
                for slot, i in zip(free, admitted):
                    occupant[slot] = i
                take(zip(free, first))  # the first token can already end a row
                continue
            if not busy:
                break
            if free and not waiting and not self.on_cuda and len(free) >= slots.batch // 2:
                # without CUDA graphs a step costs what its rows cost: drop the idle slots once nothing waits
                keep = [s for s in range(slots.batch) if occupant[s] is not None]
                slots.keep(keep)
                occupant = [occupant[s] for s in keep]
            take(enumerate(self._decode_step(params, banned)))
        self._saved = self._saving
        return results  # type: ignore[return-value]

    def _reserve(self, batch: int, length: int) -> None:
        """Make sure the slot cache has `batch` rows of at least `length` columns."""
        if self.on_cuda:
            batch = self.batch_size  # one shape for the compiled step, whatever the number of prompts
            length = -(-length // 64) * 64  # fewer distinct shapes, fewer recompiles
        if self._slots is not None and self._slots.batch == batch and self._slots.length >= length:
            return
        self._slots = self._graph = self._graph_key = None
        if self.on_cuda:
            torch.cuda.empty_cache()
        self._slots = _Slots(self.model, batch, length)

    @no_cudnn_attention()  # refills rarely repeat a shape
    def _admit(self, slots: list[int], prompts: list[list[int]], seeds: list[int], params, banned) -> list[int]:
        """Prefill prompts (sorted longest first) into free slots; returns each one's first sampled token. On a CPU a
        prompt prefilled by the previous `generate` call (a simulation retry) gets its saved keys/values instead."""
        first: list[int] = [0] * len(prompts)
        saved = [k for k, p in enumerate(prompts) if tuple(p) in self._saved]
        fresh = [k for k in range(len(prompts)) if tuple(prompts[k]) not in self._saved]
        if saved:
            rows = torch.tensor([slots[k] for k in saved], device=self.device)
            for row, k in zip(rows.tolist(), saved):
                keys, values, _ = entry = self._saved[tuple(prompts[k])]
                if self._fits(len(prompts[k])):  # kept for the next call too
                    self._saving[tuple(prompts[k])] = entry
                for layer, (key, value) in enumerate(zip(keys, values)):
                    self._slots.keys[layer][row, :, : len(prompts[k])] = key
                    self._slots.values[layer][row, :, : len(prompts[k])] = value
            self._slots.start[rows] = 0
            self._slots.write_col[rows] = torch.tensor([len(prompts[k]) for k in saved], device=self.device)
            logits = torch.stack([self._saved[tuple(prompts[k])][2] for k in saved])
            for k, tok in zip(saved, self._first_tokens(logits, rows, [seeds[k] for k in saved], params, banned)):
                first[k] = tok
        done = 0
        limit = PREFILL_TOKENS if self.on_cuda else PREFILL_TOKENS_CPU
        if fresh and self._compiled_layers and not self._one_row_compiled:
            # dynamo compiles a chunk of one prompt apart (it specialises size 1): compile it now, with the first
            # chunk, not in the middle of a run (its slot is overwritten by the chunk's own forward)
            self._one_row_compiled = True
            self._prefill([prompts[fresh[0]]], torch.tensor([slots[fresh[0]]], device=self.device), len(prompts[fresh[0]]))
        while done < len(fresh):
            width = len(prompts[fresh[done]])  # the longest of this chunk
            n, real = 1, width
            # a chunk takes the next prompt while its padding stays under a quarter of it, or under PREFILL_SLACK
            # tokens: one more forward costs more than that much padding (a refill of a few prompts is one forward)
            while done + n < len(fresh) and (n + 1) * width <= limit:
                padding = (n + 1) * width - real - len(prompts[fresh[done + n]])
                if 4 * padding > (n + 1) * width and padding > PREFILL_SLACK:
                    break
                real += len(prompts[fresh[done + n]])
                n += 1
            chunk = fresh[done : done + n]
            rows = torch.tensor([slots[k] for k in chunk], device=self.device)
            logits = self._prefill([prompts[k] for k in chunk], rows, width)
            if self.reuse_prefills and not self.on_cuda:
                self._save([prompts[k] for k in chunk], rows, width, logits)
            for k, tok in zip(chunk, self._first_tokens(logits, rows, [seeds[k] for k in chunk], params, banned)):
                first[k] = tok
            done += n
        return first

    def _first_tokens(self, logits, rows, seeds: list[int], params, banned) -> list[int]:
        if banned is not None:
            logits.index_fill_(1, banned, float("-inf"))
        seeds_t = torch.tensor(seeds, dtype=torch.int64, device=self.device)
        chosen = sample(logits, seeds_t, 0, params.temperature, params.top_k, params.top_p)
        self._slots.start_rows(rows, chosen, seeds_t)
        return chosen.tolist()

    def _save(self, chunk: list[list[int]], rows: torch.Tensor, width: int, logits: torch.Tensor) -> None:
        """Keep these prefilled prompts' keys/values and last logits for the next `generate` call, within SAVED_BYTES."""
        for row, prompt, last in zip(rows.tolist(), chunk, logits):
            if not self._fits(len(prompt)):
                return
            at = width - len(prompt)
            self._saving[tuple(prompt)] = ([k[row, :, at:width].clone() for k in self._slots.keys],
                                           [v[row, :, at:width].clone() for v in self._slots.values], last.clone())

    def _fits(self, tokens: int) -> bool:
        """Whether `tokens` more tokens' keys/values fit in SAVED_BYTES this call; if so they are counted."""
        size = tokens * self._slots.token_bytes
        if self._saving_bytes + size > SAVED_BYTES:
            return False
        self._saving_bytes += size
        return True

    def _prefill(self, chunk: list[list[int]], rows: torch.Tensor, width: int) -> torch.Tensor:
        """One forward of left-padded prompts whose keys/values go to slot `rows`; the last position's logits."""
        global _prefill_target
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=self.device)
        pads = torch.tensor([width - len(p) for p in chunk], device=self.device)
        cols = torch.arange(width, device=self.device)
        # causal over each row's real tokens; a padding position sees only itself (attending to nothing gives NaN)
        keys_ok = (cols >= pads[:, None])[:, None, :] | torch.eye(width, dtype=torch.bool, device=self.device)
        mask = (cols[:, None] >= cols[None, :]) & keys_ok
        _prefill_target = (self._slots, rows, width)
        try:
            with self._routed(_PREFILL_ATTN, self._compiled_layers):
                out = self.model(input_ids=input_ids, attention_mask=mask[:, None], position_ids=(cols - pads[:, None]).clamp(min=0),
                                 use_cache=False, logits_to_keep=1)
        except torch._dynamo.exc.TorchDynamoException as e:  # still correct, only slower
            warnings.warn(f"FastEngine: compiling the prefill failed ({type(e).__name__}: {e}); prefilling without it")
            self._compiled_layers = []
            return self._prefill(chunk, rows, width)
        finally:
            _prefill_target = None
        self._slots.start[rows] = pads
        self._slots.write_col[rows] = width
        return out.logits[:, -1, :].float()

    def _decode_step(self, params, banned) -> list[int]:
        if self._graph is not None:
            self._graph.replay()
        else:
            self._step(params, banned)
        return self._slots.next_ids.tolist()  # the one device-to-host transfer per step

    def _step(self, params, banned) -> None:
        """One decode step for every slot, entirely on the device (this is what the CUDA graph holds)."""
        s = self._slots
        with self._routed(_ATTN):
            logits = self._forward(s.input_ids, s.start, s.write_col)
        if banned is not None:
            logits.index_fill_(1, banned, float("-inf"))
        with warnings.catch_warnings():
            # a tensor of per-row steps (rather than one int) keeps the step on the device: sample() copies it
            warnings.simplefilter("ignore", UserWarning)
            chosen = sample(logits, s.seeds, s.steps, params.temperature, params.top_k, params.top_p)
        s.advance(chosen)

    def _decode_forward(self, input_ids, start, write_col):
        # rows whose prompt was left padded still count positions from their first real token
        end = write_col + 1
        kv_len = self._slots.length if self.on_cuda else int(end.max())  # on CPU skip the unused columns
        out = self.model(input_ids=input_ids, position_ids=(write_col - start)[:, None], use_cache=True,
                         rlcd_slots=(start, end, kv_len), **{self.cache_key: self._slots})
        return out.logits[:, -1, :].float()

    def _routed(self, attention: str, compiled_layers: Sequence = ()):
        """Context: the model's attention routed to one of ours and, if given, its decoder layers to their compiled code."""
        return hf_internals.routed(self.model, attention, self._layers, compiled_layers)

    def _capture(self, params, banned) -> None:
        """Capture the decode step as a CUDA graph (once per slot cache and sampling settings)."""
        key = (params.temperature, params.top_k, params.top_p, params.banned)
        if self._graph_key == key:
            return
        self._graph, self._graph_key = None, key
        with torch.cuda.device(self.device):  # streams and graphs belong to the model's GPU
            self._graph = self._capture_step(params, banned)

    def _capture_step(self, params, banned):
        """Warm up (the first call compiles) and capture one step; None if it cannot be captured."""
        s = self._slots
        s.park(range(s.batch))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            try:
                for _ in range(2):  # the first call compiles; warm-up must precede capture
                    self._step(params, banned)
            except Exception as e:  # noqa: BLE001 - still correct, only slower
                warnings.warn(f"FastEngine: torch.compile failed ({type(e).__name__}: {e}); decoding without it")
                self._forward = self._decode_forward
                for _ in range(2):
                    self._step(params, banned)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._step(params, banned)
        except Exception as e:  # noqa: BLE001 - still correct, only slower
            warnings.warn(f"FastEngine: CUDA graph capture failed ({type(e).__name__}: {e}); decoding without it")
            return None
        return graph


class _Slots:
    """The slot KV cache and per-slot decoding state; also the cache object the model writes into while decoding.

    All state lives in fixed device tensors that the decode step reads and advances
    in place, so a captured CUDA graph can replay it.
    """

    def __init__(self, model, batch: int, length: int):
        config = model.config
        param = next(model.parameters())
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape, dev = (batch, heads, length, head_dim), param.device
        self.keys = [torch.zeros(shape, dtype=param.dtype, device=dev) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=param.dtype, device=dev) for _ in range(config.num_hidden_layers)]
        self.batch, self.length = batch, length
        self.token_bytes = 2 * config.num_hidden_layers * heads * head_dim * self.keys[0].element_size()  # one token's keys and values
        self.rows = torch.arange(batch, device=dev)
        self.input_ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.start = torch.zeros(batch, dtype=torch.long, device=dev)  # first live column
        self.write_col = torch.zeros(batch, dtype=torch.long, device=dev)  # this step's column
        self.steps = torch.zeros(batch, dtype=torch.long, device=dev)  # tokens sampled so far
        self.seeds = torch.zeros(batch, dtype=torch.long, device=dev)
        self.next_ids = torch.zeros(batch, dtype=torch.long, device=dev)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Cache interface: store this step's key/value at each row's own column; return the whole cache."""
        self.keys[layer_idx][self.rows, :, self.write_col] = key_states[:, :, 0]
        self.values[layer_idx][self.rows, :, self.write_col] = value_states[:, :, 0]
        return self.keys[layer_idx], self.values[layer_idx]

    def start_rows(self, rows, first_ids, seeds) -> None:
        self.input_ids[rows, 0] = first_ids
        self.seeds[rows] = seeds
        self.steps[rows] = 1

    def keep(self, rows: list[int]) -> None:
        """Shrink to the slots `rows` (in that order)."""
        idx = torch.tensor(rows, device=self.rows.device)
        self.keys = [k[idx] for k in self.keys]
        self.values = [v[idx] for v in self.values]
        for name in ("input_ids", "start", "write_col", "steps", "seeds", "next_ids"):
            setattr(self, name, getattr(self, name)[idx])
        self.batch = len(rows)
        self.rows = torch.arange(self.batch, device=idx.device)

    def park(self, rows) -> None:
        """Idle slots attend to one column at the far end, which no row ever reaches."""
        rows = torch.as_tensor(list(rows), dtype=torch.long).to(self.rows.device)
        if len(rows):
            self.start[rows] = self.length - 1
            self.write_col[rows] = self.length - 1

    def advance(self, chosen) -> None:
        self.next_ids.copy_(chosen)
        self.input_ids.copy_(chosen[:, None])
        # a live row never reaches the last column; parked rows stay there
        self.write_col.add_(1).clamp_(max=self.length - 1)
        self.steps.add_(1)


@torch.compiler.disable  # the compiled decoder layers stop here, so their code holds no layer index: one compilation for all
def _prefill_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Masked SDPA over a prefill chunk that also stores the chunk's keys/values in its slots."""
    slots, rows, width = _prefill_target
    slots.keys[module.layer_idx][rows, :, :width] = key
    slots.values[module.layer_idx][rows, :, :width] = value
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=0.0)


def _slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, rlcd_slots=None, **kwargs):
    """Attention of one new token per row over that row's live columns [start, end) of the slot cache."""
    start, end, kv_len = rlcd_slots
    if query.is_cuda and triton is not None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = torch.ops.rlcd.slot_attention(query[:, :, 0].contiguous(), key, value, start, end, scale)
        return out[:, None], None
    cols = torch.arange(kv_len, device=query.device)
    mask = ((cols >= start[:, None]) & (cols < end[:, None]))[:, None, None, :]
    return sdpa_attention_forward(module, query, key[:, :, :kv_len], value[:, :, :kv_len], mask, scaling=scaling, dropout=0.0)


hf_internals.register_attention(_ATTN, _slot_attention)
hf_internals.register_attention(_PREFILL_ATTN, _prefill_attention)


@torch.library.custom_op("rlcd::slot_attention", mutates_args=())
def slot_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, start: torch.Tensor, end: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """query [B, H, D]; key, value [B, H_kv, L, D]; row b attends to columns [start[b], end[b]). Returns [B, H, D]."""
    batch, heads, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(query)
    # launch settings measured on an H100 (benchmarks/slot_attention.py): near-best for 7B MHA, GQA and the default model
    _slot_attention_kernel[(batch, kv_heads)](
        query, key, value, out, start, end, scale,
        key.stride(0), key.stride(1), key.stride(2), value.stride(0), value.stride(1), value.stride(2),
        HEADS=heads, GROUP=group, DIM=dim, DIM_P=max(16, triton.next_power_of_2(dim)),
        ROWS=max(16, triton.next_power_of_2(group)), BLOCK=32, IEEE=query.dtype == torch.float32, num_warps=2, num_stages=3,
    )
    return out


@slot_attention.register_fake
def _(query, key, value, start, end, scale):
    return torch.empty_like(query)


if triton is not None:

    @triton.jit
    def _slot_attention_kernel(Q, K, V, Out, Start, End, scale, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh,
                               stride_vl, HEADS: tl.constexpr, GROUP: tl.constexpr, DIM: tl.constexpr,
                               DIM_P: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr):
        # one program per (row, key/value head): the GROUP query heads that share it are the rows of two small
        # tensor-core products (padded to ROWS >= 16), so each live key/value is read once; online softmax in fp32
        row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: a large slot cache passes 2**31 elements
        kv_head = tl.program_id(1)
        start = tl.load(Start + row)
        end = tl.load(End + row)
        heads = tl.arange(0, ROWS)
        dims = tl.arange(0, DIM_P)
        in_dim = dims < DIM
        q_mask = (heads < GROUP)[:, None] & in_dim[None, :]
        q_offsets = (row * HEADS + kv_head * GROUP + heads[:, None]) * DIM + dims[None, :]
        q = tl.load(Q + q_offsets, mask=q_mask, other=0.0)
        k_row = K + row * stride_kb + kv_head * stride_kh
        v_row = V + row * stride_vb + kv_head * stride_vh
        best = tl.full([ROWS], float("-inf"), tl.float32)
        total = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, DIM_P], tl.float32)
        for first in range(start, end, BLOCK):
            cols = first + tl.arange(0, BLOCK)
            live = cols < end
            k = tl.load(k_row + cols[None, :] * stride_kl + dims[:, None], mask=live[None, :] & in_dim[:, None], other=0.0)
            v = tl.load(v_row + cols[:, None] * stride_vl + dims[None, :], mask=live[:, None] & in_dim[None, :], other=0.0)
            if IEEE:  # fp32 models (tests, self-checks): no TF32 rounding
                scores = tl.dot(q, k, input_precision="ieee")
            else:
                scores = tl.dot(q, k)
            scores = tl.where(live[None, :], scores * scale, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, axis=1))
            p = tl.exp(scores - new_best[:, None])
            shrink = tl.exp(best - new_best)
            total = total * shrink + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * shrink[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * shrink[:, None] + tl.dot(p.to(v.dtype), v)
            best = new_best
        tl.store(Out + q_offsets, (acc / total[:, None]).to(Out.dtype.element_ty), mask=q_mask)
