"""The text of a sequence that grows a token at a time, as a piece per token.

Decoding all of a sequence's tokens again at each step costs time in proportion to its length,
and a stream cut at word boundaries makes the client wait a word for its first text. Here each
new token is decoded together with the tokens since the last piece (its context), and the piece
is what the new token adds to the context's text, the way vLLM's incremental detokenizer works.
A piece that ends in an incomplete character (U+FFFD: a byte-level token that needs the next
one) is held back until the next token completes it, or the sequence ends.

Example:
    >>> class Words:                                 # a stand-in tokenizer: token i is word i
    ...     words = ["deep", "speed", "serves"]
    ...     def decode(self, tokens, skip_special_tokens=True): return " ".join(self.words[t] for t in tokens)
    >>> text = TextStream(Words())
    >>> [text.add(token) for token in (0, 1, 2)], text.text
    (['deep', ' speed', ' serves'], 'deep speed serves')
"""

from __future__ import annotations

from typing import Any

INCOMPLETE = "\ufffd"


class TextStream:
    """One sequence's text, built a piece per token (see the module docstring).

    Args:
        tokenizer: anything with ``decode(tokens, skip_special_tokens=True)`` (a transformers tokenizer).

    Attributes:
        text: the pieces so far, joined.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""
        self._context = 0  # the first token decoded with the new ones
        self._unsent = 0  # the first token whose text is not in ``text`` yet

    def add(self, token: int) -> str:
        """Take the next token; the text it completes ("" while it is held back)."""
        self.tokens.append(token)
        return self._piece(final=False)

    def flush(self) -> str:
        """The text held back at the end of the sequence (it may end in U+FFFD), or ""."""
        return self._piece(final=True) if self._unsent < len(self.tokens) else ""

    def _piece(self, final: bool) -> str:
        known = self._decode(self.tokens[self._context:self._unsent])
        window = self._decode(self.tokens[self._context:])
        if len(window) <= len(known) or (window.endswith(INCOMPLETE) and not final):
            return ""
        piece = window[len(known):]
        self._context, self._unsent = self._unsent, len(self.tokens)
        self.text += piece
        return piece

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True) if tokens else ""
