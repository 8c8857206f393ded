"""The streaming text layer, property-tested: arbitrary Unicode, stop strings and token splits.

For any text cut into tokens at any byte (inside UTF-8 characters too) and any stop strings:
- nothing printed is ever taken back: the pieces so far are always a prefix of the final text;
- the pieces join to exactly the final text, computed here independently: the decoded text up
  to the first token after which it contains a stop string, cut at that stop's earliest start;
- no piece holds any part of the stop string that ended the stream, and the final text
  contains no stop string;
- text is held back no longer than a stop string could still be completing.
"""

from __future__ import annotations

import codecs
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt_cli.inference.engine import TextStream


class Chunks:
    """A stand-in tokenizer: token i is the i-th byte chunk (all TextStream asks of one)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def decode_single_token_bytes(self, token: int) -> bytes:
        return self.chunks[token]


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)] or [b""]


def _expected(chunks: list[bytes], stops: list[str]) -> tuple[str, bool]:
    """The reference: decode prefix by prefix until a stop string appears."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text = ""
    for i, chunk in enumerate(chunks):
        text += decoder.decode(chunk, final=i == len(chunks) - 1)
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return text[: min(hits)], True
    return text + decoder.decode(b"", final=True), False


# Small alphabets make stop strings and their partial matches common; any character may occur.
alphabet = st.sampled_from("ab\n:é€😀") | st.characters(exclude_categories=["Cs"])  # UTF-8able
texts = st.text(alphabet, max_size=40)
stop_lists = st.lists(st.text(st.sampled_from("ab\n:é€😀"), min_size=1, max_size=4), max_size=3)


@settings(max_examples=400, deadline=None)
@given(text=texts, stops=stop_lists, cuts=st.lists(st.integers(0, 200), max_size=12),
       mangle=st.booleans())
def test_stream_never_takes_back_and_joins_to_the_final_text(
        text: str, stops: list[str], cuts: list[int], mangle: bool) -> None:
    data = text.encode()
    if mangle and data:  # an invalid byte sequence too: decoded as U+FFFD, never held forever
        data = data[:-1] + b"\xff" + data[-1:]
    chunks = _split(data, cuts)
    want, stopped = _expected(chunks, stops)
    stream = TextStream(Chunks(chunks), stops)  # type: ignore[arg-type]
    shown = ""
    decoded = codecs.getincrementaldecoder("utf-8")(errors="replace")
    so_far = ""
    for i, _ in enumerate(chunks):
        final = i == len(chunks) - 1
        piece = stream.feed(i, final=final)
        shown += piece
        assert want.startswith(shown), (shown, want)  # never more than the final text
        so_far += decoded.decode(chunks[i], final=final)
        if not stream.stopped:  # held back at most what a stop string could still become
            longest = max((len(s) - 1 for s in stops), default=0)
            assert len(so_far) - len(shown) <= longest
        if stream.stopped:
            break
    shown += stream.close()
    assert shown == want
    assert stream.stopped == stopped
    assert not any(s in shown for s in stops)
