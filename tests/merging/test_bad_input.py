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
