"""Will it fit? The memory a training run needs per GPU, before anything is downloaded.

    minimoe plan --model allenai/OLMoE-1B-7B-0125 --policy lora --batch-size 1 --max-len 256 \\
        --dtype bfloat16 --gpu-memory 80GiB
    minimoe plan --model Qwen/Qwen3-8B --policy dmep --batch-size 16 --gradient-checkpointing \\
        --fsdp --world-size 8

The model is built on the meta device from its ``config.json`` (a shipped reference shape, a tiny preset, a
local directory, or a Hub id of which only config.json is fetched, through the Hub cache and
``HF_HUB_OFFLINE``), and the chosen policy attaches its adapters to it through the real policy code, so the
parameter and trainable counts are exact. Memory per GPU is then:

* weights: every parameter at its dtype (the base at ``--dtype``; adapters are fp32, as ``minimoe train`` keeps
  them); with ``--fsdp`` the base is divided by the world size and adapters stay whole;
* gradients: one per trainable parameter, at its dtype;
* optimizer: AdamW keeps two moments per trainable parameter at the parameter's dtype (8 bytes for fp32)
  plus a step count. Trained parameters are fp32 themselves (adapters always; ``full``/``esft`` refuse
  ``--dtype bfloat16``), so there is no separate master copy to count;
* activations: what autograd saves in one micro-batch's forward (formula below), plus the backward's
  largest transient (the logits' gradient);
* FSDP: the all-gathered weights of the root (embeddings, head) and of two decoder layers (one computing,
  one prefetched).

Activation formula (bytes; N = batch × length tokens, a = activation element size: 2 under CUDA bf16
autocast, else the base dtype's; H hidden, q = nh·d, kv = nkv·d, E experts, K top-k, I expert width,
R = N·K routed rows, V vocabulary; per decoder layer, summed over layers):

    norms        2 · N·(4H + 4)                     (each RMSNorm saves x in fp32 and its rsqrt)
    attention    N·(2q + 2kv)·a + N·nh·4            (SDPA saves q, k, v, out and the log-sum-exp)
                 + N·(q + kv)·4 + N·(rows)·4        (q/k RMSNorm of OLMoE and Qwen3)
    router       N·(E·4 + K·8 + K·a)                (fp32 probabilities, top-k ids and weights)
    dispatch     R·(H·a + 8) [+ R·H·a]              (sort order and the experts' output kept for the routing
                                                     weights; the gathered tokens xs [R, H] when gate/up
                                                     train or carry LoRA)
    experts      3·R·I·a                            (gate and up outputs, SiLU output)
    shared/dense 3·N·S·a + N·(H + 1)·a              (Qwen1.5-MoE shared expert of width S; a dense MLP 3·N·I·a)
    trained weights: the input of every linear whose weight trains or carries an adapter, once per distinct
                 input (N·in·a; R·I·a for the experts' down_proj), the normed input of a trained norm (N·H·a)
    expert LoRA  per adapted projection: R·r_pad·a + E·r_pad·(in + out)·4
                 (r_pad = max rank rounded up to 8: the rank-space rows, and the packed A / Bᵀ)
    LoRA         per LoRALinear: N·r·a
    LoRA-MoE     per module (E_l experts, top-k_l, rank r, R_l = N·k_l): N·(E_l·4 + 12·k_l) + R_l·8
                 + R_l·(in + r + out)·a         (routing; gathered input, rank-space rows, expert outputs)
    ESFT         per trained projection: its layer's merged weight E·out·in (kept by the grouped matmul)
    head         N·(4H + 4) + N·V·(a + 4)           (final norm; the returned logits and the fp32 log-softmax)
    backward     + 2·N·V·4                          (the log-softmax's and the logits' gradients)
    mask         B·T²                               (the boolean attention mask of padded or packed rows: with
                                                     --packing every row is T = --max-len long)

Autograd records nothing before the first tensor that needs a gradient: layers before the first trained
parameter save nothing, and the first one saves only what lies downstream of its adapters (with expert
LoRA: no attention, router or shared expert in the first MoE layer).
With ``--gradient-checkpointing`` each layer keeps only its input (N·H·a) and the backward recomputes one
layer at a time: L·N·H·a + max(one layer's activations) + head (two layers when LoRA-MoE load-balancing
losses train: measured on CPU, one more layer is held then; the cause is not pinned down).
On CUDA with an fp32 base, autocast makes a bf16 copy of every weight a matmul uses and the backward keeps
it (a frozen weight is not cached by autocast): + base matmul weights × 2 bytes (one layer's with
checkpointing). ``--dtype bfloat16`` avoids it. (From reading the code paths: not measured, no GPU yet.)

Calibration: on CPU (fp32, batch 4 × 256) the formula is within 0.92-1.06× of the bytes autograd saves
(counted with ``saved_tensors_hooks``; tests/test_plan.py) for expert LoRA, full fine-tuning, ESFT, dense
LoRA and LoRA-MoE, and the whole plan within the table of a real step's peak resident memory in docs/memory.md
(``minimoe plan-check``). It has not been measured on a GPU, where the caching allocator's
fragmentation comes on top.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..adapters.base import Adapter
from ..adapters.lora_moe import PrunableLoRAMoE
from ..adapters.lm import CausalLM
from ..model.config import PRESETS, ModelConfig
from ..model.moe import SparseMoeBlock
from ..model.reference import hub_config, shipped_shapes
from ..model import shipped as shipped_models
from ..parallel.distributed import launched
from ..policies import POLICIES, Context, make_policy

POLICY_NAMES = ("lora", "epng", "dmep", "esft", "full")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
_UNITS = {"": 2**30, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_memory(text: str, flag: str = "--gpu-memory") -> int:
    """``"80GiB"``, ``"80GB"``, ``"81920MiB"``, ``"80G"`` (binary), or a plain number of GiB → bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m[2].lower() not in _UNITS:
        raise ValueError(f"{flag} {text!r}: expected a size such as 80GiB, 80GB, 24576MiB or 80")
    return int(float(m[1]) * _UNITS[m[2].lower()])


def load_config(name: str, revision: str | None = None) -> tuple[ModelConfig, str]:
    """The ``ModelConfig`` of ``name`` and where it came from. In order: a local directory (its config.json),
    a tiny preset (with the byte tokenizer's vocabulary, as ``minimoe train`` builds it), a benchmark shape
    (``bench:medium``), a shipped reference shape (by Hub id), else the Hub's config.json (cache first;
    ``HF_HUB_OFFLINE=1`` never touches the network)."""
    path = Path(name).expanduser()
    if not path.is_dir() and (ship := shipped_models.shipped_name(name)):  # tiny-moe, tiny-dense: in the package
        path = shipped_models.shipped(ship)
    if path.is_dir():
        return ModelConfig.from_json(path / "config.json"), f"{path / 'config.json'}"
    if name in PRESETS:
        from ..model.tokenizer import byte_tokenizer

        tok = byte_tokenizer()
        vocab = -(-tok.vocab_size // 16) * 16
        config = ModelConfig.from_hf_config({**PRESETS[name], "vocab_size": vocab, "eos_token_id": tok.eos_token_id,
                                             "pad_token_id": tok.pad_token_id}, name_or_path=name,
                                            source=f"preset {name!r}")
        return config, f"tiny preset {name!r} (byte tokenizer, vocabulary {vocab})"
    if name.startswith("bench:"):
        from .bench.run import SHAPES

        kind = name.split(":", 1)[1]
        shape, _, which = kind.partition("/")
        if shape not in SHAPES:
            raise ValueError(f"--model {name}: no benchmark shape {shape!r}; shapes: {', '.join(SHAPES)}")
        if (which or "moe") not in SHAPES[shape]:
            raise ValueError(f"--model {name}: benchmark shape {shape} has no {which!r} model; it has: "
                             f"{', '.join(SHAPES[shape])}")
        return ModelConfig.from_hf_config(SHAPES[shape][which or "moe"], name_or_path=name), \
            f"benchmark shape {shape} ({which or 'moe'})"
    shipped = shipped_shapes()
    if name in shipped and revision is None:
        return ModelConfig.from_json(shipped[name]).replace(name_or_path=name), \
            f"shipped copy of {name}'s config.json (minimoe/model/shapes)"
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"--model {name!r}: not a local directory, a tiny preset ({', '.join(PRESETS)}), "
                                f"a shipped shape ({', '.join(shipped)}) or a Hub id 'org/name'")
    return hub_config(name, revision, f"a tiny preset or a shipped shape ({', '.join(shipped)})")


def build(config: ModelConfig, policy: str, options: dict | None = None, dtype: str = "float32",
          esft_experts: int | None = None):
    """The model on the meta device with ``policy``'s adapters attached by the policy itself. Returns
    ``(model, policy object, trainable parameters)``. ESFT's selection needs training data; here every MoE
    layer selects ``esft_experts`` experts (default: ``ceil(top_p · E)``, what uniform routing selects, the
    most any routing can: skewed routing reaches top_p with fewer)."""
    if dtype != "float32" and POLICIES[policy].trains_base_weights:
        raise ValueError(f"--dtype {dtype} with --policy {policy}: minimoe train refuses it (the trained weights would "
                         "have no fp32 master copy); plan with --dtype float32")
    with torch.device("meta"):
        model = CausalLM(config)
    model.to(getattr(torch, dtype))  # as minimoe train: the base at --dtype, adapters attached after in fp32
    pol = make_policy(policy, options or {})
    if policy == "esft":
        pol.selection = _esft_selection(config, pol, esft_experts)
    pol.setup(model, Context(dataset=None))
    return model, pol, pol.trainable_parameters(model)


def _esft_selection(config: ModelConfig, policy, experts: int | None) -> dict[int, list[int]]:
    """ESFT's selection without data: ``experts`` per MoE layer (default ``ceil(top_p · E)``)."""
    if not config.num_experts:
        raise ValueError("policy esft needs an MoE model (this one has no routed experts)")
    n = experts or math.ceil(policy.config.top_p * config.num_experts)
    if not 1 <= n <= config.num_experts:
        raise ValueError(f"--esft-experts {n}: must be in 1..{config.num_experts}")
    return {layer: list(range(n)) for layer in config.moe_layers}


def _unique(params) -> list[nn.Parameter]:
    seen = {}
    for p in params:
        seen.setdefault(id(p), p)
    return list(seen.values())


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in _unique(params))


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def layer_activations(model, layer: nn.Module, N: int, a: int, grad_in: bool = True) -> int:
    """Bytes one decoder layer saves for backward (the formula of the module docstring). ``grad_in=False``:
    nothing before this layer trains, so its attention block saves nothing unless something in it trains
    (autograd records no graph before the first tensor that needs a gradient)."""
    c = model.config
    H, d, nh, nkv = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
    q, kv = nh * d, nkv * d
    total = 2 * N * (4 * H + 4)  # the two RMSNorms
    total += sum(N * H * a for norm in (layer.input_layernorm, layer.post_attention_layernorm) if _trains(norm))
    total += N * (2 * q + 2 * kv) * a + N * nh * 4  # SDPA
    if c.qk_norm != "none":
        rows = 1 if c.qk_norm == "full" else nh  # "head": one rsqrt per head
        total += N * (q + kv) * 4 + N * (rows + (1 if c.qk_norm == "full" else nkv)) * 4

    def linear_extra(module, rows: int, inputs_saved: set, key) -> int:
        """What an adapted or trained linear adds: its input (once per distinct input) and its adapter paths."""
        extra = 0
        if (_trains(module) or _saves_input(module)) and key not in inputs_saved:
            inputs_saved.add(key)
            extra += rows * module.in_features * a
        return extra + _adapter_bytes(module, rows, a)

    attn = layer.self_attn
    saved: set = set()
    for name in ("q_proj", "k_proj", "v_proj"):
        total += linear_extra(getattr(attn, name), N, saved, "attn_in")
    total += linear_extra(attn.o_proj, N, saved, "o_in")
    if not grad_in and not any(p.requires_grad for m in (layer.input_layernorm, attn) for p in m.parameters()):
        total = N * (4 * H + 4)  # the attention saved nothing; the second norm's input needs no gradient either
    mlp = layer.mlp
    if isinstance(mlp, SparseMoeBlock):
        E, K, I = c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size
        R = N * K
        routed = grad_in or _trains(mlp.gate)  # without a gradient coming in, the routing weights need none
        total += N * (E * 4 + K * 8 + K * a) * routed  # router
        total += R * (H * a * routed + 8) + 3 * R * I * a  # sort order, weighted output; gate, up, SiLU outputs
        pair = (mlp.experts.gate_proj, mlp.experts.up_proj)
        if any(_trains(m) or _saves_input(m) for m in pair):
            total += R * H * a  # the gathered tokens xs, for the weight or LoRA-A gradients
        if _trains(mlp.gate):
            total += N * H * a
        for name in ("gate_proj", "up_proj", "down_proj"):
            proj = getattr(mlp.experts, name)
            total += _adapter_bytes(proj, R, a)  # expert LoRA's packed rows, ESFT's assembled weight
            if name == "down_proj" and (_trains(proj) or _saves_input(proj)):
                total += R * proj.in_features * a  # its input (gate/up's are the dispatched xs, counted above)
        shared_trains = mlp.shared_expert is not None and any(p.requires_grad for p in mlp.shared_expert.parameters())
        if mlp.shared_expert is not None and (grad_in or shared_trains):
            S = c.shared_expert_intermediate_size
            total += 3 * N * S * a + N * (H + 1) * a
            total += _gate_up_inputs(mlp.shared_expert, N, H, a)
            total += linear_extra(mlp.shared_expert.down_proj, N, set(), "down_in")
    else:
        total += 3 * N * c.intermediate_size * a
        total += _gate_up_inputs(mlp, N, H, a)
        total += linear_extra(mlp.down_proj, N, set(), "down_in")
    return total


def _gate_up_inputs(mlp, N: int, H: int, a: int) -> int:
    """A dense SwiGLU's gate/up adapters and, when anything there needs it, their shared input (N·H)."""

    pair = (mlp.gate_proj, mlp.up_proj)
    needs = any(_trains(m) or _saves_input(m) for m in pair)
    return sum(_adapter_bytes(m, N, a) for m in pair) + (N * H * a if needs else 0)


def _saves_input(module) -> bool:
    """Whether an adapter on this linear needs its input for the backward (its kind says: ``saves_input``)."""
    return isinstance(module, Adapter) and module.saves_input


def _adapter_bytes(module, rows: int, a: int) -> int:
    """What an adapter's own path saves beyond its input (its kind's ``saved_bytes``); 0 for a plain linear."""
    return module.saved_bytes(rows, a) if isinstance(module, Adapter) else 0


def activation_bytes(model, batch: int, length: int, a: int, checkpointing: bool) -> dict:
    """``{"layers": ..., "head": ..., "backward": ..., "mask": ...}`` in bytes for one micro-batch (see the
    formula)."""
    c = model.config
    N = batch * length
    per_layer, grad_in = [], model.embed_tokens.weight.requires_grad
    for layer in model.layers:
        per_layer.append(layer_activations(model, layer, N, a, grad_in))
        grad_in = grad_in or any(p.requires_grad for p in layer.parameters())
    first = next((i for i, layer in enumerate(model.layers) if any(p.requires_grad for p in layer.parameters())),
                 len(per_layer))
    per_layer = [0] * first + per_layer[first:]  # layers before anything trains save nothing
    layers = sum(per_layer)
    if checkpointing:
        # measured: with LoRA-MoE load-balancing losses the backward holds one more recomputed layer
        held = 2 if any(isinstance(m, PrunableLoRAMoE) and m.lb_enabled for m in model.modules()) else 1
        layers = c.num_hidden_layers * N * c.hidden_size * a + held * max(per_layer)
    head = N * (4 * c.hidden_size + 4) + N * c.vocab_size * (a + 4)
    if model.lm_head.weight.requires_grad:
        head += N * c.hidden_size * a
    # padded or packed rows (--packing: full rows of --max-len) attend through one boolean mask (B, 1, T, T)
    return {"layers": layers, "head": head, "backward": 2 * N * c.vocab_size * 4, "mask": batch * length * length}


@dataclass
class Plan:
    """Memory of one training process, in bytes (see the module docstring for what each term holds)."""

    model: str
    source: str
    policy: str
    parameters: int  # the base model's (what config.json describes)
    adapter_parameters: int  # what the policy attached (all trainable)
    trainable: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    gathered: int  # FSDP: all-gathered root and two layers
    autocast_copies: int  # CUDA + fp32 base: the bf16 weight copies the backward keeps
    batch: int
    length: int
    dtype: str
    device: str
    checkpointing: bool
    world_size: int
    fsdp: bool
    gpu_memory: int | None = None

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer + self.activations + self.gathered
                + self.autocast_copies)

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.total <= self.gpu_memory


def plan(model_name: str, policy: str = "epng", options: dict | None = None, batch: int = 8, length: int = 256,
         dtype: str = "float32", device: str = "cuda", checkpointing: bool = False, world_size: int = 1,
         fsdp: bool = False, gpu_memory: int | None = None, esft_experts: int | None = None,
         revision: str | None = None) -> Plan:
    """The memory plan of a ``minimoe train`` run (arguments as its flags; ``device`` "cuda" means bf16 autocast)."""
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"--dtype {dtype!r}: choose from {', '.join(_DTYPE_BYTES)}")
    if batch < 1 or length < 2 or world_size < 1:
        raise ValueError("--batch-size and --world-size must be at least 1, --max-len at least 2")
    if fsdp and world_size < 2:
        raise ValueError("--fsdp needs --world-size 2 or more (minimoe train refuses --fsdp in one process)")
    config, source = load_config(model_name, revision)
    if length > config.max_position_embeddings:
        raise ValueError(f"--max-len {length} is above the model's max_position_embeddings "
                         f"({config.max_position_embeddings}); minimoe train refuses it")
    model, _, trainable = build(config, policy, options, dtype, esft_experts)
    params = _unique(model.parameters())
    trainable = _unique(trainable)
    adapter_ids = {id(p) for p in model.adapter_parameters()}
    # FSDP shards every parameter that is not an adapter (full fine-tuning: its trained weights too)
    sharded = [p for p in params if fsdp and id(p) not in adapter_ids]
    whole = [p for p in params if not (fsdp and id(p) not in adapter_ids)]
    weights = _bytes(whole) + _bytes(sharded) // world_size
    share = {id(p): (world_size if fsdp and id(p) not in adapter_ids else 1) for p in params}
    grads = sum(p.numel() * p.element_size() // share[id(p)] for p in trainable)
    optimizer = sum(2 * p.numel() * p.element_size() // share[id(p)] + 4 for p in trainable)
    a = 2 if device.startswith("cuda") else _DTYPE_BYTES[dtype]
    acts = sum(activation_bytes(model, batch, length, a, checkpointing).values())
    gathered = 0
    if fsdp:
        layer_bytes = max(_bytes(layer.parameters()) for layer in model.layers)
        in_layers = {id(p) for layer in model.layers for p in layer.parameters()}
        root = [p for p in params if id(p) not in in_layers and id(p) not in adapter_ids]
        gathered = 2 * layer_bytes + _bytes(root) - _bytes(root) // world_size
    copies = 0
    if device.startswith("cuda") and dtype == "float32":
        embedding = id(model.embed_tokens.weight)
        base = [p for p in params if id(p) not in adapter_ids and p.dim() >= 2 and id(p) != embedding]
        copies = sum(p.numel() * 2 for p in base)
        if checkpointing:
            copies = max(sum(p.numel() * 2 for p in layer.parameters() if p.dim() >= 2) for layer in model.layers) \
                + model.lm_head.weight.numel() * 2
    base = sum(p.numel() for p in params if id(p) not in adapter_ids)
    return Plan(model_name, source, policy, base, sum(p.numel() for p in params) - base,
                sum(p.numel() for p in trainable),
                weights, grads, optimizer, acts, gathered, copies, batch, length, dtype, device, checkpointing,
                world_size, fsdp, gpu_memory)


def gib(n: int) -> str:
    """Bytes in GiB (MiB below 1 GiB)."""
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def describe(p: Plan) -> str:
    """The plan as the lines ``minimoe plan`` prints."""
    setting = (f"policy {p.policy}, batch {p.batch} x {p.length} tokens, base {p.dtype}, {p.device}"
               f"{' (bf16 autocast)' if p.device.startswith('cuda') else ''}, gradient checkpointing "
               f"{'on' if p.checkpointing else 'off'}, {p.world_size} process{'es' if p.world_size > 1 else ''}"
               f"{' with FSDP' if p.fsdp else ''}")
    rows = [("parameters (base)", f"{p.parameters:,}")]
    if p.adapter_parameters:
        rows.append(("adapter parameters", f"{p.adapter_parameters:,}"))
    rows += [("trainable parameters", f"{p.trainable:,}"),
            ("weights", gib(p.weights)), ("gradients", gib(p.gradients)),
            ("optimizer (AdamW, 2 moments)", gib(p.optimizer)), ("activations (estimate)", gib(p.activations))]
    if p.fsdp:
        rows.append(("FSDP gathered weights", gib(p.gathered)))
    if p.autocast_copies:
        rows.append(("autocast bf16 weight copies", gib(p.autocast_copies)))
    rows.append((f"total per {'GPU' if p.device.startswith('cuda') else 'process'}", gib(p.total)))
    lines = [f"model {p.model}: {p.source}", setting]
    lines += [f"  {k:<30} {v:>18}" for k, v in rows]
    if p.gpu_memory is not None:
        verdict = "fits" if p.fits else "does NOT fit"
        lines.append(f"{verdict} in {gib(p.gpu_memory)} ({gib(abs(p.gpu_memory - p.total))} "
                     f"{'to spare' if p.fits else 'short'})")
        if not p.fits:
            lines.append("  to fit: --gradient-checkpointing, a smaller --batch-size (with --grad-accum), "
                         "--dtype bfloat16 (adapter policies), or --fsdp over more GPUs")
    return "\n".join(lines)


def plan_for(config, gpu_memory: str | None = None, as_json: bool = False) -> int:
    """``minimoe train ... --plan``: print the plan of the run a ``TrainConfig`` describes instead of training,
    judged against ``gpu_memory`` (``--gpu-memory``; default: the GPU's own memory on CUDA). Returns the exit
    status."""
    from ..train.config import default_model

    device = config.resolved_device()
    memory = None
    if device.startswith("cuda") and torch.cuda.is_available():
        memory = torch.cuda.get_device_properties(torch.device(device)).total_memory
    try:
        if gpu_memory is not None:
            memory = parse_memory(gpu_memory)
        result = plan(config.model or default_model(config.policy), config.policy, config.policy_options,
                      config.batch_size, config.max_len, config.dtype, "cuda" if device.startswith("cuda") else "cpu",
                      config.gradient_checkpointing, launched()[1], config.fsdp, memory)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _print(result, as_json)


def _print(result, as_json: bool) -> int:
    """The plan as text or JSON; the exit status: 1 when it does not fit the given memory."""
    if as_json:
        print(json.dumps({**dataclasses.asdict(result), "total": result.total, "fits": result.fits}, indent=2))
    else:
        print(describe(result))
    return 0 if result.fits in (None, True) else 1


def main(argv=None) -> int:
    from ..utils.options import add_arguments, checked

    p = argparse.ArgumentParser(prog="minimoe plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="allenai/OLMoE-1B-7B-0125",
                   help=f"Hub id, checkpoint directory, tiny preset, or bench:SHAPE; shipped offline: "
                        f"{', '.join(shipped_shapes())} (default: allenai/OLMoE-1B-7B-0125)")
    p.add_argument("--revision", default=None, help="Hub revision of config.json (skips the shipped copy)")
    p.add_argument("--policy", default="epng", choices=POLICY_NAMES, help="training method (default: epng)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch (default: 8)")
    p.add_argument("--max-len", type=int, default=256, help="tokens per sequence (default: 256)")
    p.add_argument("--dtype", default="float32", choices=tuple(_DTYPE_BYTES),
                   help="dtype of the frozen base, as `minimoe train`'s --dtype (default: float32)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda: bf16 autocast activations (default); cpu: activations in --dtype")
    p.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--world-size", type=int, default=1, help="training processes (GPUs) (default: 1)")
    p.add_argument("--fsdp", action="store_true", help="shard the base (and full fine-tuning's state) over them")
    p.add_argument("--gpu-memory", default=None, help="memory of one GPU, e.g. 80GiB: say whether the run fits")
    p.add_argument("--esft-experts", type=int, default=None,
                   help="esft: experts selected per layer (default: ceil(top_p x experts), uniform routing's count)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    for name, cls in POLICIES.items():
        if dataclasses.fields(cls.Config):
            add_arguments(p.add_argument_group(f"{name} options"), cls.Config, flag_prefix=f"{name}_",
                          dest_prefix=f"{name}.")
    args = vars(p.parse_args(argv))
    options = {k.split(".", 1)[1]: v for k, v in args.items() if "." in k and v is not None
               and k.startswith(args["policy"] + ".")}
    foreign = sorted({k.split(".")[0] for k, v in args.items() if "." in k and v is not None} - {args["policy"]})
    if foreign:
        p.error(f"options of --policy {', '.join(foreign)} given with --policy {args['policy']}")
    try:
        options = checked(POLICIES[args["policy"]].Config, options, f"--{args['policy']}-")
        memory = parse_memory(args["gpu_memory"]) if args["gpu_memory"] is not None else None
        result = plan(args["model"], args["policy"], options, args["batch_size"], args["max_len"], args["dtype"],
                      args["device"], args["gradient_checkpointing"], args["world_size"], args["fsdp"], memory,
                      args["esft_experts"], args["revision"])
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _print(result, args["json"])


if __name__ == "__main__":
    sys.exit(main())
