"""Model merging in weight space: soups, task arithmetic, TIES, DARE, SLERP (see ``merge``)."""

from postrl.merging.merge import (MergeError, dare, greedy_soup, linear, path_str, slerp,
                                  slerp_tensor, soup, task_arithmetic, task_vectors, ties,
                                  ties_merge_deltas, trim_top_k)
