"""Fine-tuning data: the formats of the papers' data, prompt masking, truncation, packing, and a seeded
batch order that can be saved and resumed exactly.

Records come from a data spec (:mod:`minimoe.data.sources`: a local JSON/JSONL/gzip/Parquet file or a Hub
dataset); each one is mapped to a (prompt, response) pair by the first format whose fields it has:

    MetaMathQA   {"query": ..., "response": ...}
    GSM8K        {"question": ..., "answer": ...}
    Code Alpaca  {"instruction": ..., "input": ..., "output": ...}
    MATH         {"problem": ..., "solution": ...}          (``--data-filter type=Algebra`` for a subset)
    generic      {"prompt": ..., "response": ...}
    chat         {"messages": [{"role": ..., "content": ...}, ...]}   (loss on the last assistant turn)

The prompt is formatted the model's way (``Tokenizer.format_prompt``: ChatML or plain) and masked
from the loss (label -100); the response is followed by the eos token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..model.tokenizer import Tokenizer
from .builtin import builtin_split, is_builtin
from .mc_rows import LETTERS, RowError, is_mc, mc_prompt, mc_row
from .packing import length_grouped, pack, position_ids
from .sources import DataError, read_records

FORMATS = {
    "metamathqa": ("query", "response"),
    "gsm8k": ("question", "answer"),
    "code_alpaca": ("instruction", "output"),
    "math": ("problem", "solution"),
    "generic": ("prompt", "response"),
}

ROLES = ("system", "user", "assistant", "tool")


def _text(value, where: str, field: str) -> str:
    """A text field: a string of valid Unicode (no lone surrogate such as ``\\ud800``), nothing else."""
    if not isinstance(value, str):
        shown = json.dumps(value)[:40]
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__} {shown}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: field {field!r} holds an invalid character ({e.reason}: "
                        f"{value[e.start:e.end]!r} at position {e.start})") from None
    return value


def _messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} turns")
    for i, m in enumerate(messages):
        turn = f"messages[{i}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: {turn} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {turn} has role {m['role']!r}; roles: {', '.join(ROLES)}")
        _text(m["content"], where, f"{turn}.content")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: 'messages' must end with an assistant turn (the response trained on)")
    return messages


def record_to_pair(record, where: str) -> tuple[str, str] | None:
    """One JSON record → (prompt, response) text, or a ``DataError`` naming ``where`` and the field: every
    text field must be a string (a number, list or null is not silently turned into one). A multiple-choice
    row (:mod:`minimoe.data.mc_rows`) becomes its lettered prompt and the correct letter; None: a row with an image,
    left out (the papers train on ScienceQA's text-only questions)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = _messages(record["messages"], where)
        return messages[:-1], messages[-1]["content"]
    if is_mc(record):  # ScienceQA, OpenBookQA, ARC, MMLU: trained to answer with the option's letter
        try:
            row = mc_row(record)
        except RowError as e:
            raise DataError(f"{where}: {e} (its keys: {', '.join(map(str, record))})") from None
        return None if row is None else (mc_prompt(row), LETTERS[row["answer"]])
    for name, (p, r) in FORMATS.items():
        if p in record and r in record:
            prompt = _text(record[p], where, p)
            if name == "code_alpaca" and record.get("input") is not None:
                extra = _text(record["input"], where, "input")
                prompt = f"{prompt}\n\n{extra}" if extra else prompt
            return prompt, _text(record[r], where, r)
    keys = ", ".join(sorted(record)) or "none"
    formats = "; ".join(f"{p}/{r}" for p, r in FORMATS.values())
    raise DataError(f"{where}: no known format (keys: {keys}); expected {formats}, or messages")


def read_pairs(spec: str, filters=()) -> list[tuple[str, str]]:
    """The (prompt, response) pairs of a data spec (a local file or Hub dataset, :mod:`minimoe.data.sources`),
    keeping the records that pass ``filters`` (``KEY=VALUE``); a bad record is a ``DataError`` naming its
    file and line."""
    pairs = (record_to_pair(record, where) for where, record in read_records(spec, filters))
    return [pair for pair in pairs if pair is not None]  # (a ScienceQA row with an image is left out)


def load_pairs(data: str, seed: int = 0, filters=()) -> list[tuple[str, str]]:
    """A data spec (:func:`read_pairs`), or the name of a built-in task (``tiny-arith``, ``tiny-mix``:
    :mod:`minimoe.data.builtin`), whose training split follows ``seed`` where the task says so."""
    if is_builtin(data):
        if filters:
            raise DataError(f"--data-filter applies to a data file; the built-in {data} has no fields to filter")
        return builtin_split(data, "train", seed)
    return read_pairs(data, filters)


def answer_only(pairs: list[tuple], data: str) -> list[tuple]:
    """``--answer-only``: each response cut to ``#### ANSWER``, the text after its last ``####`` (DMEP trains
    GSM8K as direct answer prediction, without the chain of thought)."""
    out = []
    for i, (prompt, response) in enumerate(pairs, 1):
        if "####" not in response:
            raise DataError(f"{data}: example {i}: --answer-only needs a final answer after '####'; its response "
                            f"has none: {response[:60]!r}")
        out.append((prompt, "#### " + response.rsplit("####", 1)[1].strip()))
    return out


def prompt_text(tok: Tokenizer, prompt) -> str:
    """The prompt as the model sees it, in training and in evaluation alike (chat messages or text;
    ChatML with its reply header, or plain text followed by a newline)."""
    text = tok.format_chat(prompt) if isinstance(prompt, list) else tok.format_prompt(prompt)
    return text + "\n" if tok.chat_format == "plain" else text


def encode_pair(tok: Tokenizer, prompt, response: str, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (prompt masked with -100). Over-long examples lose the start of the prompt
    first, then the end of the response, so at least half of ``max_len`` stays response."""
    return _encode(tok, prompt, response, max_len)[:2]


def _encode(tok: Tokenizer, prompt, response: str, max_len: int) -> tuple[list[int], list[int], bool]:
    """``encode_pair``, and whether the example was longer than ``max_len``."""
    p = tok.encode(prompt_text(tok, prompt))
    r = tok.encode(response, add_special_tokens=False)
    if tok.eos_token_id is not None:
        r = r + [tok.eos_token_id]
    long = len(p) + len(r) > max_len
    r = r[:max_len - min(len(p), max_len // 2)] if long else r
    p = p[max(0, len(p) + len(r) - max_len):]
    return p + r, [-100] * len(p) + r, long


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), -100 on prompt and padding
    position_ids: torch.Tensor | None = None  # (B, T), packed rows only: 0 at each example's start

    @property
    def loss_mask(self) -> torch.Tensor:
        """Tokens that are predicted (response tokens): what routing statistics count by default."""
        return (self.labels != -100).long()

    def to(self, device) -> "Batch":
        pos = self.position_ids.to(device) if self.position_ids is not None else None
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), pos)


class Dataset:
    """Tokenised examples (or packed rows: ``packing.py``) and a resumable, seeded order: each epoch is a fresh
    permutation, length-grouped in global batches of ``group`` rows when ``group`` > 0."""

    def __init__(self, examples: list[tuple], pad_id: int, seed: int = 0, group: int = 0, truncated: int = 0):
        if not examples:
            raise DataError("the dataset is empty")
        self.examples, self.pad_id, self.seed, self.group = examples, pad_id, seed, group
        self.truncated = truncated  # examples longer than max_len, cut to it
        self.packed = len(examples[0]) == 3
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    @classmethod
    def build(cls, pairs, tok: Tokenizer, max_len: int = 256, packing: bool = False, seed: int = 0,
              group: int = 0) -> "Dataset":
        """``packing``: whole examples in rows of ``max_len`` (``packing.pack``); ``group``: length-grouped
        global batches of that many rows (``--group-by-length``: batch size × processes)."""
        encoded = [_encode(tok, p, r, max_len) for p, r in pairs]
        examples, truncated = [(ids, labels) for ids, labels, _ in encoded], sum(long for *_, long in encoded)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        return cls(pack(examples, max_len, seed) if packing else examples, pad, seed, group, truncated)

    def __len__(self) -> int:
        return len(self.examples)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.examples), generator=g).tolist()
        if self.group:
            order = length_grouped(order, [len(e[0]) for e in self.examples], self.group, g)
        return order

    def next_batch(self, batch_size: int, part: tuple[int, int] = (0, 1)) -> Batch:
        """The next ``batch_size`` examples in order (crossing into the next epoch when needed), right-padded.

        ``part=(rank, world)``: the order is that of the global batch of ``batch_size * world`` examples, which
        every process draws alike (so the data position is the same everywhere); this process gets rows
        ``rank * batch_size`` to ``(rank + 1) * batch_size``, padded to the global batch's width: exactly the
        rows one process with the global batch would see."""
        rank, world = part
        rows = []
        while len(rows) < batch_size * world:
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            rows.append(self.examples[self._order[self.index]])
            self.index += 1
        width = max(len(row[0]) for row in rows)
        rows = rows[rank * batch_size:(rank + 1) * batch_size]
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (r_ids, r_labels, *_) in enumerate(rows):
            ids[i, :len(r_ids)] = torch.tensor(r_ids)
            mask[i, :len(r_ids)] = 1
            labels[i, :len(r_labels)] = torch.tensor(r_labels)
        return Batch(ids, mask, labels, position_ids(rows, width) if self.packed else None)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "size": len(self.examples),
                "group": self.group}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != len(self.examples) or state["seed"] != self.seed:
            raise DataError(f"resume: the data has {len(self.examples)} examples (seed {self.seed}) but the "
                            f"checkpoint was taken on {state['size']} (seed {state['seed']})")
        # (a resume with another global batch under --group-by-length regroups the rest of the epoch)
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._permutation(self.epoch)
