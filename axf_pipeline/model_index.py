"""The one pipeline-folder check: read ``model_index.json`` of a folder or Hub id before any weight loads, so
a wrong ``--model``/``--pretrained_model_name_or_path`` fails at once with a message naming it."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["read_model_index"]


def read_model_index(
    model: str,
    flag: str,
    error: type[Exception] = ValueError,
    revision: str | None = None,
    cache_dir: str | None = None,
) -> dict:
    """The components listed by ``model``'s ``model_index.json``; ``error(message naming flag and model)``
    when it is neither a saved pipeline folder nor a Hub id whose index can be fetched."""
    path = Path(model).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise error(f"{flag} {model} has no model_index.json: not a saved diffusers pipeline folder")
    elif path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise error(f"{flag} {model} does not exist (neither a folder nor a Hub id)")
    else:
        from huggingface_hub import hf_hub_download

        try:
            index = Path(hf_hub_download(model, "model_index.json", revision=revision, cache_dir=cache_dir))
        except Exception as err:  # offline, unknown repo, no access: say which model
            raise error(
                f"{flag} {model}: cannot fetch its model_index.json from the Hub ({type(err).__name__})"
            ) from None
    try:
        return json.loads(index.read_text())
    except ValueError:
        raise error(f"{flag} {model}: {index} is not valid JSON") from None
