"""Token bytes in, printable text out, for streams that must never take back what they sent.

A token may end inside a UTF-8 character, and the text so far may be the start of a stop
string; both are held back until the next token settles them. `minigpt generate` prints with
it and the server streams with it, so the two follow the same rules.
"""

from __future__ import annotations

import codecs

import tiktoken


class TextStream:
    """Token bytes in, printable text out: holds back bytes that end inside a UTF-8 character,
    and text that may be the start of a stop string, so nothing printed is ever taken back."""

    def __init__(self, enc: tiktoken.Encoding, stops: list[str]) -> None:
        self.enc = enc
        self.stops = [s for s in stops if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything decoded so far
        self.emitted = 0  # characters already handed out
        self.stopped = False

    def feed(self, token: int, final: bool = False) -> str:
        """Decode one more token; returns the newly printable text."""
        if self.stopped:
            return ""
        self.text += self.decoder.decode(self.enc.decode_single_token_bytes(token), final=final)
        return self._release(final)

    def close(self) -> str:
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)
        return self._release(True)

    def _release(self, final: bool) -> str:
        # Cut at the earliest start of any stop string present: with stops ':' and 'x:', the
        # text 'x:' ends at '', not at 'x', which is part of a stop string.
        hits = [at for s in self.stops if (at := self.text.find(s)) != -1]
        if hits:
            self.text, self.stopped, final = self.text[:min(hits)], True, True
        hold = 0
        if not final:  # the longest tail of the text that could still grow into a stop string
            for s in self.stops:
                for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:n]):
                        hold = max(hold, n)
                        break
        end = max(self.emitted, len(self.text) - hold)
        out, self.emitted = self.text[self.emitted:end], end
        return out
