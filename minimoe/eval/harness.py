"""lm-evaluation-harness backend: ``lm_eval --model minimoe --model_args pretrained=...,adapter=...``.

``MinimoeLM`` is an ``lm_eval`` model (registered as ``minimoe`` when this module is imported) that scores a
minimoe model — a Hub checkpoint, a local directory, a shipped tiny model — with any minimoe adapter attached
as it is (expert LoRA of any ranks, LoRA-MoE, ESFT's selected experts, LoRA): no merge, so DMEP's LoRA-MoE,
which has no merged form, is scored too. Its requests follow lm_eval's Hugging Face backend rule for rule, so
the same weights give the same numbers:

* ``loglikelihood``: context and continuation tokenised as the HF backend does (``TemplateLM._encode_pair``:
  trailing spaces of the context move to the continuation; the pair is encoded whole and split; an empty
  context is the prefix token), left-truncated to ``max_length + 1`` tokens, the last dropped; batches of
  requests sorted by length, right-padded (a causal model's padding after a row changes nothing before it);
  returns the continuation's summed log-probability and whether greedy decoding would produce it;
* ``loglikelihood_rolling``: the HF backend's disjoint rolling windows (``lm_eval.utils``), prefix token first;
* ``generate_until``: contexts left-truncated to ``max_length - max_gen_toks``, left-padded, minimoe's KV-cache
  generation (greedy, or sampling with ``do_sample``/``temperature``/``top_p``/``top_k``), decoded and cut at
  the first stop string (``until`` and the end-of-text token), as the HF backend cuts its output.

Several processes (``torchrun`` or ``accelerate launch``): each scores its share of the requests (lm_eval
splits them by ``rank``/``world_size``) on its own GPU, and lm_eval gathers the results through
``gather_object``/``all_gather`` here.

``python -m minimoe.eval.harness ARGS`` is lm_eval's own command line with this backend available. lm_eval is
an optional extra: ``pip install 'minimoe[harness]'``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
except ImportError:  # the extra is not installed: the module still imports and says what to do
    TemplateLM = object
    MISSING = "the lm-evaluation-harness backend needs lm_eval: pip install 'minimoe[harness]'"

    def register_model(*names):
        return lambda cls: cls
else:
    MISSING = None

DEFAULT_MAX_LENGTH = 2048  # as lm_eval's HF backend, when the model's config does not say


def _int_or_default(value, default: int) -> int:
    """lm_eval passes batch sizes as strings (and "auto", which minimoe treats as its default)."""
    return default if value in (None, "auto", "") else int(value)


@register_model("minimoe")
class MinimoeLM(TemplateLM):
    """A minimoe model (and adapter) as an lm_eval ``LM``; see the module docstring.

    Args (``--model_args key=value,...``):
        pretrained: Hub id, directory or shipped model (default: the base the adapter records, else tiny-moe).
        adapter: a minimoe adapter directory, loaded onto ``pretrained`` without merging.
        dtype: ``float32`` (default), ``bfloat16`` or ``auto`` (the checkpoint's): the weights' dtype.
        device: ``cpu``, ``cuda``, ``cuda:N`` (default: the process's GPU if any).
        batch_size: requests per forward (default 8; ``auto`` means the default).
        max_length: tokens a request may hold (default: the model's ``max_position_embeddings``, else 2048).
        max_gen_toks: tokens ``generate_until`` may add (default 256, as the HF backend).
        add_bos_token: encode with the tokenizer's special tokens forced on/off (default: the tokenizer's own).
        check_base: refuse an adapter saved on another base (default true).
    """

    backend = "causal"

    def __init__(self, pretrained: str | None = None, adapter: str | None = None, dtype: str = "float32",
                 device: str | None = None, batch_size=8, max_length=None, max_gen_toks=256,
                 add_bos_token: bool | None = None, check_base: bool = True, **unused):
        if MISSING:
            raise ImportError(MISSING)
        super().__init__()
        import minimoe
        from ..adapters.io import adapter_base_model

        self._rank, self._world_size = _start_processes()
        if device is None or device == "cuda" and self._world_size > 1:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        pretrained = pretrained or (adapter_base_model(adapter) if adapter else "tiny-moe")
        if dtype not in ("float32", "bfloat16", "auto"):
            raise ValueError(f"--model_args dtype={dtype}: float32, bfloat16 or auto (the checkpoint's)")
        self.model = minimoe.from_pretrained(pretrained, device=str(self._device), dtype=dtype)
        if adapter:
            self.model.load_adapter(adapter, check_base=str(check_base).lower() not in ("false", "0", "no"))
        self.model.eval()
        self.tokenizer = minimoe.load_tokenizer(pretrained)
        self.pretrained, self.adapter = str(pretrained), adapter
        self.batch_size_per_gpu = _int_or_default(batch_size, 8)
        self._max_length = _int_or_default(max_length, self.model.config.max_position_embeddings or DEFAULT_MAX_LENGTH)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = None if add_bos_token is None else str(add_bos_token).lower() in ("true", "1", "yes")

    # --- what lm_eval reads ---------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs):
        """As the HF backend: the tokenizer's own special tokens unless told (``add_bos_token``, or off for a
        string that already starts with the prefix token)."""
        special = add_special_tokens
        if special is None:
            special = self.add_bos_token is not False  # (None: the tokenizer's own, which encode's True gives)
            if string.startswith(self.tokenizer.decode([self.prefix_token_id], skip_special_tokens=False)):
                special = False  # the string carries its own BOS
        ids = self.tokenizer.encode(string, add_special_tokens=special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens if isinstance(tokens, list) else [tokens], skip_special_tokens)

    # --- scoring ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """``[(key, context_enc, continuation_enc)]`` → ``[(sum of the continuation's log-probs, is_greedy)]``."""
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        results = []
        for chunk in order.get_batched(n=override_bs or self.batch_size_per_gpu):
            rows = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            width = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, :len(r)] = torch.tensor(r)
            logprobs = F.log_softmax(self.model(ids.to(self._device)).logits.float(), dim=-1).cpu()  # (B, T, V)
            for i, ((key, _, cont), row) in enumerate(zip(chunk, rows, strict=True)):
                n = len(cont)
                scores = logprobs[i, len(row) - n:len(row)]  # (n, V): the positions that predict the continuation
                target = torch.tensor(cont)
                greedy = bool((scores.argmax(-1) == target).all())
                value = (float(scores.gather(-1, target[:, None]).sum()), greedy)
                results.append(value)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, value)
        return order.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in [r.args for r in requests]:
            windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm)
            out.append(sum(s for s, _ in scores))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), out[-1])
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        order = Collator([r.args for r in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                         group_by="gen_kwargs", group_fn=lambda r: r[1])
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        results = []
        for chunk in order.get_batched(n=self.batch_size_per_gpu):
            contexts, all_kwargs = zip(*chunk, strict=True)
            kwargs = normalize_gen_kwargs(dict(all_kwargs[0]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            rows = [self.tok_encode(c)[-(self.max_length - max_gen_toks):] for c in contexts]
            width = max(len(r) for r in rows)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(rows):
                ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
            sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature") or 0.0) > 0
            out = self.model.generate(
                ids.to(self._device), attention_mask=mask.to(self._device), max_new_tokens=max_gen_toks,
                do_sample=sample, temperature=float(kwargs.get("temperature") or 1.0),
                top_p=float(kwargs.get("top_p") or 1.0), top_k=int(kwargs.get("top_k") or 0),
                eos_token_id=self.eot_token_id, pad_token_id=pad)
            for context, gen_kwargs, row in zip(contexts, all_kwargs, out[:, width:].tolist(), strict=True):
                text = postprocess_generated_text(generation=self.tok_decode(row), stop=until, think_end_token=None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return order.get_original(results)

    # --- several processes -----------------------------------------------------------------------------------
    def all_gather(self, tensor):
        if self._world_size <= 1:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self._world_size)]
        torch.distributed.all_gather(parts, tensor)
        return torch.cat([p.reshape(-1) if p.dim() == 0 else p for p in parts])

    def gather_object(self, obj, dst=0):
        if self._world_size <= 1:
            return [obj]
        result = [None] * self._world_size if self._rank == dst else None
        torch.distributed.gather_object(obj, result, dst=dst)
        return result

    def barrier(self) -> None:
        if self._world_size > 1:
            torch.distributed.barrier()


def _start_processes() -> tuple[int, int]:
    """(rank, world size): torchrun's or accelerate's environment, with the process group started if needed."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def main(argv=None) -> int:
    """lm_eval's command line (``lm_eval --model minimoe ...``) with the minimoe backend registered."""
    if MISSING:
        print(MISSING, file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate

    saved, sys.argv = sys.argv, ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        result = cli_evaluate()
    finally:
        sys.argv = saved
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
