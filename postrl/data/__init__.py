"""Record formats, array_record files, grain pipelines and built-in synthetic tasks.

``tfds_jsonl`` (TFDS builders for local JSONL) is imported on its own, so that importing
``postrl.data`` never imports tensorflow_datasets.
"""

from postrl.data.pipeline import (batch_examples, sft_batches, sft_dataset, sft_length_stats,
                                  tokenize_sft)
from postrl.data.records import (SCHEMAS, ArrayRecordRecords, DataError, Message,
                                 PreferenceRecord, Problem, RankingRecord, SFTRecord,
                                 parse_record, read_jsonl, write_array_record, write_jsonl)
from postrl.data.tasks import (CountdownProblem, arithmetic_problems, countdown_problems,
                               sft_record, sft_records)

# ``postrl.data.verifier`` (sampling the model to build preference data) imports JAX and the
# sampler, so it is imported on its own: ``from postrl.data.verifier import sample_and_score``.
