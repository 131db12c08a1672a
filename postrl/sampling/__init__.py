"""Generation and decoding search."""

from postrl.sampling.continuous import ContinuousOutput, generate_continuous
from postrl.sampling.generate import (GenerateOutput, generate, generate_text, pad_prompts,
                                      process_logits, sample_token)
from postrl.sampling.search import (BeamOutput, CalibrationPoint, Candidate,
                                    ComputeOptimalChoice, Completion, PartialSolution, Policy,
                                    ProcessRewardScorer, RewardModelOutcome, RolloutValue, Scores,
                                    SearchError, SearchResult, TokenCount, beam_search,
                                    beam_search_ids, best_of_n, calibrate, check_tokenizers,
                                    choose_compute_optimal, compute_optimal, greedy, mcts,
                                    self_consistency, step_beam_search, subsample,
                                    verifier_scorer)
