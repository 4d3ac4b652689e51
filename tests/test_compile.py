"""``--compile``: each decoder block compiled, equal to the eager blocks through prune, grow and slice, with
bounded, logged recompiles.

Most tests trace with ``aot_eager`` (dynamo and AOT autograd without code generation: what can break a graph
or a guard, in seconds); one slow test runs Inductor. Tolerances: a compiled graph may reorder float
operations (Inductor fuses them), so values agree to fp32 rounding, not bit for bit: losses within 1e-5
relative, gradients within 1e-5 absolute (their values are ~1e-2).
"""

import json

import pytest
import torch
import torch.nn.functional as F

import minimoe
from minimoe.cli import train as train
from minimoe.model.compiling import compile_layers
from minimoe.model.moe import _grouped_mm_op


def test_grouped_mm_op_is_the_native_kernel_forward_and_backward():
    """The opaque op that stands in for grouped_mm under compile (fp32) computes what F.grouped_mm and its
    autograd compute: the same kernels, bit for bit."""
    g = torch.Generator().manual_seed(0)
    offs = torch.tensor([3, 3, 9, 16], dtype=torch.int32)  # an expert with no rows included
    x = torch.randn(16, 32, generator=g)
    w = torch.randn(4, 32, 8, generator=g)
    grad = torch.randn(16, 8, generator=g)
    results = []
    for fn in (lambda a, b: F.grouped_mm(a, b, offs=offs), lambda a, b: _grouped_mm_op(a, b, offs)):
        a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(a, b)
        y.backward(grad)
        results.append((y, a.grad, b.grad))
    for native, op in zip(*results):
        assert torch.equal(native, op)


def _model(kind: str) -> minimoe.CausalLM:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if kind == "lora_moe":
        model = minimoe.CausalLM(minimoe.preset("tiny-qwen3"))
        model.add_lora_moe(num_experts=4, top_k=2, rank=4, targets=("q_proj", "up_proj"), generator=g)
    else:
        model = minimoe.CausalLM(minimoe.preset("tiny-olmoe"))
        model.add_expert_lora(rank=8, alpha=16, generator=g)
        if kind == "lora":
            model.add_lora(rank=4, targets=("q_proj", "v_proj"))
    for p in model.adapter_parameters():  # B factors start at 0: give them values, so every path shows
        with torch.no_grad():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.train()


def _loss_and_grads(model, compiled, ids, position_ids=None):
    model.compiled_layers = compiled
    out = model(ids, labels=ids, position_ids=position_ids)
    loss = out.loss + (out.adapter_aux_loss if out.adapter_aux_loss is not None else 0.0)
    params = model.adapter_parameters()
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), grads


def _assert_compiled_is_eager(model, compiled, ids, position_ids=None):
    loss_c, grads_c = _loss_and_grads(model, compiled, ids, position_ids)
    loss_e, grads_e = _loss_and_grads(model, None, ids, position_ids)
    model.compiled_layers = compiled
    assert torch.allclose(loss_c, loss_e, rtol=1e-5, atol=0)
    for gc, ge in zip(grads_c, grads_e, strict=True):
        assert gc.shape == ge.shape and torch.allclose(gc, ge, rtol=1e-4, atol=1e-5)


def _resize(model, kind: str, event: int) -> None:
    """An event of the policy each adapter kind serves: EPnG's grow and prune (down to the skip path), DMEP's
    slice of LoRA-MoE experts."""
    if kind == "lora_moe":
        if event == 0:
            model.prune_lora_moe({name: [0, 2, 3] for name in model.lora_moe_modules()})
        return
    layers = model.config.moe_layers
    g = torch.Generator().manual_seed(event)
    model.grow_expert_lora({layer: {event % 8: 8, (event + 3) % 8: 1} for layer in layers}, generator=g)
    model.prune_expert_lora({layer: [(event + 1) % 8, (event + 5) % 8] for layer in layers})


@pytest.mark.parametrize("kind", ["expert_lora", pytest.param("lora", marks=pytest.mark.slow),
                                  pytest.param("lora_moe", marks=pytest.mark.slow)])  # (~12 s each)
def test_compiled_blocks_equal_eager_through_prune_grow_and_slice(kind):
    model = _model(kind)
    log = compile_layers(model, backend="aot_eager")
    compiled = model.compiled_layers
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    graphs = []
    for event in range(4):
        for T in (12, 9):  # a second length: the sequence dimension turns symbolic, not a graph per length
            _assert_compiled_is_eager(model, compiled, torch.randint(0, vocab, (2, T), generator=g))
        graphs.append(log.update() or {"graphs": 0, "eager_frames": 0})
        _resize(model, kind, event)
    assert all(new["eager_frames"] == 0 for new in graphs)  # no block fell back to eager execution
    assert graphs[0]["graphs"] >= 1
    # recompiles are bounded: after the first events the resized shapes are symbolic
    assert sum(new["graphs"] for new in graphs) <= 4 * len(model.layers)
    if kind == "lora_moe":  # one slice: nothing to recompile after the second round
        assert graphs[2]["graphs"] == graphs[3]["graphs"] == 0


def test_compiled_blocks_equal_eager_with_a_bf16_base():
    """A bf16 base (``--dtype bfloat16``; fp32 adapters): grouped_mm traced as itself (its meta function accepts
    bf16), through a grow and a prune."""
    model = _model("expert_lora").to(torch.bfloat16)
    for p in model.adapter_parameters():
        p.data = p.data.float()
    log = compile_layers(model, backend="aot_eager")
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))
    for event in range(2):
        _assert_compiled_is_eager(model, model.compiled_layers, ids)
        _resize(model, "expert_lora", event)
    assert log.total()["eager_frames"] == 0


def test_compiled_packed_rows_and_activation_checkpointing_equal_eager():
    model = _model("expert_lora")
    compile_layers(model, backend="aot_eager")
    compiled = model.compiled_layers
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])  # packed examples
    _assert_compiled_is_eager(model, compiled, ids, positions)
    model.gradient_checkpointing = True
    _assert_compiled_is_eager(model, compiled, ids, positions)


def test_generation_runs_the_plain_blocks():
    """A KV cache changes shapes at every token: generation never goes through the compiled blocks."""
    model = _model("expert_lora").eval()
    log = compile_layers(model, backend="aot_eager")
    ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=4)
        assert log.update() is None  # nothing compiled
        model.compiled_layers = None
        assert torch.equal(model.generate(ids, max_new_tokens=4), generated)


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("policy,args", [
    ("epng", ["--steps", "8", "--epng-warmup", "2", "--epng-interval", "2"]),
    pytest.param("dmep", ["--steps", "6", "--dmep-prune-step", "3", "--packing"], marks=pytest.mark.slow),  # ~70 s
    ("esft", ["--steps", "3"]),  # the selected experts train in full (SelectedExperts)
    ("full", ["--steps", "3"]),
])
def test_train_compile_matches_eager_and_logs_its_recompiles(tmp_path, monkeypatch, policy, args):
    """``minimoe train --compile`` through EPnG's events and DMEP's prune (and ESFT's and full fine-tuning's
    trained weights): the losses of the eager run within
    1e-5 relative (short runs: over hundreds of steps a near-tie in a router flips, with a float's reordering,
    and runs part as two processes do, docs/distributed.md), each (re)compile logged, none fell back."""
    monkeypatch.setenv("MINIMOE_COMPILE_BACKEND", "aot_eager")
    model = "tiny-qwen3" if policy == "dmep" else "tiny-olmoe"
    runs = {}
    for mode in ("eager", "compiled"):
        out = tmp_path / mode
        flags = ["--compile"] if mode == "compiled" else []
        assert train.main(["--out", str(out), "--batch-size", "4", "--eval-limit", "0", "--model", model,
                           "--policy", policy, *args, *flags]) == 0
        runs[mode] = out
    eager, compiled = _losses(runs["eager"]), _losses(runs["compiled"])
    assert len(eager) == len(compiled)
    assert max(abs(a - b) / abs(a) for a, b in zip(eager, compiled)) < 1e-5
    events = [json.loads(line) for line in (runs["compiled"] / "events.jsonl").read_text().splitlines()]
    compiles = [e for e in events if e["event"] == "compile"]
    resizes = [e["step"] for e in events if e["event"] in ("prune_grow", "dmep_prune")]
    assert compiles[0]["step"] == 1 and compiles[0]["graphs"] >= 1
    assert bool(resizes) == (policy in ("epng", "dmep"))
    assert all(e["eager_frames"] == 0 for e in compiles)
    # a recompile follows a resize (the step after it), is the first steps' (requires-grad and length
    # variants) or the end's (EPnG's importance probe: a forward without gradients), never one per step
    last = int(args[args.index("--steps") + 1])
    assert all(e["step"] <= 2 or e["step"] - 1 in resizes or e["step"] == last for e in compiles)
    summary = json.loads((runs["compiled"] / "summary.json").read_text())
    assert summary["compile"] == {"graphs": sum(e["graphs"] for e in compiles), "eager_frames": 0}
    assert "compile" not in json.loads((runs["eager"] / "summary.json").read_text())


@pytest.mark.slow
def test_inductor_compiled_blocks_equal_eager_through_an_event():
    """The default backend, generating code (a C++ compiler on CPU), through a grow and a prune."""
    model = _model("expert_lora")
    log = compile_layers(model, backend="inductor")
    compiled = model.compiled_layers
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    for event in range(2):
        _assert_compiled_is_eager(model, compiled, ids)
        _resize(model, "expert_lora", event)
    assert log.total()["eager_frames"] == 0 and log.total()["graphs"] >= 1
