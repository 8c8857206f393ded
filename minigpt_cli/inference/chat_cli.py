"""`minigpt chat`: a conversation with a run in the terminal, or through a pipe.

Each line typed (or read from stdin) is a user turn; the answer streams as it is generated. The
whole conversation is the prompt of every turn, rendered through the run's chat template (a run
fine-tuned on chat, or an import that brought one) or, for a base run, as the plain-text script
the server also uses. When it leaves an answer less than a quarter of the context window (or
--max-new-tokens, if smaller) the oldest turns go first; a system message (`--system`) always
stays. An answer may use whatever room is left, up to --max-new-tokens.

On a terminal there is a `you>` prompt and the answer is bold; piped, each answer is one block
of plain text followed by a blank line, so a script can read them back in order.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from rich.console import Console

from minigpt_cli.errors import UserError
from minigpt_cli.inference.engine import Engine, Sequence, TokenEvent
from minigpt_cli.inference.loading import chat_template, load_for_inference
from minigpt_cli.inference.sampling import SamplerSettings
from minigpt_cli.inference.serve import chat as script
from minigpt_cli.tokenizer import chat


@dataclass
class Conversation:
    """The turns so far, and how to render them for a run with or without a template."""

    enc: object
    template: chat.ChatTemplate | None
    block_size: int
    system: str = ""
    turns: list[dict[str, str]] = field(default_factory=list)

    def messages(self, start: int = 0) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns[start:]

    def ids(self, start: int = 0) -> list[int]:
        messages = self.messages(start)
        if self.template is not None:
            return chat.prompt_ids(self.enc, self.template, messages)
        text = script.render((m["role"], m["content"]) for m in messages)
        return list(self.enc.encode(text, allowed_special="all"))  # type: ignore[attr-defined]

    def prompt(self, room: int) -> list[int]:
        """The ids of the conversation's latest turns that leave `room` tokens to answer in,
        dropping the oldest turns first (a user turn with the answer that followed it)."""
        start = 0
        while True:
            ids = self.ids(start)
            if len(ids) + room <= self.block_size:
                return ids
            if start >= len(self.turns) - 1:
                raise UserError(f"this message and the system text take {len(ids)} tokens; "
                                f"with {room} to answer in they do not fit the run's context "
                                f"of {self.block_size}: shorten it or lower --max-new-tokens")
            start += 2 if self.turns[start]["role"] == "user" else 1

    def stops(self) -> tuple[list[str], frozenset[int]]:
        if self.template is None:
            return list(script.STOPS), frozenset()
        return [], chat.stop_ids(self.enc, self.template)


def _lines(console: Console, interactive: bool) -> Iterator[str]:
    while True:
        try:
            line = console.input("[bold cyan]you>[/] ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and line == "":
            return
        if line.strip():
            yield line.strip()


def run_chat(checkpoint: str | None, system: str, max_new_tokens: int,
             settings: SamplerSettings, seed: int | None, device: str, dtype: str,
             engine: str) -> None:
    """Talk to a run until end of input (Ctrl-D, or the end of the piped text)."""
    settings.validate()
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    model, enc, meta, path = load_for_inference(checkpoint, device, dtype)
    block = model.config.block_size
    # The room an answer is sure of: old turns go to keep it; an answer may use whatever more
    # the context has left, up to --max-new-tokens.
    room = min(max_new_tokens, max(1, block // 4))
    talk = Conversation(enc, chat_template(meta), block, system)
    stops, stop_ids = talk.stops()
    eng = Engine(model, enc, 1, engine=engine)  # type: ignore[arg-type]
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    err = Console(stderr=True)
    if interactive:
        how = "its chat template" if talk.template else "the plain-text script (a base run)"
        err.print(f"[dim]chatting with {path.parent} through {how}; Ctrl-D ends[/]")
    for n, line in enumerate(_lines(err, interactive)):
        talk.turns.append({"role": "user", "content": line})
        try:
            ids = talk.prompt(room)
        except UserError as e:
            talk.turns.pop()
            if not interactive:
                raise
            err.print(f"[red]{e}[/]")
            continue
        seq = Sequence(prompt=ids, settings=settings,
                       max_tokens=min(max_new_tokens, block - len(ids)), stops=stops,
                       stop_ids=stop_ids, seed=None if seed is None else seed + n,
                       on_event=_printer(interactive))
        eng.run([seq])
        if seq.error:
            raise UserError(f"generation failed: {seq.error}")
        sys.stdout.write("\n" if interactive else "\n\n")
        sys.stdout.flush()
        talk.turns.append({"role": "assistant", "content": seq.text.strip()})


def _printer(interactive: bool) -> Callable[[Sequence, TokenEvent], None]:
    """Each token's text as it comes: bold on a terminal, plain through a pipe."""
    def show(seq: Sequence, event: TokenEvent) -> None:
        if event.text:
            sys.stdout.write(f"\x1b[1m{event.text}\x1b[0m" if interactive else event.text)
            sys.stdout.flush()
    return show
