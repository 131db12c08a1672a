"""Verifiable rewards: answer extraction and checking, format rewards, and their composition."""

from postrl.rewards.compose import REWARDS, combine_rewards, overlong_reward
from postrl.rewards.countdown import (countdown_reward, evaluate_countdown_expression,
                                      extract_countdown_answer)
from postrl.rewards.format import boxed_format_reward, length_penalty, tag_format_reward
from postrl.rewards.math import (answers_equal, exact_match, extract_answer, extract_answer_tag,
                                 extract_boxed, extract_last_number, extract_regex, math_reward)
from postrl.rewards.reward_model import RewardModelScorer, make_reward_model_reward
