"""Verifiable rewards: answer extraction and checking."""

from postrl.rewards.countdown import (countdown_reward, evaluate_countdown_expression,
                                      extract_countdown_answer)
from postrl.rewards.math import exact_match, extract_last_number
