"""A piece of text per generated token: what a stream sends adds up to the whole text, characters split
over tokens wait for their last byte, and each token decodes a few tokens, not the whole sequence."""

from __future__ import annotations

import doctest
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from dsnb.runtime.server import detokenize  # noqa: E402
from dsnb.runtime.server.detokenize import INCOMPLETE, TextStream  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "serving_code"))
from tiny_llama import minilm_dir  # noqa: E402

TEXT = "Héllo, wörld! Isn't naïve café 🙂 served in 日本語 — quickly?"


def test_the_docstring_example_holds() -> None:
    result = doctest.testmod(detokenize)
    assert result.attempted > 0 and result.failed == 0


@pytest.fixture(scope="module")
def byte_level() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2's kind), trained here on a few lines so that the accented letters, the
    emoji and the CJK characters stay split over several byte tokens."""
    model = tokenizers.Tokenizer(tokenizers.models.BPE())
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    model.train_from_iterator(["Hello world, this is served quickly."] * 20, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=model)


def stream(tokenizer: object, tokens: list[int]) -> tuple[list[str], str]:
    text = TextStream(tokenizer)
    pieces = [text.add(token) for token in tokens]
    return pieces, text.flush()


def test_byte_level_pieces_hold_back_split_characters_and_add_up_to_the_text(byte_level) -> None:
    tokens = byte_level(TEXT)["input_ids"]
    pieces, rest = stream(byte_level, tokens)
    assert len(byte_level("🙂")["input_ids"]) == 4  # the emoji is four byte tokens
    assert "".join(pieces) + rest == byte_level.decode(tokens) == TEXT
    assert not any(INCOMPLETE in piece for piece in pieces)
    assert pieces.count("") >= TEXT.count("🙂") * 3  # the emoji's first three bytes waited for its fourth


def test_a_sequence_cut_inside_a_character_ends_with_what_decode_gives(byte_level) -> None:
    tokens = byte_level("café 🙂")["input_ids"][:-1]  # the emoji's last byte never comes
    pieces, rest = stream(byte_level, tokens)
    assert "".join(pieces) == "café " and rest.endswith(INCOMPLETE)
    assert "".join(pieces) + rest == byte_level.decode(tokens)


def test_wordpiece_streams_a_piece_per_token_that_adds_up_to_the_text() -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    tokens = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    pieces, rest = stream(tokenizer, tokens)
    assert "".join(pieces) + rest == tokenizer.decode(tokens, skip_special_tokens=True)
    special = set(tokenizer.all_special_ids)  # the emoji is [UNK], whose text decode skips
    assert rest == "" and all(bool(piece) == (token not in special) for piece, token in zip(pieces, tokens))
    assert pieces[:4] == ["hello", ",", " world", "!"]  # each token's text comes with it, not a word later


def test_each_token_decodes_a_few_tokens_however_long_the_sequence() -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    widest: list[int] = []

    class Counting:
        def decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
            widest.append(len(tokens))
            return tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    tokens = tokenizer(" ".join([TEXT] * 60), add_special_tokens=False)["input_ids"]
    pieces, rest = stream(Counting(), tokens)
    assert len(tokens) > 1000 and max(widest) <= 3  # the token before, and the [UNK] that had no text of its own
    assert "".join(pieces) + rest == tokenizer.decode(tokens, skip_special_tokens=True)
