"""Merging: invariances (TIES = task arithmetic, DARE unbiased, SLERP endpoints and norm) and
hand-computed values, on plain dicts and on the nnx.State of tiny Transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from postrl.merging import (MergeError, dare, greedy_soup, linear, path_str, slerp, slerp_tensor,
                            task_arithmetic, task_vectors, ties, trim_top_k)
from postrl.models import Transformer
from tests.conftest import tiny_config


def _tree(seed, shapes=(("a", (3, 4)), ("b", (5,)))):
  rng = np.random.default_rng(seed)
  return {name: jnp.asarray(rng.normal(size=shape), jnp.float32) for name, shape in shapes}


def _close(x, y, rtol=1e-6, atol=1e-6):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol,
                                                       atol=atol), x, y)


@pytest.fixture(scope="module")
def tiny_states():
  """graphdef and the states of three tiny models with the same config, different seeds."""
  cfg = tiny_config(vocab_size=37, hidden_size=16, intermediate_size=24, num_attention_heads=2,
                    num_key_value_heads=1)
  states = []
  for seed in range(3):
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))
    states.append(state)
  return graphdef, states


# ------------------------------------------------------------------------------------- linear


def test_linear_weighted_and_unnormalised():
  a, b = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, -2.0])}
  _close(linear([a, b]), {"w": jnp.array([2.0, 0.0])})
  _close(linear([a, b], weights=[1.0, 3.0]), {"w": jnp.array([2.5, -1.0])})
  _close(linear([a, b], weights=[1.0, 3.0], normalize=False), {"w": jnp.array([10.0, -4.0])})
  with pytest.raises(MergeError, match="sum to zero"):
    linear([a, b], weights=[1.0, -1.0])
  with pytest.raises(MergeError, match="one value per model"):
    linear([a, b], weights=[1.0])


def test_greedy_soup_adds_only_helpful_ingredients():
  target = 1.0
  trees = [{"w": jnp.array([x])} for x in (0.9, 3.0, 1.2, -0.5)]
  score = lambda t: -abs(float(t["w"][0]) - target)
  soup, chosen = greedy_soup(trees, score)
  # sorted by score: 0.9, 1.2, -0.5, 3.0; {0.9, 1.2} -> 1.05 (better); -0.5 and 3.0 make it worse
  assert chosen == [0, 2]
  _close(soup, {"w": jnp.array([1.05])})


def test_bfloat16_leaves_keep_their_dtype_and_ints_pass_through():
  a = {"w": jnp.array([1.0, 2.0], jnp.bfloat16), "step": jnp.array(7, jnp.int32)}
  b = {"w": jnp.array([3.0, 4.0], jnp.bfloat16), "step": jnp.array(9, jnp.int32)}
  out = linear([a, b])
  assert out["w"].dtype == jnp.bfloat16 and int(out["step"]) == 7
  _close(out["w"].astype(jnp.float32), jnp.array([2.0, 3.0]))


# ------------------------------------------------------------------------- task arithmetic


def test_task_arithmetic_hand_computed():
  base = {"w": jnp.array([1.0, 1.0])}
  m1, m2 = {"w": jnp.array([2.0, 1.0])}, {"w": jnp.array([1.0, -1.0])}
  # τ1 = [1, 0], τ2 = [0, -2]
  _close(task_arithmetic(base, [m1, m2], lam=0.5), {"w": jnp.array([1.5, 0.0])})
  _close(task_arithmetic(base, [m1, m2], lam=[1.0, -1.0]), {"w": jnp.array([2.0, 3.0])})
  _close(task_arithmetic(base, [m1]), m1)  # λ = 1 with one model returns it
  _close(task_vectors(base, [m1, m2]), [{"w": jnp.array([1.0, 0.0])},
                                        {"w": jnp.array([0.0, -2.0])}])


def test_task_arithmetic_with_lambda_one_over_t_is_the_uniform_soup():
  base, models = _tree(0), [_tree(1), _tree(2), _tree(3)]
  _close(task_arithmetic(base, models, lam=1 / 3), linear(models), rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------------- TIES


def test_trim_keeps_top_k_magnitudes_per_tensor():
  x = jnp.array([0.1, -5.0, 2.0, 0.3])
  np.testing.assert_array_equal(trim_top_k(x, 0.5), [0.0, -5.0, 2.0, 0.0])
  np.testing.assert_array_equal(trim_top_k(x, 0.25), [0.0, -5.0, 0.0, 0.0])
  np.testing.assert_array_equal(trim_top_k(x, 1.0), x)
  np.testing.assert_array_equal(trim_top_k(x, 0.0), jnp.zeros(4))


def test_trim_keeps_at_least_one_entry_of_a_tiny_tensor():
  # round(0.2 * 2) = 0 (and round(0.5 * 1) = 0): a bias lost its whole task vector, so TIES
  # silently merged it to the base value
  np.testing.assert_array_equal(trim_top_k(jnp.array([0.1, -5.0]), 0.2), [0.0, -5.0])
  np.testing.assert_array_equal(trim_top_k(jnp.array([3.0]), 0.2), [3.0])
  np.testing.assert_array_equal(trim_top_k(jnp.array([3.0]), 0.5), [3.0])
  np.testing.assert_array_equal(trim_top_k(jnp.array([3.0]), 0.0), [0.0])
  base = {"b": jnp.zeros(2), "w": jnp.zeros(10)}
  models = [{"b": jnp.array([1.0, 0.5]), "w": jnp.arange(10.0)},
            {"b": jnp.array([3.0, 0.0]), "w": jnp.arange(10.0)}]
  merged = ties(base, models, density=0.2)
  _close(merged["b"], jnp.array([2.0, 0.0]))  # the top entry of each, disjoint mean
  _close(merged["w"], jnp.array([0.0] * 8 + [8.0, 9.0]))


def test_ties_full_density_without_conflicts_equals_task_arithmetic_over_t():
  """density=1 and one sign per entry: the disjoint mean is the plain mean, so
  TIES(λ) = base + λ mean_t τ_t = task_arithmetic(λ / T)."""
  rng = np.random.default_rng(0)
  base = _tree(0)
  T, lam = 3, 0.7
  signs = {k: rng.choice([-1.0, 1.0], size=v.shape) for k, v in base.items()}
  models = [{k: base[k] + signs[k] * (np.abs(rng.normal(size=v.shape)) + 0.1)
             for k, v in base.items()} for _ in range(T)]
  expected = task_arithmetic(base, models, lam=lam / T)
  _close(ties(base, models, density=1.0, lam=lam), expected, rtol=1e-5, atol=1e-6)
  # with T tasks the TIES mean is not the task-arithmetic sum (the normalisation matters)
  with pytest.raises(AssertionError):
    _close(ties(base, models, density=1.0, lam=lam), task_arithmetic(base, models, lam=lam))


def test_ties_elects_sign_and_takes_disjoint_mean():
  base = {"w": jnp.zeros(4)}
  # entry 0: +3, -1, +1 -> γ=+ (sum 3), mean of {3, 1} = 2
  # entry 1: -4, +1, +1 -> γ=- (sum -2), mean of {-4} = -4
  # entry 2: +2, -2, 0  -> γ=0, nothing agrees: 0
  # entry 3: 0, 0, +5   -> γ=+, mean of {5} = 5 (zeros are not counted)
  models = [{"w": jnp.array([3.0, -4.0, 2.0, 0.0])}, {"w": jnp.array([-1.0, 1.0, -2.0, 0.0])},
            {"w": jnp.array([1.0, 1.0, 0.0, 5.0])}]
  _close(ties(base, models, density=1.0, lam=1.0), {"w": jnp.array([2.0, -4.0, 0.0, 5.0])})
  trimmed = ties(base, models, density=0.5, lam=2.0)
  # density 0.5 keeps the top 2 magnitudes of each τ_t (plus ties at the threshold):
  # τ̂1 = [3, -4, 0, 0]; τ̂2 = [-1, 1, -2, 0] (|-1| = |1| tie: both kept); τ̂3 = [1, 1, 0, 5].
  # entry0: sum 3 -> +, {3, 1} -> 2; entry1: sum -2 -> -, {-4}; entry2: sum -2 -> -, {-2};
  # entry3: {5}. λ = 2.
  _close(trimmed, {"w": 2.0 * jnp.array([2.0, -4.0, -2.0, 5.0])})


# -------------------------------------------------------------------------------------- DARE


def test_dare_p_zero_is_identity_and_survivors_are_rescaled():
  tau = {"w": jnp.linspace(-1.0, 1.0, 50), "n": jnp.array(3, jnp.int32)}
  assert dare(tau, p=0.0, key=None) is tau
  out = dare(tau, p=0.25, key=jax.random.key(0))
  kept = np.asarray(out["w"]) != 0
  np.testing.assert_allclose(np.asarray(out["w"])[kept], np.asarray(tau["w"])[kept] / 0.75,
                             rtol=1e-6)
  assert int(out["n"]) == 3


def test_dare_preserves_the_expectation():
  """E[τ̂] = τ with Var = τ² p/(1-p): the mean of N draws lies within 6 std of τ per entry."""
  p, n = 0.4, 4000
  tau = jnp.asarray(np.random.default_rng(0).normal(size=(64,)), jnp.float32)
  draws = jax.vmap(lambda k: dare({"w": tau}, p=p, key=k)["w"])(
      jax.random.split(jax.random.key(1), n))
  std_of_mean = np.abs(np.asarray(tau)) * np.sqrt(p / (1 - p) / n)
  err = np.abs(np.asarray(draws.mean(0)) - np.asarray(tau))
  assert np.all(err <= 6 * std_of_mean + 1e-6), (err / std_of_mean).max()
  dropped = float((draws == 0).mean())
  assert abs(dropped - p) < 6 * np.sqrt(p * (1 - p) / draws.size)
  # without the 1/(1-p) rescale the mean would be (1-p) τ: far outside the bound
  assert np.all(np.abs((1 - p) * np.asarray(tau) - np.asarray(tau)) > 6 * std_of_mean)


def test_dare_combines_with_task_arithmetic_and_ties():
  base, models = _tree(0), [_tree(1), _tree(2)]
  _close(task_arithmetic(base, models, dare_p=0.0), task_arithmetic(base, models))
  key = jax.random.key(3)
  taus = task_vectors(base, models)
  dropped = [dare(t, p=0.5, key=jax.random.fold_in(key, i)) for i, t in enumerate(taus)]
  expected = jax.tree.map(lambda b, t0, t1: b + 0.8 * (t0 + t1), base, *dropped)
  _close(task_arithmetic(base, models, lam=0.8, dare_p=0.5, key=key), expected)
  out = ties(base, models, density=1.0, dare_p=0.5, key=key)
  assert np.mean(np.asarray(out["a"]) == np.asarray(base["a"])) > 0.1  # both dropped somewhere
  with pytest.raises(MergeError, match="PRNG key"):
    task_arithmetic(base, models, dare_p=0.5)
  with pytest.raises(MergeError, match=r"\[0, 1\)"):
    dare(taus[0], p=1.0, key=key)


# ------------------------------------------------------------------------------------- SLERP


def test_slerp_endpoints_norm_and_hand_value():
  rng = np.random.default_rng(0)
  a, b = _tree(1), _tree(2)
  _close(slerp(a, b, t=0.0), a)
  _close(slerp(a, b, t=1.0), b)
  u = rng.normal(size=(2, 16))
  u0, u1 = (jnp.asarray(x / np.linalg.norm(x), jnp.float32) for x in u)
  for t in (0.1, 0.5, 0.9):
    np.testing.assert_allclose(float(jnp.linalg.norm(slerp_tensor(t, u0, u1))), 1.0, rtol=1e-6)
    # linear interpolation of non-colinear unit vectors shrinks the norm: slerp must not
    assert float(jnp.linalg.norm((1 - t) * u0 + t * u1)) < 0.999
  e0, e1 = jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])
  np.testing.assert_allclose(slerp_tensor(0.5, e0, e1), [np.sqrt(0.5)] * 2, rtol=1e-6)
  np.testing.assert_allclose(slerp_tensor(1 / 3, e0, e1), [np.cos(np.pi / 6), np.sin(np.pi / 6)],
                             rtol=1e-6)


def test_slerp_colinear_falls_back_to_linear_interpolation():
  v = jnp.array([[1.0, -2.0], [0.5, 3.0]])
  for w in (2.0 * v, -v):
    for t in (0.25, 0.5):
      out = slerp_tensor(t, v, w)
      assert bool(jnp.all(jnp.isfinite(out)))
      np.testing.assert_allclose(out, (1 - t) * v + t * w, rtol=1e-6, atol=1e-7)


def test_slerp_per_path_t():
  a, b = _tree(1), _tree(2)
  out = slerp(a, b, t=lambda path: 0.0 if path == "a" else 1.0)
  _close(out["a"], a["a"])
  _close(out["b"], b["b"])


# ------------------------------------------------------------------- models and structure


def test_every_method_merges_a_model_with_itself_into_itself(tiny_states):
  _, (s, *_) = tiny_states
  key = jax.random.key(0)
  for merged in (linear([s, s]), linear([s, s, s], weights=[0.2, 0.3, 0.5]),
                 task_arithmetic(s, [s, s], lam=0.7), ties(s, [s, s], density=0.2),
                 ties(s, [s], density=1.0, dare_p=0.3, key=key),
                 task_arithmetic(s, [s], dare_p=0.3, key=key), slerp(s, s, t=0.3)):
    assert isinstance(merged, nnx.State)
    _close(merged, s)


def test_merged_tiny_transformer_runs_forward(tiny_states):
  graphdef, states = tiny_states
  base, m1, m2 = states
  tokens = jnp.array([[1, 5, 9, 3, 7, 2]])
  logits_a = nnx.merge(graphdef, m1)(tokens)
  np.testing.assert_allclose(nnx.merge(graphdef, linear([m1, m2], weights=[1.0, 0.0]))(tokens),
                             logits_a, rtol=1e-6, atol=1e-6)
  key = jax.random.key(1)
  for merged in (linear([m1, m2]), task_arithmetic(base, [m1, m2], lam=0.5),
                 ties(base, [m1, m2], density=0.5, lam=1.0),
                 ties(base, [m1, m2], density=1.0, dare_p=0.5, key=key), slerp(m1, m2, t=0.5)):
    logits = nnx.merge(graphdef, merged)(tokens)
    assert logits.shape == (1, 6, 37) and bool(jnp.all(jnp.isfinite(logits)))
    assert not np.allclose(logits, logits_a)


def test_structure_mismatch_names_the_first_mismatching_path(tiny_states):
  a = {"x": jnp.ones(3), "y": {"z": jnp.ones(2)}}
  with pytest.raises(MergeError, match=r"trees\[1\] has no leaf 'y/z'"):
    linear([a, {"x": jnp.ones(3), "y": {}}])
  with pytest.raises(MergeError, match=r"models\[0\] has a leaf 'y/w' that base lacks"):
    task_arithmetic(a, [{"x": jnp.ones(3), "y": {"z": jnp.ones(2), "w": jnp.ones(1)}}])
  with pytest.raises(MergeError, match=r"'y/z': shape \(4,\) in b but \(2,\) in a"):
    slerp(a, {"x": jnp.ones(3), "y": {"z": jnp.ones(4)}})
  _, (s, *_) = tiny_states
  deeper = tiny_config(vocab_size=37, hidden_size=16, intermediate_size=24, num_attention_heads=2,
                       num_key_value_heads=1, num_hidden_layers=3)
  _, s3 = nnx.split(Transformer(deeper, rngs=nnx.Rngs(0)))
  with pytest.raises(MergeError, match=r"trees\[1\] has a leaf 'layers/2/input_layernorm/weight'"):
    linear([s, s3])
  with pytest.raises(MergeError, match=r"no trees"):
    linear([])
  with pytest.raises(MergeError, match=r"no fine-tuned models"):
    ties(a, [])


def test_path_str():
  (path, _), = jax.tree_util.tree_flatten_with_path({"layers": [{"k": 1}]})[0]
  assert path_str(path) == "layers/0/k"
