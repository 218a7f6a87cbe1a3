"""Tree drafting: lossless greedy decoding, the tree's states against a from-scratch
recomputation, the chain as a one-child tree, batches, the mesh, and refused settings."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_tiny import make_hf_model
from kangaroo_jax import cache as kv
from kangaroo_jax import model as M
from kangaroo_jax import tree as T
from kangaroo_jax.adapter import init_adapter
from kangaroo_jax.decoding import plain_decode
from kangaroo_jax.kangaroo import KangarooParams, _kangaroo_start, kangaroo_decode
from kangaroo_jax.sampling import SamplingParams
from test_kangaroo import EOS, _easy_draft_model, _prompts


@pytest.fixture(scope="module")
def easy():
  return _easy_draft_model()


@pytest.mark.parametrize("nodes, topk, gamma, eta", [(4, 2, 3, 0.01), (8, 4, 4, 0.01),
                                                     (16, 4, 6, 0.3), (5, 3, 2, 0.9),
                                                     (1, 1, 1, 0.5), (12, 2, 6, 1.0)])
def test_tree_greedy_identical_to_plain(easy, nodes, topk, gamma, eta):
  model, adapter = easy
  prompts = _prompts([5, 12, 3])
  plain = plain_decode(model, prompts, max_new_tokens=30, eos_ids=[EOS]).tokens
  out = kangaroo_decode(model, adapter, prompts, max_new_tokens=30, eos_ids=[EOS],
                        kparams=KangarooParams(eta, gamma, True, nodes, topk))
  assert out.tokens == plain
  assert out.stats["drafts_verified"] <= nodes * out.stats["rounds"]


def test_random_adapter_and_repetition_penalty_stay_identical():
  """A useless draft (random adapter) and a penalty that changes per path position."""
  _, cfg, sd = make_hf_model("gqa_untied", num_layers=4)
  model = M.from_hf_state_dict(cfg, sd)
  adapter = init_adapter(cfg, 2, seed=3)
  prompts = _prompts([7, 4], seed=2)
  params = SamplingParams(repetition_penalty=1.4)
  plain = plain_decode(model, prompts, max_new_tokens=24, eos_ids=[EOS], params=params).tokens
  for draft_ids in (None, np.arange(0, 97, 2)):
    out = kangaroo_decode(model, adapter, prompts, max_new_tokens=24, eos_ids=[EOS],
                          params=params, draft_ids=draft_ids,
                          kparams=KangarooParams(0.01, 3, True, 6, 3))
    assert out.tokens == plain


def test_one_child_tree_is_the_chain(easy):
  """top-k 1 and as many nodes as drafts: the same rounds and drafts as the chain."""
  model, adapter = easy
  prompts = _prompts([6, 10], seed=4)
  for eta in (0.01, 0.5):
    chain = kangaroo_decode(model, adapter, prompts, max_new_tokens=30, eos_ids=[EOS],
                            kparams=KangarooParams(eta, 4, True))
    tree = kangaroo_decode(model, adapter, prompts, max_new_tokens=30, eos_ids=[EOS],
                           kparams=KangarooParams(eta, 4, True, 4, 1))
    assert tree.tokens == chain.tokens
    for stat in ("rounds", "draft_steps", "mean_accepted_tokens"):
      assert tree.stats[stat] == chain.stats[stat], stat


def test_tree_states_equal_a_from_scratch_recomputation(easy):
  """Every node's layer-l state and cumulative draft log-probability equal running the
  shallow layers and the adapter over prompt + root + the node's path with no cache."""
  model, adapter = easy
  l, topk, gamma = adapter.acfg.exit_layer, 3, 3
  prompt = _prompts([6], seed=5)[0]
  tokens = jnp.asarray([prompt + [0] * (32 - len(prompt))])
  lens = jnp.asarray([len(prompt)])
  params = SamplingParams()
  st = _kangaroo_start(model, adapter, tokens, lens, jax.random.key(0), jnp.asarray([EOS]), 20,
                       params=params, capacity=20, gamma=gamma)
  tree, _, _, _, _ = T.draft_tree(model, adapter, None, None, st, jnp.float32(0.01),
                                  gamma=gamma, topk=topk, params=params)
  root = int(st.y0[0])

  def path(slot):
    out = []
    while slot >= 0:
      out.append(int(tree.tokens[0, slot]))
      slot = int(tree.parent[0, slot])
    return out[::-1]

  def scratch(seq):  # layer-l states [T, D] and draft log-probs [T, V] of seq from scratch
    pos = jnp.arange(len(seq))[None]
    h, _ = model.run_layers(model.embed(jnp.asarray([seq])), pos,
                            kv.init_model_cache(model.cfg, 1, len(seq)), 0, l)
    a, _ = adapter(h, pos, adapter.init_cache(1, len(seq)))
    return h[0], jax.nn.log_softmax(model.project(a)[0], -1)

  filled = np.flatnonzero(np.isfinite(np.asarray(tree.score[0])))
  assert len(filled) == topk * gamma  # eta 0.01: every depth grows
  for slot in filled:
    seq = prompt + [root] + path(slot)
    h, logq = scratch(seq)
    np.testing.assert_allclose(tree.hidden[0, slot], h[-1], atol=2e-4)
    n0 = len(prompt)  # the root's index in seq
    want = sum(float(logq[n0 + i, seq[n0 + i + 1]]) for i in range(len(seq) - n0 - 1))
    np.testing.assert_allclose(float(tree.score[0, slot]), want, atol=2e-4)
  # The children of one node are distinct, and a parent always ranks above its children.
  chosen = np.asarray(T.select_nodes(tree, topk * gamma)[0])
  rank = {int(s): i for i, s in enumerate(chosen)}
  for slot in filled:
    parent = int(tree.parent[0, slot])
    if parent >= 0:
      assert rank[parent] < rank[int(slot)]


def test_mesh_2x4_tree_equals_single_device():
  assert len(jax.devices()) >= 8, "conftest sets 8 fake CPU devices"
  from kangaroo_jax.sharding import make_mesh, shard_module
  model, adapter = _easy_draft_model(seed=1)
  prompts = _prompts([5, 9, 2, 14], seed=7)
  kp = KangarooParams(0.01, 3, True, 8, 4)
  want = kangaroo_decode(model, adapter, prompts, max_new_tokens=16, eos_ids=[EOS], kparams=kp)
  mesh = make_mesh(2, 4)
  shard_module(model, mesh)
  shard_module(adapter, mesh)
  got = kangaroo_decode(model, adapter, prompts, max_new_tokens=16, eos_ids=[EOS], kparams=kp,
                        mesh=mesh)
  assert got.tokens == want.tokens
  assert got.tokens == plain_decode(model, prompts, max_new_tokens=16, eos_ids=[EOS]).tokens


@pytest.mark.parametrize("kparams, params, message", [
    (KangarooParams(0.6, 3, True, 4, 4), SamplingParams(temperature=0.7), "greedy only"),
    (KangarooParams(0.6, 2, True, 9, 4), SamplingParams(), "tree nodes"),
    (KangarooParams(0.6, 2, True, 4, 0), SamplingParams(), "tree top-k"),
])
def test_refused_tree_settings(easy, kparams, params, message):
  model, adapter = easy
  with pytest.raises(ValueError, match=message):
    kangaroo_decode(model, adapter, [[3, 4]], max_new_tokens=4, kparams=kparams, params=params)


def test_negative_tree_nodes_refused():
  with pytest.raises(ValueError, match="tree nodes"):
    KangarooParams(tree_nodes=-1)
