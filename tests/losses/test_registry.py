"""The public surface of postrl.losses: registry, metadata table, docstrings, DESIGN names."""

import inspect
import re

import pytest

import postrl.losses as L


def test_design_names_are_exported():
  for name in ["cross_entropy", "bradley_terry", "plackett_luce", "process_reward", "dpo",
               "listwise_dpo", "kto", "orpo", "simpo", "ppo_clip", "value_loss", "gae",
               "group_advantages", "rloo_advantages", "grpo", "kl_penalty", "distill",
               "aggregate", "LOSSES"]:
    assert hasattr(L, name), name
  assert set(L.__all__) <= set(dir(L))


def test_every_loss_has_metadata_with_known_values():
  allowed = {"reward": {"explicit", "implicit", "verifiable", "none"},
             "reference": {"reference-free", "needs reference", "needs teacher"},
             "policy": {"on-policy", "off-policy", "either"},
             "level": {"token", "sequence"},
             "data": {"paired", "unpaired", "listwise", "pointwise", "group"}}
  assert set(L.METADATA) == set(L.LOSSES)
  for name, row in L.METADATA.items():
    assert set(row) == set(allowed), name
    for column, value in row.items():
      assert value in allowed[column], (name, column, value)


@pytest.mark.parametrize("name", sorted(set(L.LOSSES) | set(L.ADVANTAGES) | {"kl_penalty",
                                                                               "aggregate"}))
def test_docstring_gives_formula_source_and_keyword_only_hyperparameters(name):
  fn = L.LOSSES.get(name) or L.ADVANTAGES.get(name) or getattr(L, name)
  doc = inspect.getdoc(fn)
  assert doc and len(doc) > 80, name
  assert re.search(r"(19|20)\d\d", doc), f"{name}: docstring cites no paper year"
  params = inspect.signature(fn).parameters.values()
  for p in params:  # hyper-parameters are keyword-only: positional ones are arrays
    if p.kind is p.POSITIONAL_OR_KEYWORD:
      assert p.default is inspect.Parameter.empty or p.default is None, (name, p.name)


def test_dpo_variants_registry():
  assert {"sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
          "aot", "aot_pair", "apo_zero", "apo_down", "discopop"} <= set(L.DPO_VARIANTS)
