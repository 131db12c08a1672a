"""Continuous batching: Q prompts through B decode slots, a finished row's slot refilled from the
queue inside the same jitted loop.

``generate`` decodes a fixed batch until its longest row ends, so with EOS on, the rows that
stopped early ride along as padding, and a caller with more prompts than fit in one batch waits
for each batch's longest row in turn. ``generate_continuous`` keeps B slots busy instead (the
scheduling of Orca, Yu et al. 2022, and vLLM, Kwon et al. 2023, on a dense per-slot KV cache):

    one loop iteration:
      1. every busy slot samples its next token (EOS or the N-th token frees the slot);
      2. one decode step of all B slots (row b at position len_q + t_b, as in ``generate``);
      3. if the queue holds r > 0 prompts and at least min(R, r) slots are free, prefill the next
         min(R, r, free) prompts ([R, P], one program) into free slots: their keys / values go to
         the slots' cache rows [0, P), their last logits become the slots' next logits.
    The loop ends when the queue is empty and every slot is free. The first B prompts are
    prefilled before the loop as one [B, P] batch.

A refilled slot needs no cache clearing: its cache mask is slot <= position, and a row writes
slot p (prefill or decode) before it attends at position p, so what an earlier prompt left at
slots past the new position is never read. Costs: B slots per decode step whatever their
occupancy, plus an [R, P] prefill per refill (R = ``prefill_rows``: small R refills sooner, large R
prefills fewer times; one refill per iteration, so after many rows end together the slots fill
again over several steps). ``decode_steps`` and ``prefills`` in the output say what a call
spent.

Randomness is per prompt and step: prompt q's t-th token is drawn with
``fold_in(fold_in(key, q), t)``, so with the XLA sampler the tokens do not depend on B, R or the
order slots free up (up to the float rounding of a different batch size), and greedy decoding
equals ``generate``'s. The sampling kernel (``sampling_impl`` "pallas", or "auto" where it picks
the kernel) draws a batch from one key per iteration: the same distribution, a stream that
depends on the schedule. Outputs follow ``generate``'s contract (``GenerateOutput``'s fields,
padding after each row's length). The slots are not split over a mesh: every device decodes
every slot (use ``generate`` for data-parallel decoding).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from postrl.models.transformer import KVCache
from postrl.sampling.generate import (_integer, _prepare_decode, kernel_sample_token,
                                      sample_token)


class ContinuousOutput(NamedTuple):
  """Outputs of ``generate_continuous``: ``generate``'s fields for the Q prompts, plus the work."""
  tokens_BxN: jax.Array
  lengths_B: jax.Array
  logps_BxN: jax.Array
  model_logps_BxN: jax.Array
  finished_B: jax.Array
  decode_steps: jax.Array  # decode steps of all B slots (loop iterations)
  prefills: jax.Array  # prefill programs run, the first [B, P] one included


class _Slots(NamedTuple):
  """The decode loop's state: B slots, each busy with prompt ``slot_q`` (Q = free) at its token
  ``slot_t``, and the Q prompts' outputs."""
  it: jax.Array  # loop iterations = decode steps
  cache: KVCache  # [B, P + N] per layer
  logits: jax.Array  # [B, V] each slot's next-token logits
  slot_q: jax.Array  # [B]
  slot_t: jax.Array  # [B]
  next_q: jax.Array  # the queue's head
  out: tuple  # tokens, sampling log-probs, model log-probs, each [Q, N]
  gen_len: jax.Array  # [Q]
  finished: jax.Array  # [Q]
  prefills: jax.Array


def _prefill(model, cache: KVCache, tokens_RxP, lengths_R, slots_R):
  """Prefills R prompts into cache rows ``slots_R`` (slots [0, P)); a slot id >= B drops its row.
  Returns (cache, last-position logits [R, V] float32)."""
  R, P = tokens_RxP.shape
  positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (R, P))
  h_RxPxD, part = model.hidden_states(tokens_RxP, positions_BxT=positions,
                                      cache=KVCache.zeros(model.config, R, P))
  h_last = jnp.take_along_axis(h_RxPxD, (lengths_R - 1)[:, None, None], axis=1)
  write = lambda full, new: full.at[slots_R, :P].set(new, mode="drop")  # noqa: E731
  cache = KVCache(tuple(map(write, cache.k, part.k)), tuple(map(write, cache.v, part.v)))
  return cache, model.logits(h_last)[:, 0]


@functools.partial(jax.jit, static_argnames=(
    "graphdef", "slots", "prefill_rows", "max_new_tokens", "temperature", "top_k", "top_p",
    "min_p", "eos_ids", "pad_id", "sampling_impl", "interpret", "bits_per_pass"))
def _generate_continuous(graphdef, params, prompt_QxP, lengths_Q, key, *, slots, prefill_rows,
                         max_new_tokens, temperature, top_k, top_p, min_p, eos_ids, pad_id,
                         sampling_impl="xla", interpret=False, bits_per_pass=1):
  model = nnx.merge(graphdef, params)
  Q, P = prompt_QxP.shape
  B, R, N = slots, prefill_rows, max_new_tokens
  eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
  settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
  if sampling_impl == "xla":
    def sample(keys_B, logits_BxV, _):  # one key per row: tokens independent of the schedule
      one = lambda k, z: sample_token(k, z[None], bits_per_pass=bits_per_pass,  # noqa: E731
                                      **settings)
      return tuple(x[:, 0] for x in jax.vmap(one)(keys_B, logits_BxV))
  else:
    def sample(_, logits_BxV, iteration):
      return kernel_sample_token(jax.random.fold_in(key, iteration), logits_BxV,
                                 impl=sampling_impl, interpret=interpret, **settings)

  # the first min(B, Q) prompts fill slots 0.. before the loop; a slot holding prompt Q is free
  first = jnp.arange(B)
  slot_q = jnp.where(first < Q, first, Q).astype(jnp.int32)
  cache, logits = _prefill(model, KVCache.zeros(model.config, B, P + N),
                           prompt_QxP[jnp.minimum(first, Q - 1)],
                           lengths_Q[jnp.minimum(first, Q - 1)], jnp.where(first < Q, first, B))
  out = (jnp.full((Q, N), pad_id, jnp.int32), jnp.zeros((Q, N), jnp.float32),
         jnp.zeros((Q, N), jnp.float32))

  def refill(st: _Slots) -> _Slots:
    """Prefills the next min(R, free, queued) prompts into the first free slots."""
    free = st.slot_q >= Q
    count = jnp.minimum(jnp.minimum(jnp.sum(free), Q - st.next_q), R)
    k = jnp.arange(R)
    take = k < count
    free_first = jnp.argsort(~free, stable=True)[:R]  # free slots, lowest index first
    slots_R = jnp.where(take, free_first, B)
    q_R = jnp.where(take, st.next_q + k, Q)
    q_safe = jnp.minimum(q_R, Q - 1)
    cache, new_logits = _prefill(model, st.cache, prompt_QxP[q_safe], lengths_Q[q_safe], slots_R)
    return st._replace(  # slot_t of a free slot is already 0
        cache=cache, logits=st.logits.at[slots_R].set(new_logits, mode="drop"),
        slot_q=st.slot_q.at[slots_R].set(q_R, mode="drop"), next_q=st.next_q + count,
        prefills=st.prefills + 1)

  def body(st: _Slots) -> _Slots:
    busy = st.slot_q < Q
    q_safe = jnp.minimum(st.slot_q, Q - 1)
    keys = jax.vmap(lambda q, t: jax.random.fold_in(jax.random.fold_in(key, q), t))(q_safe,
                                                                                    st.slot_t)
    token, logp, model_logp = sample(keys, st.logits, st.it)
    token = jnp.where(busy, token, pad_id)
    at = lambda x: x.at[st.slot_q, st.slot_t]  # noqa: E731  # a free slot's row Q is dropped
    out = (at(st.out[0]).set(token, mode="drop"), at(st.out[1]).set(logp, mode="drop"),
           at(st.out[2]).set(model_logp, mode="drop"))
    hit_eos = busy & jnp.isin(token, eos)
    positions = lengths_Q[q_safe] + st.slot_t  # slot == position, as in ``generate``
    logits, cache = model.decode(token[:, None], positions[:, None], st.cache)
    done = hit_eos | (st.slot_t + 1 >= N)
    st = st._replace(
        it=st.it + 1, cache=cache, logits=logits[:, 0], out=out,
        slot_q=jnp.where(busy & done, Q, st.slot_q),
        slot_t=jnp.where(busy & ~done, st.slot_t + 1, 0),
        gen_len=st.gen_len.at[st.slot_q].add(1, mode="drop"),
        finished=st.finished.at[st.slot_q].set(hit_eos, mode="drop"))
    queued = Q - st.next_q
    wanted = (queued > 0) & (jnp.sum(st.slot_q >= Q) >= jnp.minimum(R, queued))
    return jax.lax.cond(wanted, refill, lambda s: s, st)

  def cond(st: _Slots):
    return (st.next_q < Q) | jnp.any(st.slot_q < Q)

  st = jax.lax.while_loop(cond, body, _Slots(
      it=jnp.int32(0), cache=cache, logits=logits, slot_q=slot_q, slot_t=jnp.zeros((B,), jnp.int32),
      next_q=jnp.int32(min(B, Q)), out=out, gen_len=jnp.zeros((Q,), jnp.int32),
      finished=jnp.zeros((Q,), bool), prefills=jnp.int32(1)))
  return ContinuousOutput(st.out[0], st.gen_len, st.out[1], st.out[2], st.finished, st.it,
                          st.prefills)


def generate_continuous(model, prompt_QxP, lengths_Q, *, slots: int,
                        prefill_rows: int | None = None, key=None, max_new_tokens: int = 64, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None,
                        min_p: float | None = None, eos_ids: Sequence[int] | None = None,
                        pad_id: int = 0, sampling_impl: str = "auto", interpret: bool = False,
                        gather_weights: bool = True) -> ContinuousOutput:
  """Samples continuations of Q right-padded prompts through ``slots`` decode rows, refilling a
  row from the queue as soon as it finishes (module docstring), in one jitted program.

  Args:
    model, prompt_QxP, lengths_Q, key, max_new_tokens, temperature, top_k, top_p, min_p, eos_ids,
      pad_id, sampling_impl, interpret, gather_weights: as ``generate``'s (Q prompts in any
      number; ``sampling_impl`` chooses for ``slots`` rows per step).
    slots: B >= 1, rows decoded per step (the KV cache holds B x (P + N) positions); at most Q
      are used. One slot on one GPU is decoded as two (``min_decode_rows``): two prompts at once.
    prefill_rows: R in [1, B], prompts prefilled per refill, and the free slots a refill waits
      for while the queue holds at least R prompts (default max(1, B // 4)).
  Returns:
    ``ContinuousOutput``: [Q, N] tokens and log-probs, [Q] lengths and finished flags in prompt
    order, the decode steps and prefills spent.
  """
  if _integer(slots) is None or slots < 1:
    raise ValueError(f"generate_continuous: slots must be an integer >= 1 (rows decoded per "
                     f"step), got {slots!r}")
  if prefill_rows is None:
    prefill_rows = max(1, slots // 4)
  if _integer(prefill_rows) is None or not 1 <= prefill_rows <= slots:
    raise ValueError(f"generate_continuous: prefill_rows must be an integer in [1, slots={slots}]"
                     f" (prompts prefilled per refill), got {prefill_rows!r}")
  call = _prepare_decode("generate_continuous", model, prompt_QxP, lengths_Q, key=key,
                         max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, min_p=min_p, eos_ids=eos_ids, pad_id=pad_id,
                         sampling_impl=sampling_impl, split_rows=False,
                         gather_weights=gather_weights,
                         rows_per_step=min(int(slots), max(1, len(prompt_QxP))))
  B = max(min(int(slots), int(call.lengths.shape[0])), call.rows_decoded)  # no slot left idle
  return _generate_continuous(call.graphdef, call.params, call.prompt, call.lengths, call.key,
                              slots=B, prefill_rows=min(int(prefill_rows), B),
                              interpret=bool(interpret),
                              **call.settings)
