"""The lm-evaluation-harness backend (``minimoe.eval.harness.MinimoeLM``): on the same weights, lm_eval's own
Hugging Face backend and minimoe's give the same per-request log-likelihoods (fp32: within 1e-4, the sums of
up to ~100 token log-probabilities computed by two implementations), the same greedy generations and the
same metrics; an EPnG adapter scored unmerged equals its merged export under the HF backend; a LoRA-MoE
adapter (no merged form) is scored as minimoe's own forward computes it. Local task files, no download."""

import json
import math
import subprocess
import sys

import pytest
import torch

import minimoe
from minimoe.model.shipped import shipped

import lm_eval  # the test extra installs it
from lm_eval.tasks import TaskManager

from minimoe.eval import harness

TASKS = {
    "tiny_mc": """output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: label
doc_to_choice: choices
metric_list:
  - metric: acc
  - metric: acc_norm""",
    "tiny_gen": """output_type: generate_until
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{choices[0]}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match""",
    "tiny_ppl": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte""",
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(10):
        a, b = (int(x) for x in torch.randint(1, 60, (2,), generator=g))
        rows.append({"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1), str(a * b)],
                     "label": 0, "text": f"The sum of {a} and {b} is {a + b}. " * (1 + i % 4)})
    (root / "data.json").write_text(json.dumps(rows))
    for name, body in TASKS.items():
        head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files: {root / 'data.json'}\ntest_split: train\n"
        (root / f"{name}.yaml").write_text(head + body + "\n")
    return root


@pytest.fixture(scope="module")
def tasks(task_dir):
    return TaskManager(include_path=str(task_dir))


def _evaluate(model, args, tasks, names):
    return lm_eval.simple_evaluate(model=model, model_args=args, tasks=names, task_manager=tasks, device="cpu",
                                   batch_size=4, log_samples=True)


def _loglikelihoods(result, task):
    return [(float(r[0][0]), bool(r[0][1])) for s in result["samples"][task] for r in s["resps"]]


def test_minimoe_backend_equals_the_hf_backend_on_the_same_weights(tasks):
    base = str(shipped("tiny-moe"))
    names = list(TASKS)
    hf = _evaluate("hf", f"pretrained={base},dtype=float32", tasks, names)
    ours = _evaluate("minimoe", f"pretrained={base}", tasks, names)
    theirs, mine = _loglikelihoods(hf, "tiny_mc"), _loglikelihoods(ours, "tiny_mc")
    assert len(theirs) == len(mine) == 30
    assert max(abs(a[0] - b[0]) for a, b in zip(theirs, mine)) < 1e-4
    assert [a[1] for a in theirs] == [b[1] for b in mine]  # is_greedy
    for metric in ("acc,none", "acc_norm,none"):
        assert hf["results"]["tiny_mc"][metric] == ours["results"]["tiny_mc"][metric]
    gen = [s["resps"] for s in hf["samples"]["tiny_gen"]]
    assert gen == [s["resps"] for s in ours["samples"]["tiny_gen"]] and any(r[0][0] for r in gen)
    assert hf["results"]["tiny_gen"]["exact_match,none"] == ours["results"]["tiny_gen"]["exact_match,none"]
    rolling = [(float(a["resps"][0][0]), float(b["resps"][0][0]))
               for a, b in zip(hf["samples"]["tiny_ppl"], ours["samples"]["tiny_ppl"])]
    assert max(abs(a - b) for a, b in rolling) < 1e-3 and max(abs(a - b) / abs(a) for a, b in rolling) < 1e-6
    assert ours["results"]["tiny_ppl"]["bits_per_byte,none"] == pytest.approx(
        hf["results"]["tiny_ppl"]["bits_per_byte,none"], rel=1e-6)


def test_an_epng_adapter_unmerged_equals_its_merged_export_under_the_hf_backend(tasks, tmp_path):
    """Heterogeneous per-expert ranks (grown and pruned), loaded through ``adapter=`` without merging."""
    model = minimoe.from_pretrained("tiny-moe")
    g = torch.Generator().manual_seed(1)
    model.add_expert_lora(rank=4, alpha=8, generator=g)
    model.grow_expert_lora({0: {1: 4, 2: 8}}, generator=g)
    model.prune_expert_lora({1: [0, 3]})
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.normal_(0, 0.05, generator=g)
    minimoe.save_adapter(model, tmp_path / "adapter")
    minimoe.export_merged(model, tmp_path / "merged")
    hf = _evaluate("hf", f"pretrained={tmp_path / 'merged'},dtype=float32", tasks, ["tiny_mc"])
    ours = _evaluate("minimoe", f"adapter={tmp_path / 'adapter'}", tasks, ["tiny_mc"])  # base: the adapter's
    plain = _evaluate("minimoe", f"pretrained={shipped('tiny-moe')}", tasks, ["tiny_mc"])
    theirs, mine = _loglikelihoods(hf, "tiny_mc"), _loglikelihoods(ours, "tiny_mc")
    assert max(abs(a[0] - b[0]) for a, b in zip(theirs, mine)) < 1e-4
    assert max(abs(a[0] - b[0]) for a, b in zip(mine, _loglikelihoods(plain, "tiny_mc"))) > 1e-2  # it matters


def _adapter(kind, directory):
    """An adapter directory of each kind: DMEP's LoRA-MoE (no merged form), dense LoRA, ESFT (a short run)."""
    if kind == "esft":
        from minimoe.cli import train

        assert train.main(["--policy", "esft", "--steps", "2", "--eval-limit", "0", "--batch-size", "4",
                           "--out", str(directory.parent / "run")]) == 0
        return directory.parent / "run" / "adapter", "tiny-moe"
    base = "tiny-dense" if kind == "lora_moe" else "tiny-moe"
    model = minimoe.from_pretrained(base)
    g = torch.Generator().manual_seed(2)
    if kind == "lora_moe":
        model.add_lora_moe(num_experts=4, top_k=2, rank=4, targets=("q_proj", "up_proj"), generator=g)
    else:
        model.add_lora(rank=4, targets=("q_proj", "v_proj"), generator=g)
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.normal_(0, 0.05, generator=g)
    minimoe.save_adapter(model, directory)
    return directory, base


@pytest.mark.parametrize("kind", ["lora_moe", "lora", "esft"])
def test_every_adapter_kind_is_scored_as_minimoe_computes_it(kind, tmp_path):
    """Loaded through ``adapter=`` unmerged (DMEP's LoRA-MoE has no merged form): the backend's log-likelihoods
    and greedy flags are those of minimoe's own forward of the base with the adapter loaded."""
    directory, base = _adapter(kind, tmp_path / "adapter")
    lm = harness.MinimoeLM(adapter=str(directory), batch_size="3")
    model = minimoe.from_pretrained(base)
    model.load_adapter(directory)
    model.eval()
    tok = minimoe.load_tokenizer(shipped(base))
    pairs = [("Question: What is 2 plus 3?\nAnswer:", " 5"), ("Question: What is 2 plus 3?\nAnswer:", " 23"),
             ("The sky is", " blue today")]
    got = lm.loglikelihood([type("Request", (), {"args": p})() for p in pairs])
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        whole, ctx = tok.encode(context + continuation), tok.encode(context)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([whole])).logits.float(), -1)[0]
        expected = sum(float(logprobs[t - 1, whole[t]]) for t in range(len(ctx), len(whole)))
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert greedy == all(int(logprobs[t - 1].argmax()) == whole[t] for t in range(len(ctx), len(whole)))
    assert math.isfinite(sum(s for s, _ in got))


def test_generate_until_stops_and_samples(tmp_path):
    """Stop strings cut the text, max_gen_toks bounds it, sampling follows its seed (torch's global RNG, as
    the HF backend's)."""
    lm = harness.MinimoeLM(pretrained="tiny-moe", batch_size="2")

    def run(kwargs):
        return lm.generate_until([type("Request", (), {"args": (c, dict(kwargs))})()
                                  for c in ("Question: What is 7 plus 5?\nAnswer:", "Once upon a time")])

    long = run({"until": [], "max_gen_toks": 12, "do_sample": False})
    cut = run({"until": [long[0][3:6]], "max_gen_toks": 12, "do_sample": False})
    assert cut[0] == long[0][:long[0].index(long[0][3:6])] and cut[1] == long[1].split(long[0][3:6])[0]
    assert all(len(lm.tok_encode(t)) <= 13 for t in long)
    sampled = []
    for _ in range(2):
        torch.manual_seed(0)
        sampled.append(run({"until": [], "max_gen_toks": 12, "do_sample": True, "temperature": 1.5}))
    assert sampled[0] == sampled[1] and sampled[0] != long


@pytest.mark.slow
def test_lm_eval_command_line_runs_the_minimoe_backend(task_dir, tmp_path):
    out = subprocess.run([sys.executable, "-m", "minimoe.eval.harness", "--model", "minimoe", "--model_args",
                          f"pretrained={shipped('tiny-moe')}", "--tasks", "tiny_mc", "--include_path", str(task_dir),
                          "--device", "cpu", "--batch_size", "4", "--limit", "4"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tiny_mc" in out.stdout and "acc" in out.stdout


def test_without_lm_eval_the_module_says_how_to_install_it():
    code = ("import sys; sys.modules['lm_eval'] = None; import minimoe.eval.harness as h; print(h.MISSING); "
            "sys.exit(h.main([]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 2 and "pip install 'minimoe[harness]'" in out.stderr


@pytest.mark.slow
def test_minimoe_eval_harness_is_lm_evals_command_line(task_dir, tmp_path, capsys):
    from minimoe.cli import eval as eval_cli

    rc = eval_cli.main(["--harness", "--model", "minimoe", "--model_args", f"pretrained={shipped('tiny-moe')}",
                        "--tasks", "tiny_mc", "--include_path", str(task_dir), "--device", "cpu", "--limit", "2"])
    assert rc == 0 and "tiny_mc" in capsys.readouterr().out


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_under_torchrun_score_what_one_does(task_dir, tmp_path):
    """lm_eval shares the requests out by rank and gathers them through the backend: the metrics of two
    processes are those of one."""
    import re

    args = ["-m", "minimoe.eval.harness", "--model", "minimoe", "--model_args", f"pretrained={shipped('tiny-moe')}",
            "--tasks", "tiny_mc", "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "4"]
    tables = []
    for launcher in ([sys.executable], [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]):
        out = subprocess.run([*launcher, *args], capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        tables.append(re.findall(r"\|(acc(?:_norm)?)\s*\|[^|]*\|\s*([0-9.]+)\|", out.stdout))
    assert tables[0] == tables[1] and len(tables[0]) == 2


@pytest.mark.slow
def test_epng_general_recipe_scores_the_base_and_its_fine_tunes_in_one_table(task_dir, tmp_path, capsys):
    """EPnG Table 4's recipe with local stand-in tasks: a row for the base, one per adapter (unmerged) and one
    per merged checkpoint, each the accuracy lm_eval gives that model alone."""
    from minimoe.cli import eval as eval_cli
    from minimoe.eval import general

    model = minimoe.from_pretrained("tiny-moe")
    g = torch.Generator().manual_seed(3)
    model.add_expert_lora(rank=4, alpha=8, generator=g)
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.normal_(0, 0.2, generator=g)
    minimoe.save_adapter(model, tmp_path / "epng" / "adapter")
    minimoe.export_merged(model, tmp_path / "full" / "export")
    out = tmp_path / "general"
    rc = eval_cli.main(["--recipe", "epng-general", "--adapter", str(tmp_path / "epng" / "adapter"), "--merged",
                        str(tmp_path / "full" / "export"), "--tasks", "tiny_mc", "--include-path", str(task_dir),
                        "--device", "cpu", "--out", str(out)])
    assert rc == 0
    text = (out / "general.md").read_text()
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in text.splitlines()[2:] if line.strip()}
    assert list(rows) == ["base", "epng", "full"]
    alone = _evaluate("minimoe", f"adapter={tmp_path / 'epng' / 'adapter'}", TaskManager(include_path=str(task_dir)),
                      ["tiny_mc"])
    assert rows["epng"] == pytest.approx(100 * alone["results"]["tiny_mc"]["acc,none"], abs=0.005)
    assert rows["epng"] == rows["full"]  # the adapter unmerged and its merged export score alike
    saved = json.loads((out / "general.json").read_text())
    assert set(saved) == {"base", "epng", "full"} and "adapter=" in saved["epng"]["model_args"]
    assert general.table({"base": {t: 50.0 for t in general.TASKS}}, list(general.TASKS)).count("50.17") == 3
    assert "epng-general" in capsys.readouterr().out
