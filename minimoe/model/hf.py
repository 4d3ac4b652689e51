"""Loading Hugging Face Hub checkpoints: resolve a directory or Hub id, map keys, stack experts.

Key map (Hub → minimoe): drop the ``model.`` prefix; everything else keeps its name except experts,
which are stacked along a new first dimension:

    model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight  [out, in]   (Hub, transformers v4)
    model.layers.{l}.mlp.experts.gate_up_proj                    [E, 2I, H]  (fused, transformers v5;
    model.layers.{l}.mlp.experts.down_proj                       [E, H, I]    gate rows first)
        → layers.{l}.mlp.experts.{gate,up,down}_proj.weight      [E, out, in]

A converted checkpoint (``minimoe.tools.convert``) stores ``layers.{l}.mlp.experts.{p}.weight [E, out, in]``
as is, in ``minimoe.safetensors`` (older conversions: ``model.safetensors``); its keys need no mapping.

The model is built on the meta device and loaded tensors are assigned into it, so a checkpoint is
never held twice: each expert's tensor is copied into its slot of the stacked tensor as it is read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .model import Transformer
from .shipped import shipped, shipped_name

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# minimoe's converted layout (``minimoe convert``) keeps its weights under this name, not
# model.safetensors: tools that read Hub checkpoints then fail loudly ("no model.safetensors") instead of
# loading a config whose stacked expert keys they do not know and initialising those experts at random.
# Its keys already are minimoe's names, so ``map_key`` passes them through unchanged.
CONVERTED_WEIGHTS = "minimoe.safetensors"
_HUB_PATTERNS = ["*.json", "*.jinja", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]

_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_GATE_UP = re.compile(r"^layers\.(\d+)\.mlp\.experts\.gate_up_proj$")
_FUSED_DOWN = re.compile(r"^layers\.(\d+)\.mlp\.experts\.down_proj$")


class CheckpointError(ValueError):
    """A checkpoint that does not match the model its config describes."""


def resolve(path_or_repo_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory, a shipped model's name (``tiny-moe``, ``tiny-dense``: ``shipped``), or a Hub repo id
    fetched through ``huggingface_hub`` (its cache, its ``HF_HUB_OFFLINE``). Only config, tokenizer and
    safetensors files are downloaded."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if ship := shipped_name(path_or_repo_id):
        return shipped(ship)
    if path.exists():
        raise FileNotFoundError(f"{path} is a file; pass the directory that holds config.json")
    name = str(path_or_repo_id)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"{name!r} is not a local directory, nor a Hub id of the form 'org/name'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # network, auth, offline cache miss: all end here with the reason
        raise FileNotFoundError(
            f"{name!r} is not a local directory and could not be fetched from the Hub "
            f"({type(e).__name__}: {e}). With HF_HUB_OFFLINE=1 it must already be in the Hub cache."
        ) from e


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint: from the sharded index, ``model.safetensors``, or a converted
    checkpoint's ``minimoe.safetensors``."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a safetensors index ({e})") from None
        files = [directory / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that do not exist: {', '.join(missing)}")
        return files
    single = directory / "model.safetensors"
    if single.is_file():  # the Hub layout, or a converted checkpoint written before CONVERTED_WEIGHTS
        return [single]
    converted = directory / CONVERTED_WEIGHTS
    if converted.is_file():
        return [converted]
    others = sorted(directory.glob("*.bin")) + sorted(directory.glob("*.pt"))
    hint = f" (found {others[0].name}: only safetensors checkpoints are supported)" if others else ""
    raise CheckpointError(f"no model.safetensors, model.safetensors.index.json or {CONVERTED_WEIGHTS} "
                          f"in {directory}{hint}")


def map_key(key: str) -> list[tuple[str, int | None, slice | None]]:
    """Hub key → ``[(minimoe name, expert index or None, slice of dim 1 or None)]``."""
    name = key[len("model."):] if key.startswith("model.") else key
    if m := _EXPERT.match(name):
        return [(f"layers.{m[1]}.mlp.experts.{m[3]}.weight", int(m[2]), None)]
    if m := _FUSED_GATE_UP.match(name):  # [E, 2I, H]: gate rows, then up rows
        return [(f"layers.{m[1]}.mlp.experts.gate_proj.weight", None, "first"),
                (f"layers.{m[1]}.mlp.experts.up_proj.weight", None, "second")]
    if m := _FUSED_DOWN.match(name):
        return [(f"layers.{m[1]}.mlp.experts.down_proj.weight", None, None)]
    return [(name, None, None)]


def _hub_name(name: str, expert: int | None) -> str:
    """minimoe name → the Hub key a user would look for in the checkpoint."""
    if expert is not None:
        name = name.replace(".mlp.experts.", f".mlp.experts.{expert}.")
    return name if name.startswith("lm_head") else f"model.{name}"


def _listing(names: list[str], limit: int = 12) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def to_hub_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """minimoe names → Hub keys (the inverse of ``map_key``): experts unstacked, ``model.`` prefix."""
    out = {}
    for name, t in state.items():
        if ".mlp.experts." in name:  # layers.L.mlp.experts.P.weight [E, out, in]
            for e in range(t.shape[0]):
                out[_hub_name(name, e)] = t[e]
        else:
            out[_hub_name(name, None)] = t
    return out


def load_state_dict(files: list[Path], expected: dict[str, torch.Size], dtype: torch.dtype,
                    device: torch.device | str, optional: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Read ``files`` into minimoe names, checking every key and shape against ``expected``
    (names in ``optional`` may be absent)."""
    out: dict[str, torch.Tensor] = {}
    filled: dict[str, set[int]] = {}
    source: dict[tuple[str, int | None], str] = {}  # (name, expert) -> "key in file" that supplied it
    supplied: dict[str, str] = {}  # name -> the first key that supplied any of it
    unexpected, wrong, duplicate = [], [], []
    doubled: set[str] = set()  # names with duplicate suppliers: their gaps are not reported as missing too
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as e:
            raise CheckpointError(f"cannot read {file}: {type(e).__name__}: {e}") from None
        with handle as f:
            for key in f.keys():
                for name, expert, part in map_key(key):
                    if name not in expected:
                        unexpected.append(key)
                        continue
                    shape = expected[name]
                    if expert is not None and expert >= shape[0]:
                        unexpected.append(f"{key} (config.json has {shape[0]} experts)")
                        continue
                    try:
                        if part is None:
                            t = f.get_tensor(key)
                        else:  # read only this half of the fused [E, 2I, H] tensor
                            sl = f.get_slice(key)
                            half = sl.get_shape()[1] // 2
                            t = sl[:, :half] if part == "first" else sl[:, half:]
                    except Exception as e:
                        raise CheckpointError(f"cannot read tensor {key} from {file}: {e}") from None
                    want = shape[1:] if expert is not None else shape
                    if tuple(t.shape) != tuple(want):
                        got = f"{tuple(t.shape)}" + (f" for expert {expert}" if expert is not None else "")
                        wrong.append(f"{key} in {file.name}: {got}, expected {tuple(want)}")
                        continue
                    # the same weights twice (a key in two shards, fused and per-expert keys of one layer)
                    # would silently keep whichever came last
                    here = f"{key} in {file.name}"
                    clash = source.get((name, expert)) or source.get((name, None)) or (
                        supplied.get(name) if expert is None else None)
                    if clash:
                        duplicate.append(f"{here} (also {clash})")
                        doubled.add(name)
                        continue
                    source[(name, expert)] = here
                    supplied.setdefault(name, here)
                    t = t.to(dtype=dtype, device=device)
                    if expert is None:
                        out[name] = t
                        continue
                    if name not in out:
                        out[name] = torch.empty(shape, dtype=dtype, device=device)
                        filled[name] = set()
                    out[name][expert].copy_(t)
                    filled[name].add(expert)
    missing = [_hub_name(n, None) for n in expected if n not in out and n not in optional and n not in doubled]
    for name, got in filled.items():
        if name not in doubled:
            missing += [_hub_name(name, e) for e in range(expected[name][0]) if e not in got]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes ({len(wrong)}): {_listing(wrong)}")
    if duplicate:
        problems.append(f"duplicate weights ({len(duplicate)}): {_listing(duplicate)}")
    if problems:
        where = files[0].parent
        raise CheckpointError(f"checkpoint {where} does not match its config.json:\n  " + "\n  ".join(problems))
    return out


def _with_generation_config(config: ModelConfig, file: Path) -> ModelConfig:
    """``generation_config.json``'s eos ids (what transformers' ``generate`` stops on, e.g. Qwen chat's
    ``<|im_end|>``) replace those of config.json; its pad id is what ``generate`` fills finished rows with."""
    if not file.is_file():
        return config
    try:
        gen = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    eos = gen.get("eos_token_id")
    if eos is not None:
        config = config.replace(eos_token_id=tuple(eos) if isinstance(eos, list) else (int(eos),))
    if gen.get("pad_token_id") is not None:  # for generate() only, never the embedding's padding_idx
        config = config.replace(generation_pad_token_id=int(gen["pad_token_id"]))
    return config


def from_pretrained(path_or_repo_id: str | os.PathLike, dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None, revision: str | None = None,
                    cls: type[Transformer] = Transformer) -> Transformer:
    """Load a checkpoint of a supported family from a local directory or the Hub (``minimoe.from_pretrained``
    is this with ``cls=minimoe.CausalLM``, the network with its adapter methods).

    Args:
        path_or_repo_id: directory with ``config.json`` and safetensors, or a Hub id.
        dtype: parameter dtype; default: the dtype recorded in config.json (``dtype``/``torch_dtype``),
            float32 if none.
        device: where the parameters live (default CPU).
        revision: Hub branch, tag or commit.
        cls: the model class to build (a ``Transformer`` subclass).
    """
    directory = resolve(path_or_repo_id, revision)
    config = ModelConfig.from_json(directory / "config.json").replace(name_or_path=str(path_or_repo_id))
    config = _with_generation_config(config, directory / "generation_config.json")
    if isinstance(dtype, str) and dtype != "auto":
        if dtype.replace("torch.", "") not in _DTYPES:
            raise ValueError(f"dtype {dtype!r}: choose from {', '.join(_DTYPES)} or 'auto'")
        dtype = _DTYPES[dtype.replace("torch.", "")]
    elif dtype == "auto":
        dtype = None
    dtype = dtype or _DTYPES[config.dtype]
    device = torch.device(device or "cpu")
    files = checkpoint_files(directory)

    with torch.device("meta"):
        model = cls(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    # tied configs may still ship their own lm_head.weight (Qwen3-0.6B does); transformers v5 then uses it
    optional = frozenset({"lm_head.weight"} if config.tie_word_embeddings else ())
    state = load_state_dict(files, expected, dtype, device, optional)
    own_head = "lm_head.weight" in state
    if not own_head:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if not own_head or (config.tie_word_embeddings and torch.equal(model.lm_head.weight, model.embed_tokens.weight)):
        model.tie_weights()
    return model.eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "generation_config.json", "chat_template.jinja")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def write_hub_checkpoint(model, state: dict[str, torch.Tensor], out: Path, source: Path | None,
                         max_shard_bytes: int = 5 * 2**30) -> None:
    """config.json, model.safetensors (or shards + index), tokenizer and generation config in ``out``."""
    hub = to_hub_state_dict(state)
    if model.tied:
        hub.pop("lm_head.weight", None)
    hub = {k: v.detach().contiguous().cpu() for k, v in hub.items()}
    shards, current, size = [], {}, 0
    for k, v in hub.items():
        n = v.numel() * v.element_size()
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k], size = v, size + n
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(v.numel() * v.element_size() for v in hub.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config = model.config.to_hf_config()
    config["dtype"] = _DTYPE_NAMES.get(model.dtype, "float32")
    (out / "config.json").write_text(json.dumps(config, indent=1))
    copied = []
    if source is not None:
        for f in TOKENIZER_FILES:
            if (source / f).is_file():
                shutil.copy2(source / f, out / f)
                copied.append(f)
    if "generation_config.json" not in copied:
        c = model.config
        eos = list(c.eos_token_id)
        (out / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": c.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
             "pad_token_id": c.generation_pad_token_id if c.generation_pad_token_id is not None else c.pad_token_id},
            indent=1))
