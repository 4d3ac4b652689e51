"""Tokenizer over ``tokenizers`` (``tokenizer.json``) with the checkpoint's special tokens and prompt format.

Special tokens come from ``tokenizer_config.json``; stop ids from ``generation_config.json`` (what
transformers' ``generate`` uses), then ``config.json``, then the tokenizer's eos token. Prompts are plain
text, or ChatML (Qwen chat: ``<|im_start|>role\\ncontent<|im_end|>\\n``) when the chat template uses it,
with Qwen3's ``<think>`` blocks when the template has its ``enable_thinking`` switch.

The chat template is read where transformers' tokenizer reads it: ``chat_template.jinja`` (what
transformers 5 ``save_pretrained`` writes) wins over ``tokenizer_config.json``'s ``chat_template``;
the legacy processor file ``chat_template.json`` (``{"chat_template": ...}``) is used only when
neither has one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer as _Tokenizer

from .hf import resolve

CHAT_FORMATS = ("plain", "chatml")
EMPTY_THINK = "<think>\n\n</think>\n\n"  # Qwen3's empty reasoning block


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _token_text(value) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_chat_template(directory: Path, tok_cfg: dict) -> str:
    """The template transformers' ``AutoTokenizer`` would use ("" if none), in its precedence:
    ``chat_template.jinja`` over ``tokenizer_config.json`` (``tokenization_utils_base._from_pretrained``).
    ``chat_template.json`` is read by processors only (``processing_utils``); it is the fallback here."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{jinja} is not UTF-8 text: {e}") from None
    template = tok_cfg.get("chat_template")
    where = directory / "tokenizer_config.json"
    if template is None:
        legacy = directory / "chat_template.json"
        if not legacy.is_file():
            return ""
        d, where = _read_json(legacy), legacy
        if not isinstance(d, dict) or "chat_template" not in d:
            raise ValueError(f"{legacy} has no 'chat_template' key (expected {{\"chat_template\": \"...\"}})")
        template = d["chat_template"]
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        if not all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in template):
            raise ValueError(f"{where}: 'chat_template' list entries must be {{\"name\": ..., \"template\": \"...\"}}")
        default = [t["template"] for t in template if t.get("name") == "default"]
        return default[0] if default else " ".join(t["template"] for t in template)
    if not isinstance(template, str):
        raise ValueError(f"{where}: 'chat_template' must be a string, got {type(template).__name__}")
    return template


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class Tokenizer:
    """Encode/decode text, pad batches, and format prompts the way the checkpoint expects."""

    def __init__(self, tokenizer: _Tokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, eos_token_ids: list[int] | None = None,
                 chat_format: str = "plain", default_system: str | None = None, name: str = "",
                 thinking: bool = False, enable_thinking: bool | None = None, chat_template: str | None = None):
        """``thinking``: the template follows Qwen3's ``<think>`` convention (set by ``load_tokenizer``
        from the template text). ``enable_thinking``: the default of ``format_chat``'s switch (None: the
        template's default, thinking on). ``chat_template``: the checkpoint's template, kept for ``save``."""
        if chat_format not in CHAT_FORMATS:
            raise ValueError(f"chat_format {chat_format!r} not in {CHAT_FORMATS}")
        _check_switch(enable_thinking)
        self.backend = tokenizer
        self.name = name
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_token_id = self.token_to_id(bos_token)
        self.pad_token_id = self.token_to_id(pad_token)
        ids = list(eos_token_ids or [])
        eos_id = self.token_to_id(eos_token)
        if eos_id is not None and eos_id not in ids:
            ids.append(eos_id)
        self.eos_token_ids = ids
        self.chat_format = chat_format
        self.default_system = default_system
        self.thinking, self.enable_thinking, self.chat_template = thinking, enable_thinking, chat_template

    # --- vocabulary ------------------------------------------------------------------------
    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    # --- encode / decode ---------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch(self, texts: list[str], padding_side: str = "left", max_length: int | None = None,
              add_special_tokens: bool = True) -> dict[str, torch.Tensor]:
        """Pad a list of texts into ``input_ids`` and ``attention_mask`` tensors ``(B, T)``.

        Left padding (the default) is what batched generation wants; truncation keeps the end of
        each text when padding left and the start when padding right.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        rows = [self.encode(t, add_special_tokens) for t in texts]
        if max_length is not None:
            rows = [r[max(0, len(r) - max_length):] if padding_side == "left" else r[:max_length] for r in rows]
        width = max((len(r) for r in rows), default=0)
        pad = self.pad_token_id if self.pad_token_id is not None else (self.eos_token_id or 0)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            span = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
            ids[i, span] = torch.tensor(r, dtype=torch.long)
            mask[i, span] = 1
        return {"input_ids": ids, "attention_mask": mask}

    # --- prompt formats ----------------------------------------------------------------------
    def format_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    enable_thinking: bool | None = None) -> str:
        """Render ``[{"role": ..., "content": ...}]`` in the tokenizer's chat format.

        ChatML as in Qwen's template (a default system message is added when the template has one);
        plain: contents joined by blank lines, the way a base model sees a prompt. With a Qwen3
        (``thinking``) template, as that template renders user/system/assistant turns: the assistant
        turns after the last user turn get a ``<think>`` block (empty when the content has none; the
        last one always), earlier turns lose theirs, and ``enable_thinking=False`` (default:
        ``self.enable_thinking``) puts an empty block after the reply header. Without such a template
        ``enable_thinking`` changes nothing, as in transformers.
        """
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
            if not isinstance(m["content"], str):
                raise ValueError(f"message {i}: 'content' must be a string, got {type(m['content']).__name__}")
        _check_switch(enable_thinking)
        if self.chat_format == "plain":
            text = "\n\n".join(m["content"] for m in messages)
            return text + ("\n\n" if add_generation_prompt and messages else "")
        parts = []
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            parts.append(f"<|im_start|>system\n{self.default_system}<|im_end|>\n")
        if self.thinking:
            parts += _qwen3_turns(messages)
        else:
            parts += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
            enable = self.enable_thinking if enable_thinking is None else enable_thinking
            if self.thinking and enable is False:
                parts.append(EMPTY_THINK)
        return "".join(parts)

    def format_prompt(self, prompt: str, system: str | None = None, enable_thinking: bool | None = None) -> str:
        """A single-turn prompt: the text itself (plain) or a ChatML user turn with its reply header."""
        if self.chat_format == "plain":
            return prompt if system is None else f"{system}\n\n{prompt}"
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.format_chat(messages, enable_thinking=enable_thinking)

    def save(self, directory) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (what ``load_tokenizer`` reads)."""
        directory = Path(directory)
        self.backend.save(str(directory / "tokenizer.json"))
        template = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                    "'<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\\n'}}{% endif %}")
        if self.chat_template and "<|im_start|>" in self.chat_template:  # the checkpoint's own (keeps <think>)
            template = self.chat_template
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                  "eos_token": self.eos_token, "pad_token": self.pad_token,
                  **({"chat_template": template} if self.chat_format == "chatml" else {})}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name!r}, vocab={self.vocab_size}, eos={self.eos_token_ids}, "
                f"pad={self.pad_token_id}, format={self.chat_format}{'+think' if self.thinking else ''})")


def _check_switch(enable_thinking) -> None:
    if enable_thinking is not None and not isinstance(enable_thinking, bool):
        raise ValueError(f"enable_thinking must be True, False or None, got {enable_thinking!r}")


def _qwen3_turns(messages: list[dict]) -> list[str]:
    """User/system/assistant turns the way Qwen3's chat template renders them (no tools)."""
    last_query = len(messages) - 1  # the last user turn that is not a tool response
    for i in range(len(messages) - 1, -1, -1):
        c = messages[i]["content"]
        if messages[i]["role"] == "user" and not (c.startswith("<tool_response>") and c.endswith("</tool_response>")):
            last_query = i
            break
    parts = []
    for i, m in enumerate(messages):
        content = m["content"]
        if m["role"] != "assistant":
            parts.append(f"<|im_start|>{m['role']}\n{content}<|im_end|>\n")
            continue
        reasoning = m.get("reasoning_content")
        if reasoning is None:
            reasoning = ""
            if "</think>" in content:
                reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                content = content.split("</think>")[-1].lstrip("\n")
        if i > last_query and (i == len(messages) - 1 or reasoning):
            reasoning, content = reasoning.strip("\n"), content.lstrip("\n")
            body = f"<think>\n{reasoning}\n</think>\n\n{content}"
        else:
            body = content
        parts.append(f"<|im_start|>assistant\n{body}<|im_end|>\n")
    return parts


def byte_tokenizer() -> Tokenizer:
    """A byte-level tokenizer with no merges (256 byte tokens + ``<|endoftext|>`` = 256), for models
    built on the fly from a preset when no checkpoint (and so no tokenizer.json) exists."""
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = _Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>"])
    return Tokenizer(backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>", name="bytes")


def load_tokenizer(path_or_repo_id: str | os.PathLike, revision: str | None = None,
                   chat_format: str | None = None, enable_thinking: bool | None = None) -> Tokenizer:
    """Load ``tokenizer.json`` and the special tokens of a checkpoint directory or Hub id.

    Args:
        chat_format: ``"plain"`` or ``"chatml"``; default: ChatML if the checkpoint's chat template
            (``chat_template.jinja``, else ``tokenizer_config.json``, else ``chat_template.json``)
            uses ``<|im_start|>``, else plain.
        enable_thinking: default of ``format_chat``/``format_prompt``'s Qwen3 switch; ``False`` gives
            the reply header an empty ``<think>`` block (as ``apply_chat_template(enable_thinking=False)``).
    """
    directory = resolve(path_or_repo_id, revision)
    file = directory / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {directory} (minimoe reads the fast-tokenizer file only)")
    try:
        backend = _Tokenizer.from_file(str(file))
    except Exception as e:
        raise ValueError(f"cannot read {file}: {e}") from None
    # special_tokens_map.json fills what tokenizer_config.json leaves out (as transformers does)
    tok_cfg = {**_read_json(directory / "special_tokens_map.json"),
               **{k: v for k, v in _read_json(directory / "tokenizer_config.json").items() if v is not None}}
    gen_cfg = _read_json(directory / "generation_config.json")
    model_cfg = _read_json(directory / "config.json")
    template = _read_chat_template(directory, tok_cfg)
    if chat_format is None:
        chat_format = "chatml" if "<|im_start|>" in template else "plain"
    default_system = "You are a helpful assistant." if "You are a helpful assistant." in template else None
    eos_ids = _ids(gen_cfg.get("eos_token_id"))
    for extra in _ids(model_cfg.get("eos_token_id")):
        if extra not in eos_ids:
            eos_ids.append(extra)
    return Tokenizer(
        backend,
        bos_token=_token_text(tok_cfg.get("bos_token")),
        eos_token=_token_text(tok_cfg.get("eos_token")),
        pad_token=_token_text(tok_cfg.get("pad_token")),
        eos_token_ids=eos_ids,
        chat_format=chat_format,
        default_system=default_system,
        name=str(path_or_repo_id),
        thinking="enable_thinking" in template and "</think>" in template,
        enable_thinking=enable_thinking,
        chat_template=template or None,
    )
