"""Trainers: one small module per method, all on the shared step skeleton in ``step.py``."""

from postrl.trainers.step import (OptimizerConfig, TrainState, init_train_state, learning_rate_schedule,
                                  loss_and_grads, make_optimizer, make_train_step, train_step)
