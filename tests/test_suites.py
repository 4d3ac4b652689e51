"""The papers' analyses: the built-in tiny-mix task, ``minimoe reproduce --suite`` (real runs, shortened) and
the full-scale sweeps of ``minimoe train --recipe SWEEP``."""

import dataclasses
import re
import statistics
import subprocess
from pathlib import Path

import pytest

from minimoe.cli import train
from minimoe.data.builtin import MIX_SKILLS, builtin_split, mix_skill, tiny_mix_split
from minimoe.data.dataset import load_pairs
from minimoe.eval.tasks import get_task
from minimoe.policies import POLICIES
from minimoe.tools import reproduce, suites
from minimoe.train.config import resolve
from minimoe.train.recipes import RECIPES, Recipe
from minimoe.train.run_dir import RunDir
from minimoe.train.sweeps import SWEEPS, Sweep

PNG = b"\x89PNG"


def _numbers(text):
    return [int(x) for x in re.findall(r"\d+", text)]


def _solve(question: str) -> int:
    """Each tiny-mix skill solved from its question alone (the answers must be right, not only consistent)."""
    skill, nums = mix_skill(question), _numbers(question)
    if skill == "arith3":
        a, b, c, d = nums
        return a + b - c + d
    if skill == "range":
        return max(nums) - min(nums)
    if skill == "lookup":
        table = dict(re.findall(r"(\w+)=(\d+)", question))
        x, y = re.search(r"What is (\w+) plus (\w+)\?", question).groups()
        return int(table[x]) + int(table[y])
    words, x, y = re.fullmatch(r"Words: (.*)\. How many are (\w+) or (\w+)\?", question).groups()
    return sum(w in (x, y) for w in words.split())


def test_tiny_mix_is_fixed_disjoint_balanced_and_correct():
    train_, test = tiny_mix_split("train"), tiny_mix_split("test")
    assert (len(train_), len(test)) == (1024, 200) and not {q for q, _ in train_} & {q for q, _ in test}
    assert load_pairs("tiny-mix", seed=0) == load_pairs("tiny-mix", seed=5) == train_  # seeds vary the run alone
    assert builtin_split("tiny-mix", "test", seed=3) == test
    for part in (train_, test):
        counts = {s: sum(mix_skill(q) == s for q, _ in part) for s in MIX_SKILLS}
        assert min(counts.values()) >= len(part) / 4 * 0.75, counts  # four skills, drawn alike
    for question, answer in train_ + test:
        assert int(answer.rsplit("####", 1)[1]) == _solve(question), (question, answer)
        assert all(0 <= n <= 20 for n in _numbers(answer.split("####")[0])), answer  # the facts the base learned
    rows = get_task("tiny-mix").rows(None)
    assert [(r["question"], r["answer"]) for r in rows] == test


@pytest.mark.parametrize("name", ["epng-fig3", "epng-fig5", "dmep-table2"])
def test_every_point_of_a_suite_is_the_run_it_names(name):
    rows = suites.suite_rows(name)
    for key, row in rows.items():
        c = resolve([*row.argv(), "--steps", "300"])
        assert c.divergence_factor == 0, key  # a point's run trains on to its end whatever its loss does
        assert (c.policy, Path(c.model).name, c.data) == (row.policy, row.model, row.data), key
        resolved = dataclasses.asdict(POLICIES[c.policy].Config(**c.policy_options))  # as args.json saves them
        for option, value in row.options.items():
            got = resolved[option]
            assert (list(got) if isinstance(got, tuple) else got) == value, (key, option)
    if name == "epng-fig3":  # the panels' points share runs where they are the same run
        assert rows["epng-r8"] == rows[suites.fraction_key(0.2)] and len(rows) == 16
        assert {rows[f"epng-r{r}"].options["rank"] for r in suites.RANKS} == set(suites.RANKS)
    if name == "dmep-table2":
        assert {rows[suites.tau_key(t)].options["tau"] for t in suites.TAUS} == {0.05, 0.1, 0.15, 0.2}
        assert suites.symmetric(3).options == {"num_experts": 3, "prune_step": -1}


def _shorten_epng(monkeypatch):
    """EPnG's events within a few steps (the suites' points keep their own options)."""
    full = suites.epng
    monkeypatch.setattr(suites, "epng", lambda *a, **k: dataclasses.replace(
        full(*a, **k), options={**full(*a, **k).options, "warmup": 4, "interval": 4, "probe_batches": 1}))
    monkeypatch.setattr(suites, "EVAL_LIMIT", 8)


@pytest.mark.slow
def test_epng_fig3_runs_its_three_panels_and_reuses_its_runs(tmp_path, monkeypatch, capsys):
    _shorten_epng(monkeypatch)
    monkeypatch.setattr(suites, "RANKS", (2, 8))
    monkeypatch.setattr(suites, "FRACTIONS", (0.2, 0.5))
    out = tmp_path / "fig3"
    argv = ["--suite", "epng-fig3", "--seeds", "1", "--steps", "10", "--out", str(out)]
    assert reproduce.main(argv) == 0
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert runs == sorted(f"{k}-seed0" for k in ("lora-r8", "epng-r8", "epng-grow-only", "epng-prune-only", "lora-r2",
                                                  "epng-r2", "epng-f0.5"))
    summary = {k: RunDir(out / f"{k}-seed0", writer=False).summary() for k in ("lora-r8", "epng-r8", "epng-grow-only",
                                                                               "epng-prune-only")}
    params = {k: s["trainable_parameters"] for k, s in summary.items()}
    # events at steps 4 and 8: grow-only ends over the budget, prune-only under it, prune-and-grow on it
    assert params["epng-prune-only"] < params["epng-r8"] == params["lora-r8"] < params["epng-grow-only"]
    table = (out / "table.md").read_text()
    for name, key in suites.ABLATION.items():
        score = summary[key]["task_score_after"]
        assert f"| {name} | {params[key]:,} | {score:.3f} ± 0.000 | {suites.EPNG_FIG3A[name]:.2f} |" in table
    assert "| 2 |" in table and "| 0.5 |" in table and "7 runs (0 reused), 10 steps each, 1 seed" in table
    spent = sum((p / "summary.json").stat().st_mtime - (p / "args.json").stat().st_mtime for p in out.iterdir()
                if p.is_dir()) / 60
    assert f"the runs took {spent:.1f} minutes in all" in table
    assert all((out / f).read_bytes().startswith(PNG) for f in ("fig3a_ablation.png", "fig3b_rank.png",
                                                               "fig3c_fraction.png"))
    assert reproduce.main(argv) == 2  # the runs exist: refused, not replaced
    assert "pass --overwrite to replace them, or --reuse" in capsys.readouterr().err
    before = {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")}
    assert reproduce.main([*argv, "--reuse"]) == 0
    assert "7 runs (7 reused)" in (out / "table.md").read_text()
    # Fig. 5 draws the loss curves of two of these runs: reused too
    assert reproduce.main(["--suite", "epng-fig5", "--seeds", "1", "--steps", "10", "--out", str(out), "--reuse"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")} == before
    table = (out / "table.md").read_text()
    assert "2 runs (2 reused)" in table and (out / "fig5_loss.png").read_bytes().startswith(PNG)
    for name, key, events in (("static LoRA", "lora-r8", 0), ("EPnG", "epng-r8", 2)):  # EPnG's at steps 4 and 8
        run = RunDir(out / f"{key}-seed0", writer=False)
        assert sum(e["event"] == "prune_grow" for e in run.events()) == events
        metrics = run.metrics()
        assert len(metrics) == 10  # the final loss: the mean over the last 10% of the steps, one here
        score = summary[key]["task_score_after"]
        assert f"| {name} | {metrics[-1]['loss']:.3f} ± 0.000 | {score:.3f} ± 0.000 | {events} |" in table


@pytest.mark.slow
def test_dmep_table2_matches_the_symmetric_baseline_to_dmeps_survivors(tmp_path, monkeypatch):
    full = suites.dmep
    monkeypatch.setattr(suites, "dmep", lambda **o: full(**{**o, "prune_step": 3} if o.get("prune_step") == 0 else o))
    monkeypatch.setattr(suites, "TAUS", (0.1, 0.6))
    monkeypatch.setattr(suites, "EVAL_LIMIT", 5)
    out = tmp_path / "t2"
    assert reproduce.main(["--suite", "dmep-table2", "--seeds", "1", "--steps", "6", "--out", str(out)]) == 0
    kept = {name: len(s) for e in RunDir(out / "dmep-tau0.1-seed0", writer=False).events()
            if e["event"] == "dmep_prune" for name, s in e["survivors"].items()}
    assert len(kept) == 28  # 7 linears x 4 layers
    k = max(2, round(statistics.mean(kept.values())))
    args = RunDir(out / f"symmetric-k{k}-seed0", writer=False).args()
    assert args["policy_options"]["num_experts"] == k and args["policy_options"]["prune_step"] == -1
    params = {key: RunDir(out / f"{key}-seed0", writer=False).summary()["trainable_parameters"]
              for key in ("lora-moe", f"symmetric-k{k}", "dmep-tau0.6", "dense-lora")}
    # a LoRA-MoE's size is linear in its expert count (no shared part): E=k is k/8 of E=8; tau=0.6 leaves the
    # floor of two experts in every module
    assert params[f"symmetric-k{k}"] * 8 == params["lora-moe"] * k and params["dmep-tau0.6"] * 4 == params["lora-moe"]
    table = (out / "table.md").read_text()
    assert f"| Symmetric MoE (E={k}) | – | {k} | {params[f'symmetric-k{k}']:,} |" in table
    assert f"| DMEP | 0.6 | 2.00 | {params['dmep-tau0.6']:,} |" in table
    assert f"| DMEP | 0.1 | {statistics.mean(kept.values()):.2f} |" in table
    assert "| Symmetric MoE (E=8) | – | 8 | 761,856 |" in table and "42.7M, 1,368, 91.32%" in table
    assert "5 runs (0 reused)" in table
    assert all((out / f).read_bytes().startswith(PNG) for f in ("table2_survivors.png", "table2_tradeoff.png"))


def test_each_sweep_point_is_its_recipe_moved_along_the_axis():
    fig3 = SWEEPS["epng-fig3-olmoe-math"]
    c = resolve(fig3.command("epng-r16", "runs/x"))
    assert (c.recipe, c.policy_options["rank"], c.out) == ("epng-olmoe-math", 16, "runs/x")
    c = resolve(fig3.command("epng-f0.4", "runs/x"))
    assert (c.policy_options["alpha"], c.policy_options["beta"], c.steps, c.lr) == (0.4, 0.4, 500, 1e-4)
    assert resolve(fig3.command("epng-grow-only", "o")).policy_options["mode"] == "grow-only"
    assert resolve(fig3.command("lora-r2", "o")).policy_options["rank"] == 2
    table2 = SWEEPS["dmep-table2-qwen3-0.6b-scienceqa"]
    for tau in (0.05, 0.1, 0.15, 0.2):
        options = resolve(table2.command(f"tau{tau:g}", "o")).policy_options
        assert (options["tau"], options["prune_step"]) == (tau, 100)  # Table II: pruned at step 100
    options = resolve(table2.command("symmetric-e4", "o")).policy_options
    assert (options["num_experts"], options["prune_step"]) == (4, -1)
    assert resolve(table2.command("prune-step250", "o")).policy_options["prune_step"] == 250
    for sweep in SWEEPS.values():
        for point in sweep.points:
            resolve(sweep.command(point, "o"))  # every point is a valid run


def test_a_sweeps_plan_prints_one_command_per_point_with_its_memory(capsys):
    assert train.main(["--recipe", "dmep-table2-qwen3-0.6b-scienceqa", "--plan", "--gpu-memory", "24GB",
                       "--batch-size", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    commands = [line for line in lines if line.startswith("minimoe train")]
    memory = [line for line in lines if line.startswith("# ")]
    assert len(commands) == len(memory) == 8
    assert all("--batch-size 4" in c and " && minimoe eval --recipe " in c for c in commands)
    assert all(re.fullmatch(r"# [\w.-]+: \d+\.\d\d GiB per GPU \((fits|does NOT fit)\)", m) for m in memory)
    assert "--dmep-tau 0.15 --dmep-prune-step 100 --batch-size 4 --out runs/dmep-table2-qwen3-0.6b-scienceqa/tau0.15" \
        in "\n".join(commands)


@pytest.fixture
def tiny_sweep(monkeypatch):
    """A sweep over a recipe on the shipped tiny-dense, its points run in this process."""
    recipe = Recipe("tiny-dmep", "test", "-", {"policy": "dmep", "model": "tiny-dense", "data": "tiny-arith",
                                               "steps": 3, "batch_size": 4, "eval_limit": 0})
    monkeypatch.setitem(RECIPES, recipe.name, recipe)
    sweep = Sweep("tiny-sweep", "test", "-", {"tau0.1": ("tiny-dmep", ("--dmep-tau", "0.1")),
                                             "e4": ("tiny-dmep", ("--dmep-num-experts", "4"))})
    monkeypatch.setitem(SWEEPS, sweep.name, sweep)
    started = []

    def run_here(cmd, **kwargs):
        started.append(cmd[cmd.index("--out" if "--out" in cmd else "--resume") + 1])
        return subprocess.CompletedProcess(cmd, train.main(cmd[cmd.index("train") + 1:]))

    from minimoe.cli import sweep as cli_sweep

    monkeypatch.setattr(cli_sweep.subprocess, "run", run_here)
    return started


def test_a_sweep_runs_its_points_in_turn_and_keeps_finished_ones(tmp_path, tiny_sweep, capsys):
    out = tmp_path / "sw"
    assert train.main(["--recipe", "tiny-sweep", "--out", str(out), "--lr", "1e-3"]) == 0
    assert tiny_sweep == [str(out / "tau0.1"), str(out / "e4")]
    assert RunDir(out / "e4", writer=False).args()["policy_options"]["num_experts"] == 4
    assert RunDir(out / "tau0.1", writer=False).args()["lr"] == 1e-3  # other flags reach every point
    assert train.main(["--recipe", "tiny-sweep", "--out", str(out)]) == 0
    assert len(tiny_sweep) == 2 and capsys.readouterr().out.count("kept") == 2  # finished: nothing reruns
    (out / "e4" / "summary.json").unlink()  # killed after its last checkpoint: it resumes, nothing else reruns
    assert train.main(["--recipe", "tiny-sweep", "--out", str(out)]) == 0
    assert tiny_sweep[2:] == [str(out / "e4")] and "--resume" in capsys.readouterr().out
    assert RunDir(out / "e4", writer=False).summary()["steps"] == 3
    (out / "late").mkdir()
    (out / "late" / "notes.txt").write_text("mine")  # neither a run nor a checkpoint: refused before anything
    late = Sweep("tiny-sweep", "test", "-", {**SWEEPS["tiny-sweep"].points, "late": ("tiny-dmep", ())})
    SWEEPS["tiny-sweep"] = late
    assert train.main(["--recipe", "tiny-sweep", "--out", str(out)]) == 2
    assert f"{out / 'late'} already hold files" in capsys.readouterr().err and len(tiny_sweep) == 3
    assert train.main(["--recipe", "tiny-sweep", "--out", str(out), "--point", "late", "--overwrite"]) == 0
    assert tiny_sweep[3:] == [str(out / "late")] and not (out / "late" / "notes.txt").exists()
    with pytest.raises(SystemExit):
        train.main(["--recipe", "tiny-sweep", "--point", "nope"])
    assert "not a point of tiny-sweep (its points: tau0.1, e4, late)" in capsys.readouterr().err


def test_a_sweep_named_in_a_toml_file_says_how_to_run_it(tmp_path, capsys):
    (tmp_path / "run.toml").write_text('[train]\nrecipe = "epng-fig5"\n')
    with pytest.raises(SystemExit):
        resolve(["--config", str(tmp_path / "run.toml")])
    assert "'epng-fig5' is a sweep, one run per point: run it as minimoe train --recipe epng-fig5" in \
        capsys.readouterr().err


def test_a_closed_output_pipe_stops_the_command_without_a_traceback():
    """``minimoe train --recipe SWEEP --plan | head -1``: the reader leaves before the command is done."""
    import sys

    proc = subprocess.Popen([sys.executable, "-u", "-m", "minimoe", "train", "--recipe",
                             "dmep-table2-qwen3-0.6b-scienceqa", "--plan"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("dmep-table2-qwen3-0.6b-scienceqa: DMEP Table II")
    proc.stdout.close()  # the memory of each point is computed after the first line: the next print hits a closed pipe
    err = proc.stderr.read()
    assert proc.wait() == 141 and "Traceback" not in err
    assert err.strip() == "minimoe train: stopped, its output pipe was closed (Broken pipe)"
