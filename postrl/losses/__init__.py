"""Every post-training objective as a pure function of arrays.

Each loss takes arrays positionally and hyper-parameters by keyword, and returns
``(loss, metrics)``: a float32 scalar and a flat dict of scalars (``"rewards/margin"``,
``"pg/clipfrac"``). Token-level losses also have a ``*_per_token`` form, and reduce with
``aggregate``. Nothing here touches a model: per-token log-probs come from
``postrl.logprobs.token_logps``; sequence log-probs are their masked sums.

Where a loss lives:

  _supervised.py   cross_entropy
  _reward.py       bradley_terry, bradley_terry_rankings, plackett_luce, process_reward
  _preference.py   dpo (13 variants), listwise_dpo, kto, orpo, simpo, cpo
  _policy.py       ppo_clip, value_loss, gae, group_advantages, rloo_advantages, grpo (5 variants)
  _distill.py      distill (6 divergences), distill_topk
  _common.py       aggregate, kl_penalty

``LOSSES`` maps names to functions; ``METADATA`` classifies each as the surveys' method tables do.
Formulas and sources: docs/losses.md and each function's docstring.
"""

from postrl.losses._common import AGGREGATIONS, KL_ESTIMATORS, aggregate, kl_penalty
from postrl.losses._distill import distill, distill_per_token, distill_topk, distill_topk_per_token
from postrl.losses._policy import (gae, group_advantages, group_step_advantages, grpo,
                                   grpo_per_token, ppo_clip, ppo_clip_per_token,
                                   reinforce_pp_advantages, rloo_advantages, value_loss,
                                   value_loss_per_token)
from postrl.losses._preference import DPO_VARIANTS, cpo, dpo, kto, listwise_dpo, orpo, simpo
from postrl.losses._reward import (bradley_terry, bradley_terry_rankings, plackett_luce,
                                   process_reward, process_reward_per_step)
from postrl.losses._supervised import cross_entropy, cross_entropy_per_token

# name -> function returning (loss, metrics)
LOSSES = {
    "cross_entropy": cross_entropy,
    "bradley_terry": bradley_terry,
    "bradley_terry_rankings": bradley_terry_rankings,
    "plackett_luce": plackett_luce,
    "process_reward": process_reward,
    "dpo": dpo,
    "listwise_dpo": listwise_dpo,
    "kto": kto,
    "orpo": orpo,
    "simpo": simpo,
    "cpo": cpo,
    "ppo_clip": ppo_clip,
    "value_loss": value_loss,
    "grpo": grpo,
    "distill": distill,
    "distill_topk": distill_topk,
}

# Functions that are not losses but belong to the library: advantages and estimators.
ADVANTAGES = {
    "gae": gae,
    "group": group_advantages,
    "group_step": group_step_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_advantages,
}

_COLUMNS = ("reward", "reference", "policy", "level", "data")
# name -> (reward, reference, policy, level, data), as in the surveys' method tables:
#   reward: explicit (a learned scorer), implicit (log-ratio to a reference), verifiable, none
#   policy: on-policy (samples from the current model), off-policy (fixed data), either
METADATA = {name: dict(zip(_COLUMNS, row)) for name, row in {
    "cross_entropy": ("none", "reference-free", "off-policy", "token", "pointwise"),
    "bradley_terry": ("explicit", "reference-free", "off-policy", "sequence", "paired"),
    "bradley_terry_rankings": ("explicit", "reference-free", "off-policy", "sequence", "listwise"),
    "plackett_luce": ("explicit", "reference-free", "off-policy", "sequence", "listwise"),
    "process_reward": ("explicit", "reference-free", "off-policy", "token", "pointwise"),
    "dpo": ("implicit", "needs reference", "off-policy", "sequence", "paired"),
    "listwise_dpo": ("implicit", "needs reference", "off-policy", "sequence", "listwise"),
    "kto": ("implicit", "needs reference", "off-policy", "sequence", "unpaired"),
    "orpo": ("implicit", "reference-free", "off-policy", "sequence", "paired"),
    "simpo": ("implicit", "reference-free", "off-policy", "sequence", "paired"),
    "cpo": ("implicit", "reference-free", "off-policy", "sequence", "paired"),
    "ppo_clip": ("explicit", "reference-free", "on-policy", "token", "pointwise"),
    "value_loss": ("explicit", "reference-free", "on-policy", "token", "pointwise"),
    "grpo": ("verifiable", "needs reference", "on-policy", "token", "group"),
    "distill": ("none", "needs teacher", "either", "token", "pointwise"),
    "distill_topk": ("none", "needs teacher", "either", "token", "pointwise"),
}.items()}

__all__ = sorted(
    ["LOSSES", "METADATA", "ADVANTAGES", "AGGREGATIONS", "KL_ESTIMATORS", "DPO_VARIANTS",
     "aggregate", "kl_penalty", "distill_per_token", "distill_topk_per_token",
     "ppo_clip_per_token", "value_loss_per_token", "grpo_per_token", "process_reward_per_step",
     "cross_entropy_per_token", *LOSSES, "gae", "group_advantages", "group_step_advantages",
     "rloo_advantages", "reinforce_pp_advantages"])
