"""Generation and decoding search."""

from postrl.sampling.generate import (GenerateOutput, generate, generate_text, pad_prompts,
                                      process_logits, sample_token)
