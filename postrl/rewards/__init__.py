"""Verifiable rewards: answer extraction and checking."""

from postrl.rewards.math import exact_match, extract_last_number
