"""Load a served model, wrap it with ``deepspeed.init_inference``, and answer one request.

The request and answer are JSON: ``{"inputs": ...}`` in, ``{"outputs": ...}`` out.

- A loader model (``"module:function"``) takes ``inputs`` as a nested list of numbers (a
  batch); integers become a ``long`` tensor (token ids), other numbers the model's dtype.
  The answer is the model's output tensor as nested lists (a tuple or dict of tensors
  becomes a list or dict of them).
- A Hugging Face directory takes ``inputs`` as a string or a list of strings. A sequence
  classifier (its ``config.json`` names a ``...ForSequenceClassification`` architecture)
  answers its logits; a causal language model (``...ForCausalLM``) a completion of each
  text; any other model the mean of its last hidden states over the real tokens (a
  sentence embedding, as sentence-transformers pools).

With ``tensor_parallel`` above 1 (the server's world size), ``deepspeed.init_inference``
splits the model's layers over the ranks (AutoTP); every rank then runs each batch.

Example:
    >>> predictor = Predictor("tests.serving_models:tiny_mlp")          # doctest: +SKIP
    >>> predictor.predict({"inputs": [[0.0, 1.0, 2.0, 3.0]]})           # doctest: +SKIP
    {'outputs': [[0.12, -0.4]]}
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from dsnb.runtime.server.choices import Choice, sequence_choices
from dsnb.runtime.server.kv_batch import RunningBatch, Step

#: Inputs above this many numbers (or characters of text) are refused rather than run.
MAX_INPUT_ITEMS = 1_000_000
#: Texts (or tensor rows) one request may hold by default (``--max-inputs``).
MAX_INPUTS = 1024
#: LoRA adapters a server holds at once by default (``--max-loras``; :mod:`dsnb.runtime.server.lora`).
MAX_ADAPTERS = 8
#: Prompt tokens a server takes when the model says nothing of its context (``--max-prompt-tokens``).
DEFAULT_PROMPT_TOKENS = 8192


class BadRequest(ValueError):
    """The request cannot be answered as sent (a 4xx for HTTP servers); the message says why."""


@dataclass
class Generation:
    """What to generate for one prompt (the OpenAI sampling options dsnb honours).

    Example:
        >>> Generation(prompt="Once upon a time", max_tokens=8).do_sample
        True
    """

    prompt: str
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = 1
    logprobs: int | None = None  # alternatives to report per token (0: the token's own only); None: none
    adapter: str | None = None  # the LoRA adapter to generate with (dsnb.runtime.server.lora); None: the base model

    @property
    def do_sample(self) -> bool:
        """Sample (temperature above 0) or take the most likely token (greedy)."""
        return self.temperature > 0


class Embedded(NamedTuple):
    """One text's embedding (or a classifier's logits) as a float32 array, and the tokens the model read of it."""

    vector: Any  # numpy.ndarray
    tokens: int


@dataclass
class Completion:
    """A generated text and its token counts; with ``n`` > 1 or log-probabilities, every sequence in ``choices``
    (``text`` and ``finish_reason`` are the first's, ``completion_tokens`` counts them all, as OpenAI's usage does)."""

    text: str
    finish_reason: str  # "stop" (end of text or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    choices: list[Choice] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # time.monotonic() of each generated step, on this rank


def load_module(model: str, working_dir: str | None = None) -> Any:
    """The ``torch.nn.Module`` a loader returns: ``"package.module:function"``, imported from ``working_dir``.

    Raises:
        ImportError: the module cannot be imported.
        TypeError: the loader returned something that is not a ``torch.nn.Module``.
    """
    import torch

    module_name, _, function_name = model.partition(":")
    if working_dir and working_dir not in sys.path:
        sys.path.insert(0, working_dir)
    loader = getattr(importlib.import_module(module_name), function_name)
    loaded = loader()
    if not isinstance(loaded, torch.nn.Module):
        raise TypeError(f"{model} returned {type(loaded).__name__}, not a torch.nn.Module")
    return loaded


class Predictor:
    """One replica's model: loaded once, wrapped by DeepSpeed, called per request.

    Args:
        model: ``"module:function"`` or a Hugging Face model directory.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        working_dir: where a loader's module is imported from (default: the current directory).
        deepspeed: wrap with ``deepspeed.init_inference`` (False gives the plain model, for comparisons).
        tensor_parallel: ranks to split the model over (needs ``torch.distributed`` set up
            with that many ranks, and on CPU ``LOCAL_SIZE`` equal to the ranks per node).
        max_inputs: texts or tensor rows one request may hold.
        max_prompt_tokens: prompt tokens a generation takes at most (also bounded by the model's
            context, less the tokens asked for).
        max_adapters: LoRA adapters held at once at most (:mod:`dsnb.runtime.server.lora`).

    Attributes:
        kind: ``"loader"``, ``"embedding"``, ``"classifier"`` or ``"causal-lm"``.

    Raises:
        ImportError, TypeError, OSError: the model cannot be loaded.
    """

    def __init__(self, model: str, dtype: str = "float32", working_dir: str | None = None, deepspeed: bool = True,
                 tensor_parallel: int = 1, max_inputs: int = MAX_INPUTS, max_prompt_tokens: int | None = None,
                 max_adapters: int = MAX_ADAPTERS) -> None:
        import torch

        self.torch = torch
        self.max_inputs = max_inputs
        self.max_prompt_tokens = max_prompt_tokens
        self.dtype = getattr(torch, dtype)
        self.tokenizer: Any = None
        self.kind = "loader" if ":" in model and not Path(model).exists() else "huggingface"
        if self.kind == "loader":
            module = load_module(model, working_dir or os.getcwd())
        else:
            module, self.tokenizer, self.kind = _load_huggingface(model)
        module = module.to(self.dtype).eval()
        self.plain = module
        if deepspeed:
            import deepspeed as ds

            options: dict[str, Any] = {"dtype": self.dtype, "replace_with_kernel_inject": False}
            if tensor_parallel > 1:
                options["tensor_parallel"] = {"tp_size": tensor_parallel}
            module = ds.init_inference(module, **options)
        self.model = module
        # DeepSpeed places the model on the accelerator; the inputs must follow it there.
        self.device = next((p.device for p in module.parameters()), torch.device("cpu"))
        self._batch: RunningBatch | None = None
        self.tensor_parallel = tensor_parallel
        self.adapters: Any = None
        if self.kind == "causal-lm":
            from dsnb.runtime.server.lora import Adapters  # it builds on this module's BadRequest

            self.adapters = Adapters(getattr(module, "module", module), max_adapters)

    def lora(self, request: dict[str, Any]) -> list[str]:
        """Load (``{"action": "load", "name", "path"}``) or unload (``{"action": "unload", "name", "in_use"}``)
        a LoRA adapter; the adapters loaded after it.

        Raises:
            BadRequest: the model does not generate text, the server has several ranks, or the adapter is refused
                (:class:`~dsnb.runtime.server.lora.AdapterRefused`).
        """
        if self.adapters is None:
            raise BadRequest("LoRA adapters apply to a causal language model; this model does not generate text")
        from dsnb.runtime.server.lora import AdapterRefused

        if self.tensor_parallel > 1:
            raise AdapterRefused(f"this server is split over {self.tensor_parallel} ranks and takes no LoRA adapter "
                                 "(AutoTP splits the layers LoRA wraps); serve the model on one rank to use adapters")
        if request["action"] == "load":
            self.adapters.load(request["name"], request["path"])
        else:
            self.adapters.unload(request["name"], in_use=request.get("in_use", False))
        return self.adapters.names

    def step(self, step: Step) -> Any:
        """Run one step of continuous batching (:mod:`dsnb.runtime.server.kv_batch`) on this rank's running
        batch; the logits of the sequences it generates for (every rank of a tensor-parallel server runs it).

        Raises:
            BadRequest: the model does not generate text.
            ValueError: the step does not match this rank's batch.
        """
        if self.kind != "causal-lm":
            raise BadRequest("this model does not generate text; use /v1/embeddings or /v2/models/.../infer")
        if self._batch is None:
            self._batch = RunningBatch(getattr(self.model, "module", self.model), self.device, adapters=self.adapters)
        return self._batch.run(step)


    def prompt_limit(self, max_tokens: int) -> int:
        """Prompt tokens a generation of ``max_tokens`` may start from: the model's context less
        ``max_tokens``, and at most ``max_prompt_tokens``.

        Example:
            >>> runner = Predictor.__new__(Predictor); runner.max_prompt_tokens = 400; runner.plain = None
            >>> runner.prompt_limit(16)
            400
        """
        config = getattr(self.plain, "config", None)
        context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        limits = [self.max_prompt_tokens if self.max_prompt_tokens is not None else DEFAULT_PROMPT_TOKENS]
        if isinstance(context, int) and context > 0:
            limits.append(max(context - max_tokens, 0))
        return min(limits)

    def predict(self, payload: Any) -> dict[str, Any]:
        """The answer to one request body.

        Raises:
            BadRequest: no ``inputs``, or inputs of the wrong shape or type for this model.
        """
        if not isinstance(payload, dict) or "inputs" not in payload:
            raise BadRequest('send a JSON object with "inputs", e.g. {"inputs": [[1.0, 2.0]]}')
        inputs = payload["inputs"]
        if self.kind == "causal-lm":
            single = isinstance(inputs, str)
            texts = self.check_texts(inputs)
            outputs = [self.generate(Generation(prompt=t, temperature=0)).text for t in texts]
            return {"outputs": outputs[0] if single else outputs}
        if self.tokenizer is not None:
            result = self.encode(self.check_texts(inputs))
            return {"outputs": result[0] if isinstance(inputs, str) else result}
        return {"outputs": to_json(self.forward(self.check_tensor(inputs)))}

    def forward(self, tensor: Any) -> Any:
        """The model's output for one batch tensor (of a loader model)."""
        with self.torch.inference_mode():
            return self.model(tensor.to(self.device))

    def check_tensor(self, inputs: Any) -> Any:
        """``inputs`` (a nested list of numbers) as a tensor in the model's dtype (integers stay ``long``).

        Raises:
            BadRequest: not a non-empty rectangular list of numbers, or too large.
        """
        if not isinstance(inputs, list) or not inputs:
            raise BadRequest('"inputs" must be a non-empty list (a batch), e.g. [[1.0, 2.0]]')
        if len(inputs) > self.max_inputs:
            raise BadRequest(f'"inputs" holds {len(inputs)} rows, at most {self.max_inputs} a request (the server\'s --max-inputs)')
        flat = json.dumps(inputs)
        if len(flat) > MAX_INPUT_ITEMS:
            raise BadRequest(f'"inputs" is too large ({len(flat)} characters, at most {MAX_INPUT_ITEMS})')
        try:
            tensor = self.torch.tensor(inputs)
        except (TypeError, ValueError, RuntimeError) as e:
            raise BadRequest(f'"inputs" must be a rectangular list of numbers ({e})') from e
        if tensor.dtype in (self.torch.int64, self.torch.int32):
            return tensor.long()
        if not tensor.is_floating_point():
            raise BadRequest(f'"inputs" must hold numbers, got {tensor.dtype}')
        return tensor.to(self.dtype)

    def check_texts(self, inputs: Any, field_name: str = "inputs") -> list[str]:
        """``inputs`` (a string or a list of strings) as a list of strings.

        Raises:
            BadRequest: not text, empty, or too large.
        """
        texts = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise BadRequest(f'"{field_name}" must be a string or a non-empty list of strings')
        if len(texts) > self.max_inputs:
            raise BadRequest(f'"{field_name}" holds {len(texts)} texts, at most {self.max_inputs} a request (the server\'s --max-inputs)')
        if sum(len(t) for t in texts) > MAX_INPUT_ITEMS:
            raise BadRequest(f'"{field_name}" is too large (at most {MAX_INPUT_ITEMS} characters)')
        for text in texts:
            check_unicode(text, field_name)
        return texts

    def encode(self, texts: list[str]) -> list[list[float]]:
        """Sentence embeddings (mean-pooled) or, for a classifier, logits: one list per text."""
        return [row.vector.tolist() for row in self.embed(texts)]

    def embed(self, texts: list[str]) -> list[Embedded]:
        """What :meth:`encode` gives, as float32 arrays (no Python float per number), with each text's token count."""
        assert self.tokenizer is not None
        encoded = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        with self.torch.inference_mode():
            output = self.model(**encoded)
        if self.kind == "classifier":
            values = output.logits
        else:
            hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            values = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        tokens = encoded["attention_mask"].sum(dim=1).tolist()
        return [Embedded(vector, count) for vector, count in zip(values.float().cpu().numpy(), tokens)]

    def generate(self, request: Generation, on_text: Callable[[str], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> Completion:
        """Complete ``request.prompt``; ``on_text`` receives the text piece by piece as it is made.

        Every rank of a tensor-parallel server calls this with the same request (and seed),
        so that the ranks take the same steps. ``should_stop`` (rank 0's) ends the generation at
        the next step, on every rank at once: its answer is shared each step.

        Raises:
            BadRequest: the model does not generate text, or the prompt is longer than the model
                takes (its context, or the server's ``max_prompt_tokens``).
        """
        if self.kind != "causal-lm":
            raise BadRequest("this model does not generate text; use /v1/embeddings or /v2/models/.../infer")
        torch, tokenizer = self.torch, self.tokenizer
        encoded = tokenizer(request.prompt, return_tensors="pt")
        encoded = {key: encoded[key].to(self.device) for key in ("input_ids", "attention_mask") if key in encoded}
        prompt_tokens = int(encoded["input_ids"].shape[1])
        limit = self.prompt_limit(request.max_tokens)
        if prompt_tokens > limit:  # every rank sees the same prompt, so every rank refuses it alike
            raise BadRequest(f"the prompt has {prompt_tokens} tokens; this server takes at most {limit} "
                             f"with max_tokens={request.max_tokens}; shorten it")
        clock, stopper = _StepClock(), _StopWhenTold(torch, should_stop)
        options = self._generate_options(request, prompt_tokens, clock, stopper, on_text)
        torch.manual_seed(request.seed)
        generator = self.adapters.model if self.adapters is not None else getattr(self.model, "module", self.model)
        if self.adapters is not None:
            options.update(self.adapters.row_names([request.adapter]))
        with torch.inference_mode():
            output = generator.generate(**encoded, **options)
        sequences = output.sequences if request.logprobs is not None else output
        rows = sequences[:, prompt_tokens:]
        if stopper.stopped:
            print(f"dsnb.serving: generation stopped after {rows.shape[1]} of {request.max_tokens} tokens "
                  "(its client left or its deadline passed)", flush=True)
        return self._completion(request, rows, getattr(output, "logits", None), prompt_tokens, clock.times)

    def _generate_options(self, request: Generation, prompt_tokens: int, clock: _StepClock, stopper: _StopWhenTold,
                          on_text: Callable[[str], None] | None) -> dict[str, Any]:
        """The keyword arguments of transformers' ``generate`` for ``request``."""
        tokenizer = self.tokenizer
        options: dict[str, Any] = {"max_new_tokens": request.max_tokens, "do_sample": request.do_sample,
                                   "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                                   "streamer": clock if on_text is None else _BothStreamers(clock, _TextPieces(tokenizer, on_text))}
        if request.do_sample:
            options.update(temperature=request.temperature, top_p=request.top_p)
        if request.stop:
            options.update(stop_strings=request.stop, tokenizer=tokenizer)
        if request.presence_penalty or request.frequency_penalty:
            from transformers import LogitsProcessorList

            options["logits_processor"] = LogitsProcessorList([_Penalties(prompt_tokens, request.presence_penalty,
                                                                          request.frequency_penalty)])
        if stopper.needed:
            from transformers import StoppingCriteriaList

            options["stopping_criteria"] = StoppingCriteriaList([stopper])
        if request.n > 1 and request.do_sample:  # greedy sequences are all the same one: made once, copied in _completion
            options["num_return_sequences"] = request.n
        if request.logprobs is not None:
            options.update(output_logits=True, return_dict_in_generate=True)
        return options

    def _completion(self, request: Generation, rows: Any, logits: Any, prompt_tokens: int, token_times: list[float]) -> Completion:
        """The :class:`Completion` of the generated ``rows`` (n x steps)."""
        tokenizer = self.tokenizer
        # Only sequences generated together are padded after their end; one sequence ends where generate stopped.
        end_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None and len(rows) > 1 else set()
        choices = sequence_choices(tokenizer, rows, logits, request.max_tokens, request.stop, end_ids, request.logprobs)
        if len(choices) < request.n:
            choices = choices * request.n
        return Completion(text=choices[0].text, finish_reason=choices[0].finish_reason, prompt_tokens=prompt_tokens,
                          completion_tokens=sum(c.completion_tokens for c in choices), choices=choices, token_times=token_times)


class _Penalties:
    """OpenAI's presence and frequency penalties as a transformers logits processor: each token's
    logit less ``frequency x (times generated so far) + presence x (generated at all)``, counting
    only the completion's tokens, not the prompt's (OpenAI's "Parameter details" of its API reference).
    Every rank applies it alike, so a tensor-parallel server takes the same steps."""

    def __init__(self, prompt_tokens: int, presence: float, frequency: float) -> None:
        self.prompt_tokens, self.presence, self.frequency = prompt_tokens, presence, frequency

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        generated = input_ids[:, self.prompt_tokens:]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class _StopWhenTold:
    """A transformers stopping criterion: stop when rank 0's ``should_stop`` says so. With several ranks,
    rank 0's answer is shared every step (one small all-reduce), so every rank stops at the same step
    (a rank that went on alone would wait for ever in the next collective)."""

    def __init__(self, torch: Any, should_stop: Callable[[], bool] | None) -> None:
        self.torch, self.should_stop = torch, should_stop
        dist = torch.distributed
        self.shared = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.needed = self.shared or should_stop is not None
        self.stopped = False

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        torch = self.torch
        flag = torch.tensor([1 if self.should_stop is not None and self.should_stop() else 0])
        if self.shared:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.stopped = self.stopped or bool(flag.item())
        return torch.full((input_ids.shape[0],), self.stopped, dtype=torch.bool, device=input_ids.device)


class _StepClock:
    """A transformers streamer that notes when each step's tokens come (the first call is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if self._prompt_seen:
            self.times.append(time.monotonic())
        self._prompt_seen = True

    def end(self) -> None:
        """Nothing to flush."""


class _BothStreamers:
    """Two streamers fed alike (generate takes one)."""

    def __init__(self, *streamers: Any) -> None:
        self.streamers = streamers

    def put(self, value: Any) -> None:
        for streamer in self.streamers:
            streamer.put(value)

    def end(self) -> None:
        for streamer in self.streamers:
            streamer.end()


def check_unicode(text: str, field_name: str) -> None:
    """Refuse text that is not Unicode a tokenizer can take: JSON may carry a lone surrogate (``"\\ud800"``).

    Raises:
        BadRequest: the text holds a lone surrogate.

    Example:
        >>> check_unicode(chr(0xD800), "prompt")
        Traceback (most recent call last):
        dsnb.runtime.server.model.BadRequest: "prompt" holds a lone surrogate ('\\ud800' at character 0); send valid Unicode text
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest(f'"{field_name}" holds a lone surrogate ({text[e.start]!r} at character {e.start}); '
                         "send valid Unicode text") from None


def chat_prompt(tokenizer: Any, messages: Any) -> str:
    """The prompt a tokenizer's chat template makes of OpenAI ``messages``.

    Raises:
        BadRequest: the tokenizer has no chat template, or the messages are malformed.
    """
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise BadRequest("this model has no chat template; use /v1/completions with a prompt")
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)):
        raise BadRequest('"messages" must be a non-empty list of {"role": ..., "content": "..."}')
    return tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                         tokenize=False, add_generation_prompt=True)


def _TextPieces(tokenizer: Any, on_text: Callable[[str], None]) -> Any:  # noqa: N802 - builds a streamer object
    """A transformers streamer that hands each finished piece of generated text to ``on_text``."""
    from transformers import TextStreamer

    class Pieces(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                on_text(text)

    return Pieces(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _load_huggingface(path: str) -> tuple[Any, Any, str]:
    try:
        import transformers
    except ImportError as e:
        raise ImportError("serving a Hugging Face model directory needs transformers: pip install 'dsnb[serve]'") from e
    config = json.loads((Path(path).expanduser() / "config.json").read_text())
    architectures = config.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        kind, auto = "classifier", transformers.AutoModelForSequenceClassification
    elif any(a.endswith("ForCausalLM") for a in architectures):
        kind, auto = "causal-lm", transformers.AutoModelForCausalLM
    else:
        kind, auto = "embedding", transformers.AutoModel
    model = auto.from_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model, tokenizer, kind


def to_json(output: Any) -> Any:
    if hasattr(output, "detach"):
        return output.detach().float().tolist()
    if isinstance(output, dict):
        return {k: to_json(v) for k, v in output.items()}
    if isinstance(output, (list, tuple)):
        return [to_json(v) for v in output]
    return output
