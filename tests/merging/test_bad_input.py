"""Bad merge coefficients and arguments: a MergeError naming them, never a NaN model, a key
name returned as "the merge", or a trace from inside JAX."""

import math

import jax
import jax.numpy as jnp
import pytest

from postrl.merging import merge as M

A = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
B = {"w": 2 * jnp.ones((3, 2)), "b": jnp.ones(2)}
C = {"w": 3 * jnp.ones((3, 2)), "b": jnp.ones(2)}


@pytest.mark.parametrize("call, match", [
    (lambda v: M.linear([A, B], weights=[v, 1.0]), r"weights\[0\] must be finite"),
    (lambda v: M.linear([A, B], weights=v), "weights must be finite"),
    (lambda v: M.task_arithmetic(A, [B], lam=v), "lam must be finite"),
    (lambda v: M.task_arithmetic(A, [B, C], lam=[1.0, v]), r"lam\[1\] must be finite"),
    (lambda v: M.ties(A, [B, C], lam=v), "ties: lam .* must be finite"),
    (lambda v: M.slerp(A, B, t=v), "slerp: t for .* must be finite"),
])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_coefficients(call, match, value):
  with pytest.raises(M.MergeError, match=match):
    call(value)


@pytest.mark.parametrize("call, match", [
    (lambda: M.linear([A, B], weights=["a", "b"]), r"weights\[0\] must be a number"),
    (lambda: M.linear([A, B], weights=[[1.0], [1.0]]), "one number per model"),
    (lambda: M.ties(A, [B, C], lam=[1.0, 2.0]), "ties: lam .* must be a number"),
    (lambda: M.ties(A, [B, C], density="0.5"), "density must be a number"),
])
def test_non_numeric_coefficients(call, match):
  with pytest.raises(M.MergeError, match=match):
    call()


def test_ties_density_as_a_jax_scalar():
  # the density is a static (hashed) jit argument: a jax scalar was a trace from inside jit
  got = M.ties(A, [B, C], density=jnp.float32(1.0))
  want = M.ties(A, [B, C], density=1.0)
  assert jnp.array_equal(got["w"], want["w"])


@pytest.mark.parametrize("call", [
    lambda: M.linear(A),
    lambda: M.task_arithmetic(A, B),
    lambda: M.ties(A, B),
    lambda: M.greedy_soup(A, lambda t: 0.0),
])
def test_one_tree_instead_of_a_list(call):
  # linear(A) iterated over A's keys and returned the string "w"
  with pytest.raises(M.MergeError, match="must be a list of parameter trees"):
    call()


def test_greedy_soup_nan_score():
  with pytest.raises(M.MergeError, match=r"score_fn\(trees\[0\]\) must be finite"):
    M.greedy_soup([A, B, C], lambda t: math.nan)


@pytest.mark.parametrize("call", [
    lambda: M.dare(A, p=0.5, key=3),
    lambda: M.task_arithmetic(A, [B], dare_p=0.5, key=0),
    lambda: M.ties(A, [B], dare_p=0.5, key=jnp.zeros(3)),
])
def test_dare_key_must_be_a_prng_key(call):
  with pytest.raises(M.MergeError, match="needs a PRNG key"):
    call()


def test_legacy_and_new_keys_both_work():
  for key in (jax.random.key(0), jax.random.PRNGKey(0)):
    M.dare(A, p=0.5, key=key)


@pytest.mark.parametrize("call, who", [
    (lambda bad: M.linear([A, bad]), r"trees\[1\]"),
    (lambda bad: M.greedy_soup([A, bad], lambda t: 0.0), r"trees\[1\]"),
    (lambda bad: M.task_arithmetic(A, [B, bad]), r"models\[1\]"),
    (lambda bad: M.ties(A, [B, bad]), r"models\[1\]"),
    (lambda bad: M.ties(bad, [B, C], density=1.0), "base"),
    (lambda bad: M.slerp(A, bad), "b"),
])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_weights_of_a_model_are_refused(call, who, value):
  # a diverged model: linear / SLERP returned NaN weights, and the TIES trim silently dropped the
  # NaN entries (NaN >= threshold is False), so the merge looked fine
  bad = {"w": C["w"].at[1, 0].set(value), "b": C["b"]}
  with pytest.raises(M.MergeError, match=who + r" has a non-finite .* in 'w'"):
    call(bad)


def _quantized(codes, scale):
  return {"kernel": {"w_q": jnp.asarray(codes, jnp.int8), "scales": jnp.full((1, 2), scale)},
          "step": jnp.array(int(scale), jnp.int32)}


def test_integer_weights_that_differ_are_refused():
  # int8 codes were copied from the first model while the float scales were averaged:
  # a silently wrong model (quantized models must be dequantised before merging)
  a, b = _quantized([[1, 2]], 1.0), _quantized([[3, -4]], 2.0)
  for call in (lambda: M.linear([a, b]), lambda: M.task_arithmetic(a, [b]),
               lambda: M.ties(a, [b]), lambda: M.slerp(a, b)):
    with pytest.raises(M.MergeError, match=r"'kernel/w_q' is int8 .* differs between .*dequantize"):
      call()
  # the same codes (adapters trained on one quantized base) and scalar counters are copied
  out = M.linear([a, _quantized([[1, 2]], 3.0)])
  assert jnp.array_equal(out["kernel"]["w_q"], a["kernel"]["w_q"]) and int(out["step"]) == 1
  assert jnp.allclose(out["kernel"]["scales"], 2.0)


def test_quantized_models_are_refused_naming_the_codes():
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from postrl.models import Transformer  # pylint: disable=import-outside-toplevel
  from postrl.quant import quantize_model  # pylint: disable=import-outside-toplevel
  from tests.conftest import tiny_config  # pylint: disable=import-outside-toplevel
  cfg = tiny_config(vocab_size=37, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                    num_key_value_heads=1)
  s0, s1 = (nnx.split(quantize_model(Transformer(cfg, rngs=nnx.Rngs(i)), "int8"))[1]
            for i in range(2))
  with pytest.raises(M.MergeError, match=r"'layers/0/.*/kernel/w_q' is int8"):
    M.linear([s0, s1])


def test_merging_inside_jit_still_works():
  got = jax.jit(lambda a, b: M.linear([a, b]))(A, B)
  assert jnp.allclose(got["w"], 1.5) and jnp.allclose(got["b"], 0.5)
