"""Refill (continuous) batching for greedy LLaVA-family captioning, on the model's own forward (no `generate()`).

Why: `generate()` keeps a finished row in the batch, fed padding, until the batch's longest row ends, so with caption
lengths of 100-300 tokens much of every decode step is spent on rows that are already done. Here a row leaves the
batch as soon as it emits end-of-sequence (or reaches `max_new_tokens`), and the next queued image takes its slot:
it is prefilled on its own (vision tower + projector + prompt, through the model's forward with `pixel_values`) and
its KV cache is spliced into the batch's.

Cache layout: a `transformers.DynamicCache` whose rows are right-aligned, i.e. left-padded to one common length with
zeros, and a 2-D attention mask with 0 on the padding. Left padding is what `generate()` itself uses for batches of
unequal prompts, so the model's mask code already handles it: a 2-D mask plus a cache becomes a causal mask with the
padding columns masked out (a boolean mask for SDPA, a -inf bias for eager attention), and positions come from the mask
(`position_ids = mask.cumsum(-1) - 1`, padding at 0, as in generate()), so a padded row sees the same rotary
positions as an unpadded one. Every decode step appends one column for all rows; a joining row (prompt only) is
left-padded to the current length, or the batch is padded if the newcomer is longer; when rows leave, columns that no
remaining row attends to are trimmed from the left, so the cache is never longer than the longest live row.

Exactness: tokens are picked as generate()'s greedy search picks them (float32 argmax of the last position's
logits, `logits_to_keep=1`, the same position ids), and the tests check that the captions are byte-identical. The
logits are not always bit-for-bit those of generate(): a padded row's attention sums its zero-weighted padding keys
in another order, and the matrix products run with other row counts. On CPU that noise (~1e-7 in fp32) is as large
as generate()'s own when one image is captioned alone instead of in a batch of 9, so bit-exact logits would need
batch-invariant kernels, not another cache layout. Greedy only: sampling, beams and logits processors are refused
(`captioning.config`, `check_generation_config`) rather than reimplemented.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

# generation_config fields whose non-default values make generate() add a logits processor in greedy search.
PROCESSOR_FIELDS = ("sequence_bias", "repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size",
                    "bad_words_ids", "min_length", "min_new_tokens", "forced_bos_token_id", "forced_eos_token_id",
                    "suppress_tokens", "begin_suppress_tokens", "exponential_decay_length_penalty", "guidance_scale",
                    "renormalize_logits", "remove_invalid_values")


def check_generation_config(generation_config: Any) -> None:
    """ValueError when the model's own generation_config would make generate() change the logits (a checkpoint may
    ship e.g. `suppress_tokens`): the refill engine would then give other captions than the reference."""
    from transformers import GenerationConfig

    default = GenerationConfig()
    changed = [f for f in PROCESSOR_FIELDS if getattr(generation_config, f, None) != getattr(default, f, None)]
    if changed:
        raise ValueError(f"engine=refill is greedy-only and applies no logits processors, but the model's "
                         f"generation_config sets {', '.join(changed)}; use engine=generate")


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zeros in front of `t` along `dim` (-1: a mask, -2: keys/values) up to `length`. Zeros, not garbage: a masked
    key gets weight exactly 0, and 0 * a finite value adds nothing, where 0 * NaN would poison the row."""
    return F.pad(t, [0, 0] * (-dim - 1) + [length - t.shape[dim], 0])


@dataclass
class EngineStats:
    """Counts, not timings, so tests can check that refills happen: forward calls of each kind, rows prefilled, and
    the most rows decoded together. Accumulates over `run` calls."""

    prefills: int = 0
    refills: int = 0  # prefills that joined rows still decoding: continuous batching at work
    rows_prefilled: int = 0
    decode_steps: int = 0
    max_active: int = 0


@dataclass
class _Row:
    index: int  # row of the `run` inputs
    limit: int  # end-of-sequence is forced after this many new tokens (stop_lengths; max_new_tokens: never)
    tokens: list[int] = field(default_factory=list)


class RefillEngine:
    """Greedy decoding with at most `slots` rows in flight; see the module docstring."""

    def __init__(self, model: Any, slots: int, max_new_tokens: int, eos_ids: set[int], forced_eos: int) -> None:
        self.model, self.slots, self.max_new_tokens = model, slots, max_new_tokens
        self.eos_ids, self.forced_eos = eos_ids, forced_eos
        self.stats = EngineStats()
        self.cache: Any = None  # DynamicCache of the active rows, in the order of `active`
        self.mask: torch.Tensor | None = None  # (rows, cache length) long, 0 on left padding

    @torch.inference_mode()
    def run(self, inputs: Mapping[str, torch.Tensor],
            stop_lengths: list[int] | None = None) -> Iterator[tuple[int, list[int]]]:
        """Caption every row of `inputs` (the processor's batch, on the model's device); yields (row, new tokens
        including the end-of-sequence token if one was emitted) as rows finish, in finishing order.
        `stop_lengths[i]`: force end-of-sequence after that many new tokens (benchmarks; random weights never stop)."""
        n = inputs["input_ids"].shape[0]
        queue = deque(range(n))
        active: list[_Row] = []
        self.cache = self.mask = None
        while queue or active:
            if queue and len(active) < self.slots:  # refill free slots first, so the decode step below includes them
                take = [queue.popleft() for _ in range(min(self.slots - len(active), len(queue)))]
                first = len(active)
                active += [_Row(i, self.max_new_tokens if stop_lengths is None else stop_lengths[i]) for i in take]
                yield from self._advance(active, self._prefill(inputs, take), first)
            if active:
                yield from self._advance(active, self._decode(active), 0)
        self.cache = self.mask = None  # free the KV memory between calls

    def _forward(self, **kwargs: Any) -> torch.Tensor:
        """The model's forward as generate() calls it: logits of the last position only, as float32."""
        out = self.model(**kwargs, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].to(dtype=torch.float32)

    def _prefill(self, inputs: Mapping[str, torch.Tensor], rows: list[int]) -> torch.Tensor:
        """Run the vision tower, projector and prompt of `rows` in one forward; splice their cache into the batch."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        n, index = inputs["input_ids"].shape[0], torch.tensor(rows, device=inputs["input_ids"].device)
        group = {}
        for k, v in inputs.items():
            if not torch.is_tensor(v) or v.shape[0] != n:
                raise ValueError(f"engine=refill needs one entry per image in every input; {k!r} is not")
            group[k] = v.index_select(0, index)
        mask = group["attention_mask"]
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(**group, position_ids=positions, cache=cache)
        if any(type(layer) is not DynamicLayer for layer in cache.layers):  # e.g. sliding-window layers
            raise ValueError("engine=refill supports full-attention models only; use engine=generate")
        self.stats.refills += self.cache is not None
        self._splice(cache, mask.long())
        self.stats.prefills += 1
        self.stats.rows_prefilled += len(rows)
        return logits

    def _decode(self, active: list[_Row]) -> torch.Tensor:
        """One batched step: feed every active row its last token."""
        assert self.mask is not None
        ids = torch.tensor([[r.tokens[-1]] for r in active], device=self.mask.device)
        self.mask = F.pad(self.mask, (0, 1), value=1)
        positions = self.mask.sum(-1, keepdim=True) - 1  # == (mask.cumsum(-1) - 1)[:, -1:]
        logits = self._forward(input_ids=ids, attention_mask=self.mask, position_ids=positions, cache=self.cache)
        self.stats.decode_steps += 1
        self.stats.max_active = max(self.stats.max_active, len(active))
        return logits

    def _advance(self, active: list[_Row], logits: torch.Tensor, first: int) -> Iterator[tuple[int, list[int]]]:
        """Append the greedy token of `active[first:]` (one logits row each); finished rows leave the batch."""
        for row, token in zip(active[first:], logits.argmax(dim=-1).tolist(), strict=True):
            row.tokens.append(self.forced_eos if len(row.tokens) >= row.limit else token)
        done = [len(r.tokens) >= self.max_new_tokens or r.tokens[-1] in self.eos_ids for r in active]
        if not any(done):
            return
        finished = [r for r, d in zip(active, done, strict=True) if d]
        active[:] = [r for r, d in zip(active, done, strict=True) if not d]
        self._keep([i for i, d in enumerate(done) if not d])
        for row in finished:
            yield row.index, row.tokens

    # -- cache surgery: every layer's keys and values are (rows, heads, length, head_dim) ----------------------------

    def _splice(self, cache: Any, mask: torch.Tensor) -> None:
        """Append the rows of `cache` (mask `mask`) to the batch, left-padding whichever side is shorter."""
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        assert self.mask is not None
        length = max(self.mask.shape[1], mask.shape[1])
        self.mask = torch.cat([_left_pad(self.mask, length, -1), _left_pad(mask, length, -1)])
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_left_pad(old.keys, length, -2), _left_pad(new.keys, length, -2)])
            old.values = torch.cat([_left_pad(old.values, length, -2), _left_pad(new.values, length, -2)])

    def _keep(self, rows: list[int]) -> None:
        """Keep only `rows` of the batch, then trim the left columns that no remaining row attends to."""
        if not rows:
            self.cache = self.mask = None
            return
        assert self.mask is not None
        index = torch.tensor(rows, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        start = int(self.mask.any(dim=0).int().argmax())  # first column some row attends to
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
