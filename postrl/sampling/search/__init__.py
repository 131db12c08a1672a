"""Test-time scaling: decoding searches over the jitted sampler (``postrl.sampling.generate``).

    policy = Policy(model, tokenizer, max_new_tokens=64, temperature=0.8, batch_size=16)
    verifier = verifier_scorer(postrl.data.preference.verifier_reward("arithmetic"))
    results = self_consistency(policy, problems, n=16, key=key)
    results = best_of_n(policy, problems, n=16, scorer=verifier, key=key)  # or RewardModelOutcome
    results = beam_search(policy, problems, width=4)
    results = step_beam_search(policy, problems, value_fn=ProcessRewardScorer(prm_dir), key=key)
    results = mcts(policy, problems, value_fn=RolloutValue(policy, reward_fn, key=key), key=key)
    choice = compute_optimal({"sc": lambda ps, n: self_consistency(policy, ps, n=n, key=key)},
                             calibration, ns=[1, 4, 16], budget=2000)

Every strategy returns one ``SearchResult`` per problem: the chosen text and answer, every
candidate with its score, and the tokens spent (``TokenCount``: policy prompt + generated, and
reward-model tokens; see ``common``).
"""

from postrl.sampling.search.beam import BeamOutput, beam_search, beam_search_ids, length_penalty
from postrl.sampling.search.common import (Candidate, Completion, PartialSolution, Scores,
                                           SearchError, SearchResult, TokenCount, cluster_answers,
                                           vote)
from postrl.sampling.search.compute_optimal import (CalibrationPoint, ComputeOptimalChoice,
                                                    calibrate, choose_compute_optimal,
                                                    compute_optimal)
from postrl.sampling.search.mcts import mcts
from postrl.sampling.search.policy import Policy
from postrl.sampling.search.sampled import (best_of_n, greedy, select, self_consistency,
                                            subsample)
from postrl.sampling.search.scorers import (ProcessRewardScorer, RewardModelOutcome, RolloutValue,
                                            check_tokenizers, verifier_scorer)
from postrl.sampling.search.steps import step_beam_search
