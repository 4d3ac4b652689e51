"""Data specs (minimoe/sources.py): local JSON/JSONL/gzip/Parquet files and Hub datasets read from a Hub
cache laid out by hand (HF_HUB_OFFLINE=1: nothing is downloaded), the papers' record formats, filters,
and errors that name the spec, the file and the line."""

import gzip
import json
import sys
from pathlib import Path

import pytest

from minimoe.data.sources import DataError, read_records
from minimoe.data.dataset import read_pairs, record_to_pair

from minimoe.cli import eval as evaluate  # noqa: E402
from minimoe.cli import train as train  # noqa: E402

import pyarrow  # noqa: E402  (the test extra installs the parquet extra; its absence is tested by hiding it)
import pyarrow.parquet  # noqa: E402

# Rows as the datasets publish them (first rows of each; MATH's level/type fields as in hendrycks/MATH).
METAMATHQA = [
    {"query": "Gracie and Joe are choosing numbers on the complex plane. Joe chooses the point $1+2i$. Gracie "
              "chooses $-1+i$. How far apart are Gracie and Joe's points?",
     "response": "The distance between two points $(x_1,y_1)$ and $(x_2,y_2)$ in the complex plane is given by "
                 "the formula $\\sqrt{(x_2-x_1)^2+(y_2-y_1)^2}$.\nIn this case, Joe's point is $(1,2)$ and "
                 "Gracie's point is $(-1,1)$.\nSo the distance between their points is $\\sqrt{5}$.\n"
                 "The answer is: \\sqrt{5}",
     "type": "MATH_AugSV", "original_question": "Gracie and Joe are choosing numbers on the complex plane."},
    {"query": "What is the total cost of purchasing equipment for all sixteen players on the football team, "
              "considering that each player requires a $25 jersey, a $15.20 pair of shorts, and a pair of socks "
              "priced at $6.80?",
     "response": "Each player requires a $25 jersey, a $15.20 pair of shorts, and a pair of socks priced at "
                 "$6.80.\nSo the total cost for each player is $25 + $15.20 + $6.80 = $47.\nSince there are "
                 "sixteen players on the football team, the total cost for all of them is 16 * $47 = $752.\n"
                 "#### 752\nThe answer is: 752",
     "type": "GSM_Rephrased", "original_question": "A football team shares a single water cooler."},
]
GSM8K = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips to her "
                 "friends in May. How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
               "altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                 "How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
               "$<<0.2*50=10>>10.\n#### 10"},
]
CODE_ALPACA = [
    {"instruction": "Create an array of length 5 which contains all even numbers between 1 and 10.",
     "input": "", "output": "arr = [2, 4, 6, 8, 10]"},
    {"instruction": "Write a replace method for a string class which replaces the given string with a given set "
                    "of characters.",
     "input": "string = \"Hello World!\"\nreplace_with = \"Greetings!\"",
     "output": "def replace(self, replace_with):\n    new_string = \"\"\n    for char in self:\n        if char == "
               "\" \":\n            new_string += replace_with\n        else:\n            new_string += char\n"
               "    return new_string"},
]
MATH = [
    {"problem": "How many vertical asymptotes does the graph of $y=\\frac{2}{x^2+x-6}$ have?", "level": "Level 3",
     "type": "Algebra",
     "solution": "The denominator of the rational function factors into $x^2+x-6=(x-2)(x+3)$. Since the "
                 "numerator is always nonzero, there is a vertical asymptote whenever the denominator is $0$, "
                 "which occurs for $x = 2$ and $x = -3$.  Therefore, the graph has $\\boxed{2}$ vertical "
                 "asymptotes."},
    {"problem": "What is the positive difference between $120\\%$ of 30 and $130\\%$ of 20?", "level": "Level 1",
     "type": "Algebra",
     "solution": "One hundred twenty percent of 30 is $120\\cdot30\\cdot\\frac{1}{100}=36$, and $130\\%$ of 20 is "
                 "$ 130\\cdot 20\\cdot\\frac{1}{100}=26$.  The difference between 36 and 26 is $\\boxed{10}$."},
    {"problem": "If $x^2+y^2=1$, what is the largest possible value of $|x|+|y|$?", "level": "Level 5",
     "type": "Intermediate Algebra",
     "solution": "If $(x,y)$ lies on the circle, so does $(x,-y),$ $(-x,-y),$ and $(-x,-y),$ (which all give "
                 "the same value of $|x| + |y|$), so we can assume that $x \\ge 0$ and $y \\ge 0.$  Then "
                 "$|x| + |y| = x + y$, and the largest value is $\\boxed{\\sqrt{2}}$."},
    {"problem": "What is the least common multiple of 14 and 21?", "level": "Level 2", "type": "Prealgebra",
     "solution": "$14=2\\cdot7$ and $21=3\\cdot7$, so the least common multiple of 14 and 21 is "
                 "$2\\cdot3\\cdot7=\\boxed{42}$."},
]
HUMANEVAL = {
    "task_id": "HumanEval/0",
    "prompt": "from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
              "    \"\"\" Check if in given list of numbers, are any two numbers closer to each other than\n"
              "    given threshold.\n    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)\n    False\n"
              "    >>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)\n    True\n    \"\"\"\n",
    "entry_point": "has_close_elements",
    "canonical_solution": "    for idx, elem in enumerate(numbers):\n        for idx2, elem2 in enumerate(numbers):\n"
                          "            if idx != idx2:\n                distance = abs(elem - elem2)\n"
                          "                if distance < threshold:\n                    return True\n\n"
                          "    return False\n",
    "test": "\n\nMETADATA = {\n    'author': 'jt',\n    'dataset': 'test'\n}\n\n\ndef check(candidate):\n"
            "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True\n"
            "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False\n"
            "    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True\n",
}
SHA = "0123456789abcdef0123456789abcdef01234567"


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _parquet(path: Path, rows) -> Path:
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """``hub(repo_id, {path: bytes})``: a dataset snapshot in a Hub cache under tmp_path, laid out by hand as
    huggingface_hub lays it out (``datasets--OWNER--NAME/snapshots/<sha>/...`` and ``refs/main``), offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the environment once, at import: its constants are what it consults per call
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def add(repo_id: str, files: dict[str, bytes]) -> Path:
        root = cache / f"datasets--{repo_id.replace('/', '--')}"
        for name, content in files.items():
            path = root / "snapshots" / SHA / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / "main").write_text(SHA)
        return root

    return add


# --- local files --------------------------------------------------------------------------------------------
def test_every_local_format_reads_the_same_records_with_their_lines(tmp_path):
    rows = GSM8K
    array = tmp_path / "gsm8k.json"
    array.write_text(json.dumps(rows, indent=2))  # "[", "  {", ...: item 0 starts on line 2
    lines = tmp_path / "gsm8k.jsonl"
    lines.write_bytes(b"\n" + _jsonl(rows))  # a blank first line is skipped, yet counted
    gz = tmp_path / "gsm8k.jsonl.gz"
    gz.write_bytes(gzip.compress(_jsonl(rows)))
    array_gz = tmp_path / "gsm8k.json.gz"
    array_gz.write_bytes(gzip.compress(json.dumps(rows).encode()))
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + _jsonl(rows))

    assert read_records(str(array)) == [(f"{array}:2 (item 0)", rows[0]), (f"{array}:6 (item 1)", rows[1])]
    assert read_records(str(lines)) == [(f"{lines}:2", rows[0]), (f"{lines}:3", rows[1])]
    assert read_records(str(gz)) == [(f"{gz}:1", rows[0]), (f"{gz}:2", rows[1])]
    assert read_records(str(array_gz)) == [(f"{array_gz}:1 (item 0)", rows[0]), (f"{array_gz}:1 (item 1)", rows[1])]
    assert [r for _, r in read_records(str(bom))] == rows
    pairs = [(r["question"], r["answer"]) for r in rows]
    assert read_pairs(str(array)) == read_pairs(str(lines)) == read_pairs(str(gz)) == read_pairs(str(array_gz)) == pairs


def test_parquet_rows_are_records_named_by_row(tmp_path):
    path = _parquet(tmp_path / "test-00000-of-00001.parquet", MATH)
    assert read_records(str(path)) == [(f"{path}: row {i}", row) for i, row in enumerate(MATH)]
    bad = _parquet(tmp_path / "bad.parquet", [{"problem": "1+1?", "solution": 2}])
    with pytest.raises(DataError, match=rf"^{bad}: row 0: field 'solution' must be a string, got int 2$"):
        read_pairs(str(bad))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is no parquet file")
    with pytest.raises(DataError, match=rf"^{broken}: not a readable Parquet file"):
        read_records(str(broken))


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "train-00000-of-00001.parquet"
    path.write_bytes(b"PAR1" + bytes(16) + b"PAR1")
    with pytest.raises(DataError) as e:
        read_records(str(path))
    assert str(e.value) == f"{path}: reading Parquet needs pyarrow: pip install 'minimoe[parquet]'"


@pytest.mark.parametrize("content, message", [
    (b'[\n {"question": "a", "answer": "b"},\n {"question": "c", "answer": NaN}\n]',
     ":3 (item 1): NaN is not JSON (Python's json module accepts it; minimoe does not)"),
    (b'[\n {"question": "a", "answer": "b"},\n {"question": "c" "answer": "d"}\n]',
     ":3: malformed JSON (Expecting ',' delimiter at column 19)"),
    (b'[{"question": "a", "answer": "b"},\n]', ":2: malformed JSON (a trailing comma at column 1)"),
    (b'[{"question": "a", "answer": "b"} {"question": "c"}]', ":1: malformed JSON (expected ',' or ']' after an "
                                                              "item at column 35)"),
    (b'[{"question": "a", "answer": "b"}]\n[]', ":2: malformed JSON (extra data after the array at column 1)"),
    (b'[{"question": "a", "answer": "b"},\n 7]', ":2 (item 1): expected a JSON object, got int"),
    (b'[{"question": "a",\n "answer": "caf\xe9"}]', ":2: not UTF-8 (byte 0xe9 at column 16)"),
    (b'{"question": "a", "answer": "b"}\n{"question": 5, "answer": "b"}\n', ":2: field 'question' must be a "
                                                                          "string, got int 5"),
    (b'{"question": "a", "answer": "b"}\n[1]\n', ":2: expected a JSON object, got list"),
    (b"\n\n", ": the dataset is empty"),
])
def test_malformed_json_is_named_by_file_and_line(tmp_path, content, message):
    path = tmp_path / "data.json"
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        read_pairs(str(path))
    assert str(e.value) == f"{path}{message}"


def test_gzip_errors_name_the_file_and_line(tmp_path):
    gz = tmp_path / "latin1.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"prompt": "ok", "response": "fine"}\n{"prompt": "caf\xe9", "response": "x"}\n'))
    with pytest.raises(DataError, match=rf"^{gz}:2: not UTF-8 \(byte 0xe9 at column 16\)$"):
        read_pairs(str(gz))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(_jsonl(GSM8K))[:30])
    with pytest.raises(DataError, match=rf"^{cut}: not a readable gzip file"):
        read_records(str(cut))


def test_a_missing_file_or_a_bare_hub_name_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"^data file {tmp_path / 'none.jsonl'} does not exist$"):
        read_records(str(tmp_path / "none.jsonl"))
    with pytest.raises(FileNotFoundError) as e:
        read_records("meta-math/MetaMathQA")
    assert str(e.value) == ("data file meta-math/MetaMathQA does not exist; a Hub dataset is named "
                            "hf://datasets/OWNER/NAME/FILE, OWNER/NAME:FILE or OWNER/NAME@SPLIT")
    with pytest.raises(DataError, match="is a directory; name a data file"):
        read_records(str(tmp_path))


# --- formats and filters ----------------------------------------------------------------------------------
def test_the_papers_record_formats_map_to_prompt_and_response():
    assert record_to_pair(METAMATHQA[0], "m:1") == (METAMATHQA[0]["query"], METAMATHQA[0]["response"])
    assert record_to_pair(GSM8K[0], "g:1") == (GSM8K[0]["question"], GSM8K[0]["answer"])
    assert record_to_pair(CODE_ALPACA[0], "c:1") == (CODE_ALPACA[0]["instruction"], "arr = [2, 4, 6, 8, 10]")
    assert record_to_pair(CODE_ALPACA[1], "c:2") == (
        CODE_ALPACA[1]["instruction"] + "\n\nstring = \"Hello World!\"\nreplace_with = \"Greetings!\"",
        CODE_ALPACA[1]["output"])
    assert record_to_pair(MATH[0], "h:1") == (MATH[0]["problem"], MATH[0]["solution"])


def test_a_filter_keeps_the_algebra_subset_and_names_what_it_saw(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_bytes(_jsonl(MATH))
    algebra = read_records(str(path), ["type=Algebra"])
    assert algebra == [(f"{path}:1", MATH[0]), (f"{path}:2", MATH[1])]  # not Intermediate Algebra nor Prealgebra
    assert read_records(str(path), ["type=Algebra", "level=Level 1"]) == [(f"{path}:2", MATH[1])]  # keys: all
    either = read_records(str(path), ["level=Level 1", "level=Level 5"])  # one key twice: either value
    assert [r["level"] for _, r in either] == ["Level 1", "Level 5"]
    with pytest.raises(DataError) as e:
        read_records(str(path), ["type=algebra"])
    assert str(e.value) == (f"{path}: no record matches --data-filter type=algebra (values seen: type: 'Algebra', "
                            "'Intermediate Algebra', 'Prealgebra')")
    with pytest.raises(DataError, match=rf"^{path}:1: --data-filter subject=...: the record has no field 'subject' "
                                        r"\(fields: level, problem, solution, type\)$"):
        read_records(str(path), ["subject=algebra"])
    with pytest.raises(DataError, match=r"^--data-filter 'Algebra': expected KEY=VALUE \(e.g. type=Algebra\)$"):
        read_records(str(path), ["Algebra"])
    numbers = tmp_path / "n.jsonl"
    numbers.write_bytes(_jsonl([{"prompt": "a", "response": "b", "level": 5}, {"prompt": "c", "response": "d",
                                                                                "level": 3}]))
    assert [r["prompt"] for _, r in read_records(str(numbers), ["level=5"])] == ["a"]  # compared as JSON


# --- the Hub ----------------------------------------------------------------------------------------------
def test_hub_files_resolve_from_the_cache_offline(hub):
    hub("meta-math/MetaMathQA", {"MetaMathQA-395K.json": json.dumps(METAMATHQA, indent=4).encode()})
    url = "hf://datasets/meta-math/MetaMathQA/MetaMathQA-395K.json"
    assert read_records(url) == [(f"{url}:2 (item 0)", METAMATHQA[0]), (f"{url}:8 (item 1)", METAMATHQA[1])]
    assert read_records("meta-math/MetaMathQA:MetaMathQA-395K.json") == read_records(url)
    assert read_pairs(url) == [(r["query"], r["response"]) for r in METAMATHQA]
    pinned = f"hf://datasets/meta-math/MetaMathQA@{SHA}/MetaMathQA-395K.json"
    assert read_records(pinned)[1] == (f"{pinned}:8 (item 1)", METAMATHQA[1])
    hub("sahil2801/CodeAlpaca-20k", {"code_alpaca_20k.json": json.dumps(CODE_ALPACA).encode()})
    assert read_pairs("hf://datasets/sahil2801/CodeAlpaca-20k/code_alpaca_20k.json")[1][1] == CODE_ALPACA[1]["output"]


def test_a_split_is_found_by_name_and_directory(hub):
    test, train_rows = _jsonl(GSM8K[:1]), _jsonl(GSM8K)
    hub("openai/gsm8k", {"main/test-00000-of-00001.jsonl": test, "main/train-00000-of-00001.jsonl": train_rows,
                         "socratic/test-00000-of-00001.jsonl": test, "README.md": b"# GSM8K\n"})
    url = "hf://datasets/openai/gsm8k/main/test-00000-of-00001.jsonl"
    assert read_records("openai/gsm8k:main@test") == [(f"{url}:1", GSM8K[0])]
    assert len(read_records("openai/gsm8k:main/train-*.jsonl")) == 2  # a glob, matched against the repo's files
    with pytest.raises(DataError) as e:
        read_records("openai/gsm8k@test")
    assert str(e.value) == ("openai/gsm8k@test: split 'test' has files in several directories (main, socratic); "
                            "name one, e.g. openai/gsm8k:main@test")
    with pytest.raises(DataError) as e:
        read_records("openai/gsm8k:main@validation")
    assert str(e.value) == ("openai/gsm8k:main@validation: no data file of split 'validation' under main/ (files: "
                            "main/test-00000-of-00001.jsonl, main/train-00000-of-00001.jsonl)")
    hub("me/mixed", {"data/gsm8k_test.jsonl": test, "data/latest.jsonl": train_rows, "test/part-0.jsonl": test})
    with pytest.raises(DataError, match=r"several directories \(data, test\)"):  # latest.jsonl is no test file
        read_records("me/mixed@test")
    assert len(read_records("me/mixed:data@test")) == 1


def test_a_hub_split_in_parquet_as_the_hub_publishes_it(hub, tmp_path):
    files = {}
    for split, rows in (("test", MATH), ("train", MATH[:2])):
        files[f"algebra/{split}-00000-of-00001.parquet"] = _parquet(tmp_path / f"{split}.parquet", rows).read_bytes()
    hub("EleutherAI/hendrycks_math", files)
    records = read_records("EleutherAI/hendrycks_math:algebra@test", ["type=Algebra"])
    url = "hf://datasets/EleutherAI/hendrycks_math/algebra/test-00000-of-00001.parquet"
    assert records == [(f"{url}: row 0", MATH[0]), (f"{url}: row 1", MATH[1])]


def test_hub_errors_name_the_spec_and_file(hub):
    hub("openai/gsm8k", {"main/test-00000-of-00001.jsonl": _jsonl(GSM8K) + b'{"question": "q", "answer": 4}\n'})
    url = "hf://datasets/openai/gsm8k/main/test-00000-of-00001.jsonl"
    with pytest.raises(DataError, match=rf"^{url}:3: field 'answer' must be a string, got int 4$"):
        read_pairs("openai/gsm8k:main@test")
    with pytest.raises(DataError, match=r"^hf://datasets/openai/gsm8k/main/nope.jsonl: HF_HUB_OFFLINE=1 and the file "
                                        r"is not in the Hub cache \("):
        read_records("openai/gsm8k:main/nope.jsonl")
    with pytest.raises(DataError, match=r"^someone/absent@train: HF_HUB_OFFLINE=1 and dataset someone/absent is not "
                                        r"in the Hub cache \("):
        read_records("someone/absent@train")
    with pytest.raises(DataError, match=r"^hf://datasets/openai/gsm8k: a Hub dataset file is written "
                                        r"hf://datasets/OWNER/NAME/PATH"):
        read_records("hf://datasets/openai/gsm8k")


# --- the commands -----------------------------------------------------------------------------------------
def test_train_runs_on_a_hub_dataset_with_a_filter(hub, tmp_path, capsys):
    hub("hendrycks/competition_math", {"train.jsonl": _jsonl(MATH)})
    run = tmp_path / "run"
    assert train.main(["--policy", "dmep", "--model", "tiny-qwen3", "--steps", "2", "--eval-limit", "0",
                       "--batch-size", "2", "--data", "hendrycks/competition_math:train.jsonl",
                       "--data-filter", "type=Algebra", "--out", str(run)]) == 0
    info = json.loads((run / "checkpoint/trainer.json").read_text())
    assert info["step"] == 2 and info["data"]["size"] == 2  # the two Algebra problems of four
    args = json.loads((run / "args.json").read_text())
    assert args["data"] == "hendrycks/competition_math:train.jsonl" and args["data_filter"] == ["type=Algebra"]
    assert train.main(["--resume", str(run), "--steps", "3"]) == 0  # the saved spec and filter: the same 2 examples
    assert json.loads((run / "checkpoint/trainer.json").read_text())["step"] == 3
    assert train.main(["--policy", "lora", "--model", "tiny-qwen3", "--steps", "1", "--eval-limit", "0",
                       "--data", "hendrycks/competition_math:train.jsonl", "--data-filter", "type=Geometry",
                       "--out", str(tmp_path / "none")]) == 2
    assert "no record matches --data-filter type=Geometry (values seen: type: 'Algebra', 'Intermediate " \
           "Algebra', 'Prealgebra')" in capsys.readouterr().err


def test_eval_reads_humaneval_jsonl_gz_as_distributed_and_filters_problems(hub, tmp_path, capsys):
    data = tmp_path / "HumanEval.jsonl.gz"
    data.write_bytes(gzip.compress(_jsonl([HUMANEVAL])))
    samples = tmp_path / "samples.jsonl"
    samples.write_bytes(_jsonl([{"task_id": "HumanEval/0", "completion": HUMANEVAL["canonical_solution"]},
                                {"task_id": "HumanEval/0", "completion": "    return False\n"}]))
    assert evaluate.main(["--task", "humaneval", "--data", str(data), "--completions", str(samples), "--k", "1",
                          "--timeout", "5", "--out", str(tmp_path / "he")]) == 0
    assert json.loads((tmp_path / "he/summary.json").read_text())["pass@1"] == pytest.approx(0.5)
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress(_jsonl([HUMANEVAL]) + b'{"task_id": "caf\xe9"}\n'))
    assert evaluate.main(["--task", "humaneval", "--data", str(bad), "--completions", str(samples),
                          "--out", str(tmp_path / "bad")]) == 2
    assert f"{bad}:2: not UTF-8 (byte 0xe9 at column 17)" in capsys.readouterr().err
    # MATH-algebra from a Hub copy of the whole test set: the filter comes before --limit
    hub("hendrycks/competition_math", {"test.jsonl": _jsonl(MATH)})
    answers = tmp_path / "answers.jsonl"
    answers.write_bytes(_jsonl([{"index": 0, "completion": "so $\\boxed{2}$"},
                                {"index": 1, "completion": "$\\boxed{11}$"}]))
    assert evaluate.main(["--task", "math", "--data", "hendrycks/competition_math:test.jsonl", "--data-filter",
                          "type=Algebra", "--completions", str(answers), "--out", str(tmp_path / "math")]) == 0
    summary = json.loads((tmp_path / "math/summary.json").read_text())
    assert summary["exact_match"] == 0.5 and summary["problems"] == 2


def test_online_a_split_is_listed_by_the_hub_and_failures_are_named(hub, tmp_path, monkeypatch):
    """Online (HF_HUB_OFFLINE unset), with huggingface_hub's two calls stubbed (no network in tests): the
    repo listing picks the split's files, an unreachable Hub falls back to the cached snapshot, and the
    Hub's own errors become one line."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    test = tmp_path / "test.jsonl"
    test.write_bytes(_jsonl(GSM8K))
    calls = []

    def download(repo_id, filename, repo_type=None, revision=None):
        calls.append((repo_id, filename, repo_type, revision))
        return str(test)

    listing = ["README.md", "main/test-00000-of-00001.parquet", "main/train-00000-of-00001.parquet"]
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, repo_type, revision: listing)
    url = "hf://datasets/openai/gsm8k/main/test-00000-of-00001.parquet"
    assert read_records("openai/gsm8k@test")[0] == (f"{url}:1", GSM8K[0])
    assert calls == [("openai/gsm8k", "main/test-00000-of-00001.parquet", "dataset", None)]

    def unreachable(self, repo_id, repo_type, revision):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", unreachable)
    hub("openai/gsm8k", {"main/test-00000-of-00001.jsonl": _jsonl(GSM8K)})
    calls.clear()
    assert len(read_records("openai/gsm8k:main@test")) == 2  # the cached snapshot's files
    assert calls == [("openai/gsm8k", "main/test-00000-of-00001.jsonl", "dataset", None)]
    with pytest.raises(DataError, match=r"^other/set@test: the Hub cannot be reached \(ConnectionError\) and "
                                        r"dataset other/set is not in the Hub cache"):
        read_records("other/set@test")

    class RepositoryNotFoundError(Exception):  # huggingface_hub's errors are told apart by class name
        pass

    class GatedRepoError(RepositoryNotFoundError):
        pass

    def missing(*args, **kwargs):
        raise RepositoryNotFoundError("404")

    def gated(*args, **kwargs):
        raise GatedRepoError("403")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", missing)
    with pytest.raises(DataError) as e:
        read_records("nobody/nothing@train")
    assert str(e.value) == "nobody/nothing@train: no dataset nobody/nothing on the Hub (a private one needs a " \
                           "login: hf auth login)"
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(DataError) as e:
        read_records("hf://datasets/cais/mmlu/all/test-00000-of-00001.parquet")
    assert str(e.value) == ("hf://datasets/cais/mmlu/all/test-00000-of-00001.parquet: dataset cais/mmlu is gated: "
                            "accept its terms on the Hub, then log in (hf auth login)")


@pytest.mark.slow
def test_the_environment_alone_points_at_the_cache(hub, tmp_path):
    """In a fresh process, HF_HUB_CACHE and HF_HUB_OFFLINE=1 from the environment are all it takes."""
    import subprocess

    hub("meta-math/MetaMathQA", {"MetaMathQA-395K.json": json.dumps(METAMATHQA).encode()})
    code = ("from minimoe.data.sources import read_records; "
            "print(len(read_records('meta-math/MetaMathQA:MetaMathQA-395K.json')))")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf-home"),
           "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and done.stdout == "2\n", done.stderr
