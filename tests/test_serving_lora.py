"""LoRA adapters on a served language model: chosen by the request's ``model``, mixed in one running batch."""

from __future__ import annotations

import concurrent.futures
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from dsnb.runtime.server import lora  # noqa: E402
from dsnb.runtime.server.engine import Collective, Engine, Work  # noqa: E402
from dsnb.runtime.server.model import BadRequest, Generation, Predictor  # noqa: E402
from dsnb.runtime.server.scheduler import Scheduler  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "serving_code"))
sys.path.insert(0, str(Path(__file__).parent))
from serving_servers import start_server  # noqa: E402
from tiny_llama import save_lora_adapter, save_tiny_llama  # noqa: E402

PROMPTS = ["deep speed serving", "adapters on a base model", "one more prompt to complete"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("lora")
    base = save_tiny_llama(root / "base")
    return {"base": base, "sql": save_lora_adapter(base, root / "sql", seed=1),
            "poet": save_lora_adapter(base, root / "poet", seed=2)}


def alone(models: dict[str, str], adapter: str | None, prompt: str, steps: int) -> str:
    """Greedy text of ``prompt`` with ``adapter`` (None: the base model), by PEFT and transformers' ``generate``."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(models["base"])
    model = transformers.AutoModelForCausalLM.from_pretrained(models["base"]).eval()
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, models[adapter]).eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                                do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)


def test_requests_of_different_adapters_share_a_batch_and_each_gets_its_adapters_text(models) -> None:
    predictor = Predictor(models["base"], deepspeed=False)
    for name in ("sql", "poet"):
        predictor.lora({"action": "load", "name": name, "path": models[name]})
    scheduler = Scheduler(predictor.tokenizer, predictor.prompt_limit)
    engine = Engine(predictor, Collective(1), scheduler=scheduler)
    engine.start()
    try:
        asked = [(adapter, prompt) for adapter in (None, "sql", "poet") for prompt in PROMPTS]
        answers = []
        for adapter, prompt in asked:
            future: concurrent.futures.Future = concurrent.futures.Future()
            engine.submit(Work("generate", Generation(prompt=prompt, max_tokens=8, temperature=0, adapter=adapter), size=1,
                               deliver=lambda r, e, f=future: f.set_exception(e) if e else f.set_result(r)))
            answers.append(future)
        got = [future.result(timeout=60).text for future in answers]
    finally:
        engine.stop()
    expected = [alone(models, adapter, prompt, 8) for adapter, prompt in asked]
    assert got == expected
    assert len({got[0], got[3], got[6]}) == 3  # the adapters do change the answer


def test_adapters_are_refused_with_the_reason(models, tmp_path: Path) -> None:
    predictor = Predictor(models["base"], deepspeed=False, max_adapters=1)
    predictor.lora({"action": "load", "name": "sql", "path": models["sql"]})
    with pytest.raises(lora.AdapterRefused, match=r"1 adapters are loaded \(--max-loras 1\)"):
        predictor.lora({"action": "load", "name": "poet", "path": models["poet"]})
    with pytest.raises(lora.AdapterRefused, match="'sql' is loaded already"):
        predictor.lora({"action": "load", "name": "sql", "path": models["sql"]})
    with pytest.raises(lora.AdapterRefused, match="is generating for a request now"):
        predictor.lora({"action": "unload", "name": "sql", "in_use": True})
    assert predictor.lora({"action": "unload", "name": "sql"}) == []
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text("{}")
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(BadRequest, match="has no adapter_model.safetensors"):
        lora.check_directory(str(pickled))
    with pytest.raises(BadRequest, match="is not a directory with adapter_config.json"):
        lora.check_directory(str(tmp_path))
    with pytest.raises(BadRequest, match='"lora_name" must be 1 to 64'):
        lora.check_name("../etc", served="m")
    split = Predictor.__new__(Predictor)
    split.adapters, split.tensor_parallel = predictor.adapters, 2
    with pytest.raises(lora.AdapterRefused, match="split over 2 ranks and takes no LoRA adapter"):
        split.lora({"action": "load", "name": "poet", "path": models["poet"]})


def test_the_openai_client_names_an_adapter_as_its_model_and_adapters_load_through_the_api(models, tmp_path: Path) -> None:
    server = start_server(tmp_path, models["base"], args=["--lora", f"sql={models['sql']}", "--allow-lora-loading"])
    try:
        client = openai.OpenAI(base_url=server.url + "v1", api_key="unused")
        assert [m.id for m in client.models.list().data] == ["m", "sql"]
        answer = client.completions.create(model="sql", prompt=PROMPTS[0], max_tokens=8, temperature=0)
        assert answer.model == "sql" and answer.choices[0].text == alone(models, "sql", PROMPTS[0], 8)
        assert client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=8,
                                         temperature=0).choices[0].text == alone(models, None, PROMPTS[0], 8)
        with pytest.raises(openai.NotFoundError, match="`poet` does not exist; this server serves `m`, `sql`"):
            client.completions.create(model="poet", prompt="x", max_tokens=2)

        status, _, body = server.request("POST", "/v1/load_lora_adapter", {"lora_name": "poet", "lora_path": models["poet"]})
        assert status == 200 and body["adapters"] == ["sql", "poet"]
        chat = client.chat.completions.create(model="poet", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                              temperature=0)
        assert chat.model == "poet" and chat.usage.completion_tokens == 4
        status, _, body = server.request("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path)})
        assert status == 400 and "adapter_config.json" in body["error"]["message"]
        status, _, body = server.request("POST", "/v1/unload_lora_adapter", {"lora_name": "poet"})
        assert status == 200 and body["adapters"] == ["sql"]
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="poet", prompt="x", max_tokens=2)
    finally:
        server.stop()


def test_a_server_that_does_not_allow_loading_says_which_option_does(models, tmp_path: Path) -> None:
    server = start_server(tmp_path, models["base"])
    try:
        status, _, body = server.request("POST", "/v1/load_lora_adapter", {"lora_name": "poet", "lora_path": models["poet"]})
        assert status == 403 and "--allow-lora-loading" in body["error"]["message"]
        assert [model["id"] for model in server.request("GET", "/v1/models")[2]["data"]] == ["m"]
    finally:
        server.stop()
