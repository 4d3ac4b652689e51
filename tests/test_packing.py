"""Exact packing and length-grouped batches (data/packing.py): a packed example's logits, loss and routing
are those of the example alone, on every family with every adapter kind attached; the statistics of a packed
batch equal those of the same examples unpacked; packed and length-grouped runs resume bit for bit."""

import json
import shutil

import pytest
import torch

import minimoe
from minimoe.cli import train
from minimoe.data.dataset import Dataset
from minimoe.data.packing import length_grouped, pack, position_ids
from minimoe.model.tokenizer import byte_tokenizer
from minimoe.policies.stats import RoutingStats

FAMILIES = ["tiny-olmoe", "tiny-qwen2-moe", "tiny-qwen3", "tiny-qwen3-moe"]


def _model(name):
    torch.manual_seed(0)
    model = minimoe.CausalLM(minimoe.preset(name))
    if model.config.num_experts:
        model.add_expert_lora(rank=4, targets=("gate_proj", "up_proj"))
    else:
        model.add_lora_moe(num_experts=4, top_k=2, rank=4, targets=("up_proj",))
    model.add_lora(rank=4, targets=("q_proj", "v_proj"))
    with torch.no_grad():  # LoRA B starts at zero: make every adapter change the output
        for p in model.adapter_parameters():
            p.normal_(0, 0.05)
    return model.train()


def _examples(vocab, lengths=(7, 12, 5)):
    g = torch.Generator().manual_seed(1)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append((ids, [-100] * 2 + ids[2:]))
    return out


def _routes(out):
    """Every router's probabilities, base MoE layers and LoRA-MoE modules, by unit."""
    return {r.unit: r.probs for r in [*(out.router or []), *(out.adapter_router or [])]}


@pytest.mark.parametrize("name", FAMILIES)
def test_a_packed_example_is_computed_as_if_alone(name):
    model = _model(name)
    examples = _examples(model.config.vocab_size)
    row = pack(examples, 32, seed=0)
    assert len(row) == 1 and sum(len(e[0]) for e in examples) == len(row[0][0])
    ids, labels, starts = row[0]
    width = len(ids) + 3  # and some padding at the end
    pad = torch.zeros(1, width, dtype=torch.long)
    input_ids, mask, lab = pad.clone(), pad.clone(), torch.full((1, width), -100)
    input_ids[0, :len(ids)], mask[0, :len(ids)], lab[0, :len(ids)] = torch.tensor(ids), 1, torch.tensor(labels)
    packed = model(input_ids, attention_mask=mask, labels=lab, position_ids=position_ids(row, width),
                   output_router=True)
    routes = _routes(packed)
    assert routes  # routers on every family (base MoE layers or LoRA-MoE modules)
    for s, e in zip(starts, [*starts[1:], len(ids)]):
        alone_ids = torch.tensor([ids[s:e]])
        alone_labels = torch.tensor([[-100] + labels[s + 1:e]])  # (the packed row never predicts a start)
        alone = model(alone_ids, labels=alone_labels, output_router=True)
        torch.testing.assert_close(packed.logits[0, s:e], alone.logits[0], rtol=0, atol=1e-4)
        for unit, probs in _routes(alone).items():
            torch.testing.assert_close(routes[unit][s:e], probs, rtol=0, atol=1e-5)
    # the packed loss: the mean over the row's target tokens of the examples' own losses
    assert abs(packed.loss.item() - _row_loss(model, row)) < 1e-5


@pytest.mark.parametrize("name", ["tiny-olmoe", "tiny-qwen3"])  # (tiny-qwen3: grouped-query attention)
def test_flex_attention_on_packed_rows_is_the_sdpa_block_mask(name):
    """On a CUDA GPU packed rows go through FlexAttention (``use_flex``); its mask function must say what the SDPA
    block mask says. Checked on the CPU, where FlexAttention runs its reference forward (no backward there):
    logits and routing of two packed rows, one of them padded, equal, plain and with the blocks compiled."""
    from minimoe.model.compiling import compile_layers
    from minimoe.model.model import use_flex

    model = _model(name).eval()
    rows = pack(_examples(model.config.vocab_size, (7, 12, 5, 9, 3)), 20, seed=0)
    width = max(len(r[0]) for r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (ids, _, _) in enumerate(rows):
        input_ids[i, :len(ids)], mask[i, :len(ids)] = torch.tensor(ids), 1
    assert not mask.all() and len(rows) == 2  # a padded row
    assert not use_flex("auto", "cpu") and use_flex("flex", "cpu") and not use_flex("sdpa", "cpu")
    outs = {}
    for choice, compiled in (("sdpa", False), ("flex", False), ("flex", True)):
        model.packed_attention = choice
        if compiled:
            compile_layers(model, backend="aot_eager")
        with torch.no_grad():
            outs[choice, compiled] = model(input_ids, attention_mask=mask, position_ids=position_ids(rows, width),
                                           output_router=True)
    reference = outs["sdpa", False]
    for out in (outs["flex", False], outs["flex", True]):
        real = mask.bool()
        torch.testing.assert_close(out.logits[real], reference.logits[real], rtol=0, atol=1e-5)
        for unit, probs in _routes(out).items():
            torch.testing.assert_close(probs, _routes(reference)[unit], rtol=0, atol=1e-6)


def _row_loss(model, row):
    """The per-target-token mean loss of the row's examples, computed one example at a time."""
    ids, labels, starts = row[0]
    total, count = 0.0, 0
    for s, e in zip(starts, [*starts[1:], len(ids)]):
        lab = torch.tensor([labels[s:e]])
        lab[0, 0] = -100
        n = int((lab[0, 1:] != -100).sum())
        if n:
            total += model(torch.tensor([ids[s:e]]), labels=lab).loss.item() * n
            count += n
    return total / count


def test_the_routing_statistics_of_a_packed_batch_are_those_of_its_examples_unpacked():
    model = _model("tiny-olmoe").eval()
    examples = _examples(model.config.vocab_size, lengths=(9, 4, 14, 6, 11))
    packed, unpacked = Dataset(pack(examples, 24, seed=0), 0), Dataset(examples, 0)
    for data in (packed, unpacked):
        data.stats = RoutingStats()
        batch = data.next_batch(len(data))
        out = model(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                    output_router=True)
        data.stats.observe(out, batch.attention_mask)
    a, b = packed.stats.state_dict(), unpacked.stats.state_dict()
    assert a["tokens"] == b["tokens"] == {"0": 44.0, "1": 44.0}  # every real token, once
    for kind in ("importance", "counts", "gate"):  # EPnG's importance, DMEP's and ESFT's counts and scores
        assert a[kind].keys() == b[kind].keys() == {"0", "1"}
        for layer in a[kind]:
            torch.testing.assert_close(a[kind][layer], b[kind][layer], rtol=1e-6, atol=1e-5)


def test_packing_keeps_examples_whole_and_never_predicts_a_start():
    examples = [([1] * n, [-100] + [2] * (n - 1)) for n in (5, 9, 3, 8, 2)]
    rows = pack(examples, 10, seed=0)
    assert all(len(r[0]) <= 10 for r in rows)
    assert sum(len(r[2]) for r in rows) == 5  # every example in exactly one row
    for ids, labels, starts in rows:
        assert starts[0] == 0 and all(labels[s] == -100 for s in starts[1:])
        pos = position_ids([(ids, labels, starts)], len(ids))[0].tolist()
        assert [p for i, p in enumerate(pos) if i in starts] == [0] * len(starts)
    tok = byte_tokenizer()
    data = Dataset.build([("q" * 40, "a" * 40), ("q", "a")], tok, max_len=32, packing=True)
    assert data.truncated == 1 and data.packed


def test_length_grouped_batches_are_deterministic_and_have_similar_lengths():
    lengths = [int(x) for x in torch.randint(1, 200, (400,), generator=torch.Generator().manual_seed(0))]
    order = list(range(400))
    a = length_grouped(order, lengths, 8, torch.Generator().manual_seed(3))
    b = length_grouped(order, lengths, 8, torch.Generator().manual_seed(3))
    assert a == b and sorted(a) == order
    spread = sum(max(lengths[j] for j in a[i:i + 8]) - min(lengths[j] for j in a[i:i + 8]) for i in range(0, 400, 8))
    random_spread = sum(max(lengths[i:i + 8]) - min(lengths[i:i + 8]) for i in range(0, 400, 8))
    assert spread < random_spread / 4


@pytest.fixture(scope="module")
def long_tailed(tmp_path_factory):
    """A small long-tailed data file (lognormal response lengths)."""
    path = tmp_path_factory.mktemp("lengths") / "rows.jsonl"
    torch.manual_seed(0)
    n = torch.distributions.LogNormal(2.5, 0.8).sample((96,)).clamp(1, 120).int().tolist()
    path.write_text("".join(json.dumps({"prompt": f"say {k} x", "response": "x" * k}) + "\n" for k in n))
    return path


@pytest.mark.parametrize("mode", [["--packing"], ["--group-by-length"]])
def test_packed_and_length_grouped_runs_resume_bit_for_bit(long_tailed, tmp_path, mode):
    args = ["--policy", "epng", "--model", "tiny-olmoe", "--data", str(long_tailed), "--batch-size", "4",
            "--max-len", "96", "--steps", "8", "--epng-warmup", "2", "--epng-interval", "2", "--eval-limit", "0",
            *mode]
    assert train.main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert train.main([*args, "--stop-at", "3", "--out", str(tmp_path / "half")]) == 0
    assert train.main(["--resume", str(tmp_path / "half")]) == 0
    strip = lambda r: [{k: v for k, v in m.items() if k not in ("tokens_per_s", "elapsed_s")}
                       for m in map(json.loads, (tmp_path / r / "metrics.jsonl").read_text().splitlines())]
    assert strip("whole") == strip("half")
    assert (tmp_path / "whole/events.jsonl").read_text() == (tmp_path / "half/events.jsonl").read_text()
    summary = json.loads((tmp_path / "whole/summary.json").read_text())
    assert summary["startup_s"] > 0 and summary["train_s"] > 0  # start-up reported apart from training
    shutil.rmtree(tmp_path / "half")
