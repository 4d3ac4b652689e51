"""The installed form: the ``minimoe`` command and its subcommands, the shipped weights found through the
package (and in the wheel), nothing that trains or evaluates importing transformers, and the module names of
earlier versions (``python -m minimoe.bench`` ...) still running their commands."""

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import minimoe
from minimoe import cli
from minimoe.model import shipped as shipped_module
from minimoe.train.config import resolve

PACKAGE = Path(minimoe.__file__).resolve().parent
ROOT = PACKAGE.parent
REFERENCE_LIBRARIES = ("transformers", "peft", "accelerate")
OLD_MODULES = ("bench", "check", "convert", "export", "plan", "plan_check", "plots", "reproduce", "scaling", "tiny")


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_subcommand_answers_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: minimoe {name} ")


def test_the_command_lists_its_subcommands_and_refuses_an_unknown_one(capsys):
    assert cli.main([]) == 2
    listing = capsys.readouterr().out
    assert all(f"\n  {name} " in listing for name in cli.COMMANDS)
    assert cli.main(["trian"]) == 2 and "unknown subcommand 'trian'" in capsys.readouterr().err
    assert cli.main(["--version"]) == 0 and capsys.readouterr().out == f"minimoe {minimoe.__version__}\n"


@pytest.mark.slow
def test_python_m_minimoe_and_every_old_module_name_run_the_same_commands():
    out = subprocess.run([sys.executable, "-m", "minimoe", "plan", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("usage: minimoe plan ")
    # python -m minimoe.X for every X of earlier versions, in one interpreter (runpy is what -m runs)
    code = ("import runpy, sys\n"
            f"for name in {OLD_MODULES!r}:\n"
            "    sys.argv = [name, '--help']\n"
            "    try:\n"
            "        runpy.run_module('minimoe.' + name, run_name='__main__', alter_sys=True)\n"
            "    except SystemExit as e:\n"
            "        print('@@', name, e.code, flush=True)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert [line for line in done.stdout.splitlines() if line.startswith("@@")] == [f"@@ {n} 0" for n in OLD_MODULES]
    assert done.stdout.count("usage: minimoe ") == len(OLD_MODULES)
    import minimoe.plan
    import minimoe.tools.plan

    assert minimoe.plan is minimoe.tools.plan  # old imports get the moved module itself


@pytest.mark.slow
@pytest.mark.parametrize("script, usage", [("train.py", "usage: minimoe train "), ("eval.py", "usage: minimoe eval ")])
def test_the_clones_train_py_and_eval_py_are_the_same_commands(script, usage):
    done = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, check=True,
                          cwd=ROOT.parent)
    assert done.stdout.startswith(usage)


def _imports_of(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module or "")
    return names


def test_no_module_of_the_package_imports_the_reference_libraries_and_the_routes_only_inside_functions():
    importers = {f.relative_to(PACKAGE).as_posix() for f in PACKAGE.rglob("*.py")
                 if any(n.split(".")[0] in REFERENCE_LIBRARIES for n in _imports_of(ast.parse(f.read_text())))}
    assert importers == set()
    routes = ROOT / "benchmarks" / "reference_routes.py"  # outside the package, found by tools/bench/reference.py
    module = ast.parse(routes.read_text())
    assert {n.split(".")[0] for n in _imports_of(module)} >= {"transformers", "peft"}
    top_level = [n for n in module.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not any(n.split(".")[0] in REFERENCE_LIBRARIES for n in _imports_of(ast.Module(top_level, [])))
    from minimoe.tools.bench import reference

    assert reference.routes_file() == routes and reference.unavailable() is None  # a clone with the bench extra


def test_without_the_routes_file_the_transformers_routes_are_unavailable_and_say_where_it_is(tmp_path, monkeypatch):
    from minimoe.tools.bench import reference

    monkeypatch.setenv(reference.ENV, str(tmp_path / "none.py"))  # as a wheel install, with no clone beside it
    assert "benchmarks/reference_routes.py of a clone" in reference.unavailable()


@pytest.mark.slow
def test_nothing_that_trains_or_evaluates_imports_the_reference_libraries():
    modules = ["minimoe", "minimoe.cli", "minimoe.cli.train", "minimoe.train.trainer", "minimoe.cli.eval",
               "minimoe.tools.export_adapter", "minimoe.tools.convert", "minimoe.tools.plan", "minimoe.tools.bench.run"]
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {REFERENCE_LIBRARIES!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_shipped_models_are_found_by_name_through_the_package():
    for name in shipped_module.SHIPPED:
        assert shipped_module.shipped(name) == PACKAGE / "weights" / name
        assert shipped_module.shipped_name(name) == name
        assert shipped_module.shipped_name(str(ROOT / "weights" / name)) == name  # a clone's path before 2026-12-06
    by_name, by_path = minimoe.from_pretrained("tiny-moe"), minimoe.from_pretrained(PACKAGE / "weights" / "tiny-moe")
    assert by_name.config.model_type == "olmoe" and by_name.num_parameters() == by_path.num_parameters()
    old_path = ROOT / "weights" / "tiny-dense"  # as runs and adapters saved before 2026-12-06 record it
    assert minimoe.load_tokenizer("tiny-dense").vocab_size == minimoe.load_tokenizer(old_path).vocab_size
    assert shipped_module.shipped_name("tiny-olmoe") is None  # a random preset is not a shipped model


@pytest.mark.parametrize("argv, said", [
    (["--policy", "epng"], "error: the default base: the shipped model tiny-moe is incomplete"),
    (["--policy", "lora", "--model", "tiny-dense"], "error: the shipped model tiny-dense is incomplete"),
])
def test_a_missing_shipped_model_is_an_error_naming_it_never_a_random_model(tmp_path, monkeypatch, capsys, argv, said):
    monkeypatch.setattr(shipped_module, "WEIGHTS", tmp_path / "weights")
    with pytest.raises(SystemExit) as e:
        resolve(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and said in err and "config.json, model.safetensors, tokenizer.json" in err
    with pytest.raises(FileNotFoundError, match="tiny-moe is incomplete"):
        minimoe.from_pretrained("tiny-moe")


@pytest.mark.slow
def test_the_wheel_holds_the_shipped_weights_the_routes_finder_and_the_command_but_not_the_routes(tmp_path):
    source = tmp_path / "source"  # a copy: setuptools writes build/ and *.egg-info/ next to the sources
    shutil.copytree(PACKAGE, source / "minimoe", ignore=shutil.ignore_patterns("__pycache__"))
    for file in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / file, source / file)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("minimoe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for model in shipped_module.SHIPPED:
        for file in (PACKAGE / "weights" / model).iterdir():
            assert f"minimoe/weights/{model}/{file.name}" in names
    assert {"minimoe/__main__.py", "minimoe/tools/bench/reference.py",
            "minimoe/model/shapes/allenai--OLMoE-1B-7B-0125.json"} <= names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "minimoe = minimoe.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    assert not any(n.startswith(("tests/", "weights/", "benchmarks/")) for n in names)
