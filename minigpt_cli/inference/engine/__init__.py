"""The slots, scheduler and step loop that `minigpt generate` and `minigpt serve` both drive.

Shaped after nano-vllm's engine/: `sequence` (one request), `scheduler` (waiting queue and
slots), `runner` (prefill and decode over the KV cache), `engine` (the step loop).
"""

from minigpt_cli.inference.engine.engine import Engine
from minigpt_cli.inference.engine.runner import ModelRunner
from minigpt_cli.inference.engine.scheduler import QueueFull, Scheduler
from minigpt_cli.inference.engine.sequence import Sequence, Status, TokenEvent
from minigpt_cli.inference.engine.text import TextStream

__all__ = ["Engine", "ModelRunner", "QueueFull", "Scheduler", "Sequence", "Status",
           "TextStream", "TokenEvent"]
