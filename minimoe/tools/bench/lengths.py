"""``minimoe bench --data FILE``: one epoch of a file of real lengths, padded, length-grouped and packed, next to
transformers + PEFT on padded batches, in one run.

Every mode trains the same model (``--model``, default the shipped ``tiny-moe``) with LoRA r=8 on the experts'
gate+up (minimoe's expert LoRA; PEFT's LoRA on the transformers side), AdamW, on every example of the file once
(``--compile``: each mode also with its blocks compiled, an epoch to compile, then the timed one),
``--batch`` examples (rows, when packed) per step, ``--max-len`` tokens at most. What is timed: forward with loss,
backward, optimizer step, over the epoch. What is counted: target tokens (the response tokens the loss is
over), the same in every mode but for packing, whose last step wraps into the next epoch (its own count is
used). ``--data longtail`` is a built-in long-tailed file: 2,048 rows whose response lengths are lognormal
(median 24 words, 90th percentile 78, 99th 221, at most 400; seeded), meant to be long-tailed as fine-tuning
sets such as MetaMathQA, Code Alpaca or GSM8K are (their own lengths were not measured here).
"""

from __future__ import annotations

import math
import random
import time

import torch

from ...adapters.adamw import AdamW
from ...data.dataset import Dataset, load_pairs
from ...model.compiling import compile_layers

WORDS = "the a of to and in is it for on with as by at from that this be are was".split()
MODES = ("padded", "group-by-length", "packing")


def longtail(rows: int = 2048, seed: int = 0) -> list[tuple[str, str]]:
    """Prompt/response pairs whose response lengths (in words) are lognormal (μ = 3.2, σ = 0.9, from 2 to 400)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(3.2 + 0.9 * torch.randn(rows, generator=g))
    pairs = []
    for i, n in enumerate(lengths.clamp(2, 400).int().tolist()):
        r = random.Random(seed * 100_003 + i)
        pairs.append((f"Write {n} words.", " ".join(r.choice(WORDS) for _ in range(n))))
    return pairs


def _epoch(data: Dataset, batch: int) -> list:
    """The batches of one epoch of ``data``."""
    return [data.next_batch(batch) for _ in range(math.ceil(len(data) / batch))]


def _train(model, params, batches, device: str, minimoe: bool) -> tuple[float, int]:
    """Seconds to train on ``batches`` (one step each) and their target tokens."""
    opt = (AdamW if minimoe else torch.optim.AdamW)(params, lr=1e-5, foreach=True)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    targets = 0
    sync()
    t0 = time.perf_counter()
    for b in batches:
        b = b.to(device)
        kwargs = {"position_ids": b.position_ids} if minimoe and b.position_ids is not None else {}
        model(b.input_ids, attention_mask=b.attention_mask, labels=b.labels, **kwargs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        targets += int((b.labels[:, 1:] != -100).sum())
    sync()
    return time.perf_counter() - t0, targets


def run(args) -> int:
    """The table of ``minimoe bench --data``: one epoch per mode, then transformers + PEFT (padded)."""
    from ...adapters.lm import from_pretrained
    from ...model.shipped import SHIPPED, shipped
    from ...model.tokenizer import load_tokenizer
    from . import reference

    torch.set_num_threads(args.threads)
    directory = shipped(args.model) if args.model in SHIPPED else args.model
    tok = load_tokenizer(directory)
    pairs = longtail(args.rows) if args.data == "longtail" else load_pairs(args.data)
    dtype, results = getattr(torch, args.dtype), []
    for mode, compiled in [(m, c) for m in MODES for c in ((False, True) if args.compile else (False,))]:
        data = Dataset.build(pairs, tok, args.max_len, packing=mode == "packing", seed=0,
                             group=args.batch if mode == "group-by-length" else 0)
        batches = _epoch(data, args.batch)
        torch.manual_seed(0)
        model = from_pretrained(directory, dtype=dtype, device=args.device)
        model.add_expert_lora(rank=8, alpha=16, generator=torch.Generator().manual_seed(0))
        name = f"minimoe, {mode}"
        if compiled:  # an epoch that compiles (every new length recompiles until lengths turn symbolic), then one timed
            compile_layers(model)
            first, _ = _train(model.train(), model.adapter_parameters(), batches, args.device, True)
            name += f", torch.compile (2nd epoch; the 1st, compiling: {first:.1f} s)"
        seconds, targets = _train(model.train(), model.adapter_parameters(), batches, args.device, True)
        results.append((name, len(batches), seconds, targets))
    if not (why := reference.unavailable()):
        batches = _epoch(Dataset.build(pairs, tok, args.max_len, seed=0), args.batch)
        for impl in args.reference_experts:
            model, params = reference.load().setup("peft-lora", impl, directory, args.device, dtype)
            seconds, targets = _train(model, params, batches, args.device, False)
            results.append((f"transformers+PEFT ({impl} experts), padded", len(batches), seconds, targets))
    else:
        print(f"transformers route skipped: {why}")
    lengths = sorted(len(p) + len(r) for p, r in pairs)
    print(f"\n{args.data}: {len(pairs)} examples (characters: median {lengths[len(lengths) // 2]}, max "
          f"{lengths[-1]}), one epoch, batch {args.batch}, --max-len {args.max_len}, {args.model}, LoRA r=8 on "
          f"gate+up, {args.device} {args.dtype}, {args.threads} threads (torch {torch.__version__})\n")
    base = results[0][3] / results[0][2]
    print("| route, batches | steps | target tokens | time | target tokens/s | vs minimoe padded |")
    print("|---|---|---|---|---|---|")
    for name, steps, seconds, targets in results:
        speed = targets / seconds
        print(f"| {name} | {steps} | {targets:,} | {seconds:.1f} s | {speed:,.0f} | {speed / base:.2f}x |")
    return 0
