"""Adapter training: the distillation loss, the jitted train step, evaluation.

The loss (Liu et al., 2024) at position t compares two distributions over token t+1:

  q_A(.|t) = softmax(head(adapter(h_l)[t]))   the draft, trained
  p_T(.|t) = softmax(head(norm(h_L)[t]))      the frozen target

  L = -(1 / sum_t m_t) sum_t m_t sum_v p_T(v|t) log q_A(v|t),   m_t = [token t+1 is assistant]

Both predict token t+1, so the mask is the assistant flag shifted left by one
(`prediction_mask`); the reference code shifts inputs and targets but not the mask.
The teacher comes either on the fly (the deep layers run inside the step) or from a
top-k cache recorded when the target wrote the data (`teacher_ids`/`teacher_probs` rows
are indexed by the token they describe, so they shift the same way as the mask).
With a reduced draft vocabulary V' both distributions live on V' (the draft can never
propose another token); top-1 agreement still compares with the target's full argmax.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kangaroo_jax.adapter import Adapter, tensors
from kangaroo_jax.model import Llama
from kangaroo_jax.precision import TRAINING


def prediction_mask(assistant: jax.Array) -> jax.Array:
  """[B, T] assistant flags -> [B, T] loss mask: m[t] = assistant[t + 1] (last is 0)."""
  return jnp.pad(assistant[:, 1:], ((0, 0), (0, 1)))


def next_rows(x: jax.Array) -> jax.Array:
  """Row t <- row t + 1 along axis 1 (zero past the end): token-indexed -> prediction-indexed."""
  return jnp.pad(x[:, 1:], [(0, 0), (0, 1)] + [(0, 0)] * (x.ndim - 2))


def draft_index(draft_ids: Optional[np.ndarray], vocab_size: int) -> np.ndarray:
  """[V] map token id -> position in the draft vocabulary, or V' when it is not in it."""
  if draft_ids is None:
    return np.arange(vocab_size, dtype=np.int32)
  inv = np.full(vocab_size, len(draft_ids), np.int32)
  inv[np.asarray(draft_ids)] = np.arange(len(draft_ids), dtype=np.int32)
  return inv


def pick_draft_vocab(counts: np.ndarray, size: int, always: tuple[int, ...] = ()) -> np.ndarray:
  """The `size` most frequent token ids, `always` (e.g. EOS) first, then by falling count.

  The order is the contract `tuning.select_draft_ids` relies on: its first n ids are the
  n most useful ones, so `--draft-vocab n` keeps the most frequent tokens (ties by id).
  """
  order = np.argsort(-counts, kind="stable")
  chosen = list(dict.fromkeys(list(always) + order.tolist()))[:size]
  return np.asarray(chosen, np.int32)


# Positions a block of the loss: the draft's and the teacher's logits exist for one block
# of [B, 256, V] at a time (7B, 4 sequences a chip: 131 MiB each), never for all T.
LOSS_CHUNK = 256


def map_blocks(f, xs):
  """`jax.lax.map(lambda x: f(*x), xs)`, unrolled into straight-line code: a compiled
  program's cost analysis counts a while loop's body once, not once per trip, so a loop
  would hide most of the blocks' FLOPs from `kangaroo_jax.aot`'s figures."""
  return jax.lax.scan(lambda _, x: (None, f(*x)), None, xs, unroll=True)[1]


def position_terms(draft_logits: jax.Array, teacher_probs: jax.Array,
                   teacher_top1: jax.Array) -> dict:
  """Per position [B, T]: the soft cross-entropy "ce", "agree" (the draft's argmax is the
  target's), "accept" (sum min(p, q): expected acceptance) and "confidence" (max q).

  draft_logits, teacher_probs [B, T, V']; teacher_top1 [B, T] (V' = outside V').
  """
  logq = jax.nn.log_softmax(draft_logits.astype(jnp.float32), axis=-1)  # [B, T, V']
  q = jnp.exp(logq)
  return {"ce": -jnp.sum(teacher_probs * logq, axis=-1),
          "agree": (jnp.argmax(logq, axis=-1) == teacher_top1).astype(jnp.float32),
          "accept": jnp.sum(jnp.minimum(teacher_probs, q), axis=-1),
          "confidence": jnp.max(q, axis=-1)}


def masked_means(terms: dict, mask: jax.Array) -> tuple[jax.Array, dict]:
  """(loss, {"loss", "top1_agreement", "expected_acceptance", "tokens"}) over `mask` [B, T]."""
  m = mask.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(m), 1.0)
  mean = lambda x: jnp.sum(x * m) / n
  loss = mean(terms["ce"])
  return loss, {"loss": loss, "top1_agreement": mean(terms["agree"]),
                "expected_acceptance": mean(terms["accept"]), "tokens": jnp.sum(m)}


def distill_loss(draft_logits: jax.Array, teacher_probs: jax.Array, teacher_top1: jax.Array,
                 mask: jax.Array) -> tuple[jax.Array, dict]:
  """Soft cross-entropy of draft vs teacher, masked, plus agreement metrics.

  Args:
    draft_logits: [B, T, V'] the draft's logits at each position.
    teacher_probs: [B, T, V'] the target's probabilities at the same positions.
    teacher_top1: [B, T] index (in V') of the target's full-vocabulary argmax; V' when
      that token is outside the draft vocabulary.
    mask: [B, T] which positions count.
  Returns:
    (loss, {"loss", "top1_agreement", "expected_acceptance", "tokens"}).
  """
  return masked_means(position_terms(draft_logits, teacher_probs, teacher_top1), mask)


def step_numerics(model: Llama) -> tuple:
  """(activation dtype, `Products`) of the training step's forward pass for `model`.

  A bfloat16 model trains in bfloat16 (`precision.TRAINING`: bfloat16 products, float32
  sums; the adapter's float32 master weights are rounded where they meet the states);
  a float32 one in the model's own activations and products.
  """
  if model.dtype == jnp.bfloat16:
    return jnp.bfloat16, TRAINING
  return model.activations, model.products


def forward(model: Llama, adapter: Adapter, batch: dict, inv: jax.Array,
            draft_ids: Optional[jax.Array], chunk: int = LOSS_CHUNK) -> tuple[jax.Array, dict]:
  """Loss and metrics of the adapter on a batch (see the module docstring).

  batch: tokens [B, T], assistant [B, T] and optionally teacher_ids / teacher_probs
  [B, T, K] and hidden [B, T, D]; inv [V] from `draft_index`; draft_ids [V'] or None.
  """
  return masked_means(*draft_and_teacher(model, adapter, batch, inv, draft_ids, chunk))


def draft_and_teacher(model: Llama, adapter: Adapter, batch: dict, inv: jax.Array,
                      draft_ids: Optional[jax.Array], chunk: int = LOSS_CHUNK) -> tuple[dict, jax.Array]:
  """({name: [B, T]} `position_terms` of every position, loss mask [B, T]).

  The frozen layers run over whole sequences without a KV cache (`Llama.run_sequence`);
  the logits of the draft and the teacher are formed `chunk` positions at a time
  (`jax.checkpoint`: the backward pass recomputes a block rather than keeping all T).
  """
  act, products = step_numerics(model)
  tokens = batch["tokens"]
  b, t = tokens.shape
  l = adapter.acfg.exit_layer
  if "hidden" in batch:  # precomputed by `add_hidden`
    h_l = batch["hidden"].astype(act)
  else:
    h_l = model.run_sequence(model.embed(tokens).astype(act), 0, l, products)  # [B, T, D]
  h_l = jax.lax.stop_gradient(h_l)
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))  # [B, T]
  out = adapter.sequence(h_l, positions, products)  # [B, T, D]
  head = None if draft_ids is None else jax.lax.stop_gradient(model.head_weight()[draft_ids])  # [V', D]
  cached = "teacher_ids" in batch
  if cached:  # rows describe tokens: shift them onto the positions that predict them
    teacher = (next_rows(batch["teacher_ids"]), next_rows(batch["teacher_probs"]))  # [B, T, K]
  else:
    teacher = (jax.lax.stop_gradient(model.run_sequence(h_l, l, None, products)),)  # [B, T, D]

  @jax.checkpoint
  def block(out_c, teacher_c):
    logits = model.project(out_c, head, products)  # [B, Tc, V']
    if cached:
      ids, probs = teacher_c
      idx = inv[ids]  # [B, Tc, K] in V', V' = not in the draft vocabulary
      bi = jnp.arange(ids.shape[0])[:, None, None]
      ti = jnp.arange(ids.shape[1])[None, :, None]
      p = jnp.zeros(logits.shape, jnp.float32).at[bi, ti, idx].add(
          probs.astype(jnp.float32), mode="drop")  # [B, Tc, V']
      top1 = idx[..., 0]  # [B, Tc]
    else:
      full = jax.lax.stop_gradient(model.logits(teacher_c[0], products))  # [B, Tc, V]
      p = jax.nn.softmax(full, axis=-1)
      p = p if draft_ids is None else p[..., draft_ids]  # [B, Tc, V']
      top1 = inv[jnp.argmax(full, axis=-1)]  # [B, Tc]
    return position_terms(logits, p, top1)

  c = min(chunk, t)
  blocks = -(-t // c)

  def split(x):  # [B, T, ...] -> [C, B, Tc, ...], zero-padded to whole blocks
    x = jnp.pad(x, [(0, 0), (0, blocks * c - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, blocks, c, *x.shape[2:]), 1, 0)

  terms = map_blocks(block, (split(out), tuple(map(split, teacher))))  # [C, B, Tc]
  terms = {k: jnp.moveaxis(v, 0, 1).reshape(b, blocks * c)[:, :t] for k, v in terms.items()}  # [B, T]
  return terms, prediction_mask(batch["assistant"])


def warm_start(adapter: Adapter, model: Llama) -> Adapter:
  """Starts the adapter as the "logit lens" of layer l: head(final_norm(h_l)).

  Zeroing the attention's output projection makes the block the identity on h_l, and
  copying the target's final norm makes the draft the target's own head read at layer l.
  Training then only has to learn the correction, not undo a random projection (at
  random init the draft's loss is ~3x higher and the first epochs are spent there).
  """
  adapter.attn.o[...] = jnp.zeros_like(adapter.attn.o[...])
  adapter.out_norm.weight[...] = model.norm.weight[...].astype(adapter.out_norm.weight.dtype)
  return adapter


def add_hidden(model: Llama, examples, exit_layer: int, seq_len: int, batch_size: int) -> None:
  """Stores each conversation's frozen layer-l states in it (`Conversation.hidden`).

  With a cached teacher the shallow layers are the only frozen compute left in a step;
  they see the same tokens every epoch, so running them once saves about a third of
  each step. Causal attention makes a row's states independent of its padding.
  """
  from kangaroo_jax import data
  graphdef, state = nnx.split(model)

  @jax.jit
  def shallow(state, tokens):
    return nnx.merge(graphdef, state).run_fresh(tokens, exit_layer)  # [B, T, D]

  for i in range(0, len(examples), batch_size):
    chunk = examples[i:i + batch_size]
    h = np.asarray(shallow(state, data.make_batch(chunk, seq_len, rows=batch_size)["tokens"]),
                   np.float32)
    for j, ex in enumerate(chunk):
      ex.hidden = h[j, :min(len(ex.ids), seq_len)]


def copy_adapter_weights(source: Adapter, target: Adapter) -> None:
  """Starts `target` from `source`'s weights (same exit layer and heads; an FFN that only
  `target` has keeps its zero output projection, so the start computes what `source` does)."""
  if (source.acfg.exit_layer, source.acfg.num_heads) != (target.acfg.exit_layer, target.acfg.num_heads):
    raise ValueError(f"config.init_from: exit layer / heads {source.acfg.exit_layer}/"
                     f"{source.acfg.num_heads} != {target.acfg.exit_layer}/{target.acfg.num_heads}")
  theirs = tensors(source)
  for name, var in tensors(target).items():
    if name in theirs and theirs[name].shape == var.shape:
      var.set_value(theirs[name][...].astype(var[...].dtype))


def make_optimizer(lr: float, warmup_steps: int, total_steps: int, weight_decay: float = 0.0,
                   b1: float = 0.9, b2: float = 0.95, grad_clip: float = 1.0,
                   end_lr_fraction: float = 0.1) -> optax.GradientTransformation:
  """AdamW with linear warm-up then cosine decay, after global-norm gradient clipping."""
  warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup_steps, max(total_steps, warmup_steps + 1), lr * end_lr_fraction)
  return optax.chain(optax.clip_by_global_norm(grad_clip),
                     optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))


def _on_mesh(mesh):
  """The context a step traces in: `mesh`'s axes, so `sharding.gathered` sees them."""
  return contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def make_train_step(model_graphdef, adapter_graphdef, tx: optax.GradientTransformation,
                    state_shardings=None, mesh=None):
  """A jitted `step(params, opt_state, model_state, batch, inv, draft_ids)`.

  Returns (params, opt_state, metrics). Only the adapter's params get gradients; the
  model state is an argument (not a constant) so the compiled step stays small.
  `state_shardings` = (params, opt_state) shardings pins the outputs to the inputs'
  layout, so the second step does not compile again for a new layout. `mesh`: the mesh
  the arguments live on, for weights stored fully sharded (`sharding.gathered`).
  """

  def loss_fn(params, model_state, batch, inv, draft_ids):
    model = nnx.merge(model_graphdef, model_state)
    adapter = nnx.merge(adapter_graphdef, params)
    return forward(model, adapter, batch, inv, draft_ids)

  out = None if state_shardings is None else (*state_shardings, None)

  @functools.partial(jax.jit, donate_argnums=(0, 1), out_shardings=out)
  def step(params, opt_state, model_state, batch, inv, draft_ids):
    with _on_mesh(mesh):
      (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, model_state, batch, inv, draft_ids)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return params, opt_state, metrics

  return step


def make_eval_step(model_graphdef, adapter_graphdef, mesh=None):
  """A jitted `eval(params, model_state, batch, inv, draft_ids)` -> metrics."""

  @jax.jit
  def evaluate(params, model_state, batch, inv, draft_ids):
    model = nnx.merge(model_graphdef, model_state)
    with _on_mesh(mesh):
      terms, mask = draft_and_teacher(model, nnx.merge(adapter_graphdef, params), batch, inv,
                                      draft_ids)
    metrics = masked_means(terms, mask)[1]
    # Per position, for `simulate_acceptance` (keys with "_" are not averaged).
    metrics["_correct"] = terms["agree"] > 0  # [B, T]
    metrics["_confidence"] = terms["confidence"]  # [B, T]
    metrics["_mask"] = mask
    return metrics

  return evaluate


def simulate_acceptance(correct: np.ndarray, confidence: np.ndarray, mask: np.ndarray,
                        eta: float = 0.6, gamma: int = 6) -> tuple[int, int]:
  """Kangaroo rounds replayed on teacher-forced text: (tokens accepted, rounds).

  On text the target wrote greedily this is exactly what greedy Kangaroo decoding would
  accept there: each round drafts while the draft is confident (the first token below
  `eta` is still sent) up to `gamma` tokens, accepts the drafts up to the first one that
  differs from the target's argmax, and adds the target's own token. Positions outside
  `mask` (the answer) are skipped; tokens/rounds is the mean accepted tokens per step.
  """
  tokens = rounds = 0
  for ok, conf, m in zip(correct, confidence, mask):
    idx = np.flatnonzero(m)
    t = 0
    while t < len(idx):
      a = 0
      while a < gamma and t + a < len(idx) and ok[idx[t + a]]:
        a += 1
        if conf[idx[t + a - 1]] < eta:
          break
      n = min(a + 1, len(idx) - t)
      tokens, rounds, t = tokens + n, rounds + 1, t + n
  return tokens, rounds


def average(metrics: list[dict]) -> dict:
  """Token-weighted mean of per-batch metrics (host floats)."""
  n = sum(float(m["tokens"]) for m in metrics)
  keys = [k for k in metrics[0] if k not in ("tokens", "grad_norm") and not k.startswith("_")]
  out = {k: sum(float(m[k]) * float(m["tokens"]) for m in metrics) / max(n, 1.0) for k in keys}
  out["tokens"] = n
  return out


# ---- the training run: data, mesh, resume, loop, export ----
