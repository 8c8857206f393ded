"""A Hugging Face folder's chat template, in and out.

`transformers` keeps the template in `tokenizer_config.json` (`chat_template`: a string, or a
list of named templates of which "default" is the one applied) or, in newer folders, in
`chat_template.jinja` beside it, and renders it with the tokenizer's `bos_token` and
`eos_token`. Import keeps all three with the run; export writes them back, so
`apply_chat_template` on the exported folder gives the ids minigpt renders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from minigpt_cli import files
from minigpt_cli.errors import UserError
from minigpt_cli.tokenizer.chat import ChatTemplate

CONFIG = "tokenizer_config.json"
JINJA = "chat_template.jinja"


def _token(value: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / CONFIG
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON") from None
    return config if isinstance(config, dict) else {}


def read(hf_dir: Path) -> ChatTemplate | None:
    """The folder's chat template with its bos and eos tokens; None when it has none."""
    config = _config(hf_dir)
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one is what is applied
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if (hf_dir / JINJA).is_file():
        template = (hf_dir / JINJA).read_text(encoding="utf-8")
    if not isinstance(template, str) or not template.strip():
        return None
    return ChatTemplate(template, _token(config.get("bos_token")),
                        _token(config.get("eos_token")))


def write(out_dir: Path, template: ChatTemplate) -> None:
    """Put the run's template, and the tokens it names, into the exported tokenizer_config."""
    config = _config(out_dir)
    config["chat_template"] = template.template
    if template.bos:
        config["bos_token"] = template.bos
    if template.eos:
        config["eos_token"] = template.eos
    files.atomic_write_text(out_dir / CONFIG, json.dumps(config, indent=2))
