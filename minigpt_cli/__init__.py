"""minigpt: train small GPT language models on your own text, then run them.

The same model code serves training (one teacher-forced pass over every position)
and inference (prefill once, then one token per step through a KV cache).
"""

__version__ = "0.1.0"
