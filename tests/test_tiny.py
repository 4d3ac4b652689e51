"""The shipped tiny-moe and tiny-dense (minimoe/weights): load like Hub checkpoints, generate, round-trip."""

import json

import pytest
import torch

import minimoe
from minimoe.model.shipped import shipped
from minimoe.tools import tiny

WEIGHTS = shipped("tiny-moe")


DENSE = WEIGHTS.parent / "tiny-dense"


@pytest.mark.parametrize("weights", [WEIGHTS, DENSE], ids=["tiny-moe", "tiny-dense"])
def test_shipped_model_loads_generates_and_matches_transformers(weights):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    WEIGHTS = weights
    files = {f.name for f in WEIGHTS.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= files
    assert sum(f.stat().st_size for f in WEIGHTS.iterdir()) <= 20 * 2**20
    model = minimoe.from_pretrained(WEIGHTS)
    tok = minimoe.load_tokenizer(WEIGHTS)
    cfg = model.config
    if weights == DENSE:  # DMEP's setting: a dense Qwen3, the same tokenizer as tiny-moe
        assert cfg.model_type == "qwen3" and not cfg.num_experts and cfg.tie_word_embeddings
        assert minimoe.load_tokenizer(DENSE).encode("sort: 5 3") == minimoe.load_tokenizer(DENSE.parent /
                                                                                          "tiny-moe").encode("sort: 5 3")
    else:
        assert cfg.model_type == "olmoe" and 8 <= cfg.num_experts <= 16 and 2 <= cfg.num_experts_per_tok <= 4
    assert 1e6 <= model.num_parameters() <= 10e6
    prompt = "sort: 5 3 9 1 ->"
    ids = torch.tensor([tok.encode(prompt)])
    out = model.generate(ids, max_new_tokens=12, eos_token_id=tok.eos_token_ids)
    text = tok.decode(out[0, ids.shape[1]:])
    # it learned the format of the domain: a list of numbers, then the end of the document
    assert text.strip() and all(ch.isdigit() or ch == " " for ch in text.strip())
    assert out[0, -1].item() in tok.eos_token_ids
    ref = AutoModelForCausalLM.from_pretrained(WEIGHTS, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (ref(ids).logits - model(ids).logits).abs().max() < 1e-4
    assert AutoTokenizer.from_pretrained(WEIGHTS)(prompt)["input_ids"] == tok.encode(prompt)


def test_config_and_tokenizer_round_trip(tmp_path):
    model = minimoe.from_pretrained(WEIGHTS)
    cfg = json.loads((WEIGHTS / "config.json").read_text())
    again = minimoe.ModelConfig.from_hf_config(model.config.to_hf_config())
    assert again.replace(name_or_path="") == model.config.replace(name_or_path="")
    assert minimoe.ModelConfig.from_hf_config(cfg).replace(name_or_path="") == model.config.replace(name_or_path="")
    tok = minimoe.load_tokenizer(WEIGHTS)
    tok.save(tmp_path)
    back = minimoe.load_tokenizer(tmp_path)
    text = "Question: Ana has 12 pens and finds 30 more. How many pens?\nAnswer: 12 + 30 = 42.\n#### 42"
    assert back.encode(text) == tok.encode(text) and back.decode(tok.encode(text)) == text
    assert back.eos_token_id == tok.eos_token_id == model.config.eos_token_id[0]
    assert tok.encode("1234") == [tok.token_to_id(d) for d in "1234"]  # digits one per token


def test_corpus_is_seeded_and_covers_every_domain():
    a, b = tiny.corpus(300, 0), tiny.corpus(300, 0)
    assert a == b and a != tiny.corpus(300, 1)
    starts = {t.split(":")[0].split(" ")[0] for t in a}
    assert {"Question", "sort", "copy", "reverse", "recall", "count"} <= starts
    assert all("#### " in t for t in a if t.startswith("Question"))


@pytest.mark.parametrize("domain", list(tiny.DOMAINS))
def test_each_domain_generator_is_self_consistent(domain):
    import random

    rng = random.Random(0)
    for _ in range(50):
        text = tiny.DOMAINS[domain](rng)
        if domain == "sort":
            xs, ys = text[len("sort: "):].split(" -> ")
            assert sorted(map(int, xs.split())) == list(map(int, ys.split()))
        elif domain == "arith":
            expr = text.split("Answer: ")[1].split(" =")[0]
            assert eval(expr) == int(text.rsplit("#### ", 1)[1])  # noqa: S307 (our own generated arithmetic)


def _snapshot(directory):
    return {str(f.relative_to(directory)): f.read_bytes() for f in sorted(directory.rglob("*")) if f.is_file()}


def test_existing_out_is_refused_before_pretraining(tmp_path, monkeypatch, capsys):
    out = tmp_path / "tiny"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')

    def started(*args, **kwargs):
        raise RuntimeError("pretraining started")

    monkeypatch.setattr(tiny, "corpus", started)  # the first step of pretraining
    assert tiny.main(["--out", str(out), "--steps", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"error: --out {out} already exists; pass --overwrite to replace it (nothing was written)\n"
    assert _snapshot(out) == {"config.json": b'{"mine": true}'}
    # --overwrite passes the check: pretraining begins (and is stopped here), the old copy is still whole
    with pytest.raises(RuntimeError, match="pretraining started"):
        tiny.main(["--out", str(out), "--steps", "1", "--overwrite"])
    assert _snapshot(out) == {"config.json": b'{"mine": true}'}
    with pytest.raises(SystemExit) as e:
        tiny.main(["--out", str(tmp_path / "new"), "--steps", "0"])
    assert e.value.code == 2 and "--steps must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_refuses_existing_out_with_one_line_and_exit_code_2(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "tiny"
    out.mkdir()
    done = subprocess.run([sys.executable, "-m", "minimoe.tools.tiny", "--out", str(out), "--steps", "1"],
                          cwd=WEIGHTS.parents[1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"error: --out {out} already exists; pass --overwrite to replace it "
                                        "(nothing was written)"]
    assert list(out.iterdir()) == []
