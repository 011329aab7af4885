"""LoRA adapters (PEFT) on a served language model, chosen per request by the ``model`` name, as vLLM does.

Adapters load at start (``--lora NAME=DIR``, ``ServeSpec(lora_adapters={...})``) or, when the
server allows it (``--allow-lora-loading``), through ``POST /v1/load_lora_adapter`` and
``POST /v1/unload_lora_adapter`` (vLLM's routes and bodies). A request whose ``model`` is an
adapter's name generates with that adapter; the base model's name, without. Sequences of
different adapters share the running batch: PEFT applies each row's own adapter in one
forward pass (its ``adapter_names``; ``"__base__"`` for a row without).

Only ``adapter_model.safetensors`` is read (a pickled ``.bin`` could run code), from a local
directory (nothing is downloaded), at most ``max_adapters`` at once. A server split over
several ranks takes no adapter: AutoTP splits the base layers that LoRA wraps.

Example:
    >>> check_name("sql-expert", served="tiny-llama")
    'sql-expert'
    >>> check_name("tiny-llama", served="tiny-llama")
    Traceback (most recent call last):
    dsnb.runtime.server.model.BadRequest: "lora_name" 'tiny-llama' is the base model's name; name the adapter otherwise
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dsnb.runtime.server.model import MAX_ADAPTERS, BadRequest

#: PEFT's name for "no adapter" in a mixed batch.
BASE = "__base__"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


class AdapterRefused(BadRequest):
    """An adapter cannot be loaded or unloaded as asked (a 400 that says why)."""


def check_name(name: Any, served: str) -> str:
    """``name`` if it can name an adapter of the model served as ``served``.

    Raises:
        BadRequest: not 1 to 64 letters, digits, ``.``, ``_`` or ``-`` (starting with a letter or
            digit), or the base model's own name.
    """
    if not isinstance(name, str) or not _NAME.match(name) or name == BASE:
        raise BadRequest(f'"lora_name" must be 1 to 64 letters, digits, ".", "_" or "-", got {name!r}')
    if name == served:
        raise BadRequest(f'"lora_name" {name!r} is the base model\'s name; name the adapter otherwise')
    return name


def check_directory(path: Any) -> Path:
    """The adapter directory ``path``, if it holds a PEFT LoRA adapter in safetensors.

    Raises:
        BadRequest: not a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
    """
    if not isinstance(path, str) or not path:
        raise BadRequest('"lora_path" must be the path of an adapter directory on the server')
    directory = Path(path).expanduser()
    if not (directory / "adapter_config.json").is_file():
        raise BadRequest(f'"lora_path" {path!r} is not a directory with adapter_config.json (PEFT\'s save_pretrained writes one)')
    if not (directory / "adapter_model.safetensors").is_file():
        raise BadRequest(f'"lora_path" {path!r} has no adapter_model.safetensors; save the adapter with '
                         "save_pretrained(..., safe_serialization=True) (a pickled .bin is not loaded)")
    return directory


class Adapters:
    """The LoRA adapters of one rank's model (only the engine's thread calls :meth:`load` and :meth:`unload`).

    Args:
        base: the Hugging Face causal language model (not wrapped by DeepSpeed's engine).
        max_adapters: adapters held at once at most.

    Attributes:
        model: what runs a forward pass: ``base`` until an adapter loads, then PEFT's model around it.
    """

    def __init__(self, base: Any, max_adapters: int = MAX_ADAPTERS) -> None:
        self.model = base
        self.max_adapters = max_adapters
        self.paths: dict[str, str] = {}

    @property
    def names(self) -> list[str]:
        """The loaded adapters, in loading order."""
        return list(self.paths)

    def load(self, name: str, path: str) -> None:
        """Load the adapter at ``path`` as ``name``.

        Raises:
            AdapterRefused: ``name`` is loaded already, or ``max_adapters`` are.
            BadRequest: ``path`` holds no adapter.
            ImportError: PEFT is not installed.
        """
        if name in self.paths:
            raise AdapterRefused(f"adapter {name!r} is loaded already; unload it first to load another under that name")
        if len(self.paths) >= self.max_adapters:
            raise AdapterRefused(f"{len(self.paths)} adapters are loaded (--max-loras {self.max_adapters}); unload one first")
        directory = check_directory(path)
        try:
            from peft import PeftModel
        except ImportError as e:
            raise ImportError("LoRA adapters need PEFT on the server: pip install 'dsnb[lora]'") from e
        try:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(directory), adapter_name=name, is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(directory), adapter_name=name, is_trainable=False)
        except (ValueError, KeyError, RuntimeError, OSError) as e:  # PEFT's words for an adapter of another model
            raise AdapterRefused(f"adapter {name!r} from {path} does not fit this model ({type(e).__name__}: {str(e)[:300]})") from e
        self.model.eval()
        self.paths[name] = path

    def unload(self, name: str, in_use: bool = False) -> None:
        """Forget the adapter ``name``.

        Raises:
            AdapterRefused: no adapter has that name, or a running sequence uses it (``in_use``).
        """
        if name not in self.paths:
            raise AdapterRefused(f"no adapter is named {name!r}; loaded: {', '.join(self.paths) or 'none'}")
        if in_use:
            raise AdapterRefused(f"adapter {name!r} is generating for a request now; unload it when that ends")
        del self.paths[name]
        if self.paths:
            self.model.delete_adapter(name)
        else:  # the last one: the base model again, without LoRA's layers
            self.model = self.model.unload()

    def row_names(self, adapters: list[str | None]) -> dict[str, Any]:
        """The forward pass's keyword for rows generating with ``adapters`` (None: the base model); none without adapters."""
        if not self.paths:
            return {}
        return {"adapter_names": [a if a is not None else BASE for a in adapters]}
