"""The model runner every serving backend uses: loader and Hugging Face models, behind deepspeed.init_inference."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")

from dsnb.runtime.server.model import BadRequest, Predictor  # noqa: E402

SERVING_CODE = str(Path(__file__).parent / "serving_code")


def test_a_loader_model_answers_like_the_plain_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    wrapped = Predictor("tiny_models:tiny_mlp", working_dir=SERVING_CODE)
    plain = Predictor("tiny_models:tiny_mlp", working_dir=SERVING_CODE, deepspeed=False)
    assert type(wrapped.model).__name__ == "InferenceEngine"
    inputs = [[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0]]
    assert wrapped.predict({"inputs": inputs}) == plain.predict({"inputs": inputs})
    for bad, reason in [({}, '"inputs"'), ({"inputs": []}, "non-empty"), ({"inputs": [[1, 2], [3]]}, "rectangular"),
                        ({"inputs": [["a"]]}, "numbers")]:
        with pytest.raises(BadRequest, match=reason):
            wrapped.predict(bad)
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        Predictor("tiny_models:not_a_model", working_dir=SERVING_CODE)
    sys.modules.pop("tiny_models", None)


def test_a_hugging_face_directory_gives_mean_pooled_embeddings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "deep", "speed"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    predictor = Predictor(str(tmp_path))
    texts = ["hello world", "deep speed hello"]
    embeddings = predictor.predict({"inputs": texts})["outputs"]
    model = transformers.BertModel.from_pretrained(tmp_path).eval()
    with torch.inference_mode():
        for text, embedding in zip(texts, embeddings):
            encoded = tokenizer(text, return_tensors="pt")
            expected = model(**encoded).last_hidden_state.mean(dim=1)[0]
            assert torch.allclose(torch.tensor(embedding), expected, atol=1e-5)  # padding does not change it
    assert len(predictor.predict({"inputs": "hello"})["outputs"]) == 16
    with pytest.raises(BadRequest, match="string"):
        predictor.predict({"inputs": [1, 2]})
