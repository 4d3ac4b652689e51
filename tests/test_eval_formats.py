"""The benchmarks' own formats: MetaMathQA-style answers on GSM8K and MATH, the MATH grader (math-verify or
Hendrycks' normalisation, reported in summary.json), and multiple-choice rows of ARC, OpenBookQA, ScienceQA
and MMLU as distributed (row shapes copied from the published files; nothing is downloaded)."""

import json
import sys
import types
from pathlib import Path

import pytest

from minimoe.eval import scoring
from minimoe.data.mc_rows import mc_rows
from minimoe.eval.tasks import get_task
from minimoe.eval.scoring import extract_gsm8k, final_answer, gsm8k_correct, math_correct, math_grader

from minimoe.cli import eval as evaluate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# MetaMathQA responses (meta-math/MetaMathQA, rows of type MATH_AnsAug, GSM_AnsAug, GSM_Rephrased), verbatim
GRACIE = ("The distance between two points $(x_1,y_1)$ and $(x_2,y_2)$ in the complex plane is given by the formula "
          "$\\sqrt{(x_2-x_1)^2+(y_2-y_1)^2}$.\nIn this case, Joe's point is $(1,2)$ and Gracie's point is $(-1,1)$.\n"
          "So the distance between their points is $\\sqrt{((-1)-(1))^2+((1)-(2))^2}=\\sqrt{(-2)^2+(-1)^2}="
          "\\sqrt{4+1}=\\sqrt{5}$.\nTherefore, Gracie and Joe's points are $\\boxed{\\sqrt{5}}$ units apart.\n"
          "The answer is: \\sqrt{5}")
BELIZE = ("One fourth of the town's homes are white, so there are 400/4 = 100 white homes.\nThe remaining non-white "
          "homes are 400 - 100 = 300 homes.\nOne fifth of the non-white homes have a fireplace, so there are 300/5 = "
          "60 non-white homes with a fireplace.\nTherefore, the number of non-white homes without a fireplace is "
          "300 - 60 = 240.\n#### 240\nThe answer is: 240")
FOOTBALL = ("Each player requires a $25 jersey, a $15.20 pair of shorts, and a pair of socks priced at $6.80.\n"
            "So the total cost for each player is $25 + $15.20 + $6.80 = $47.\nSince there are sixteen players on "
            "the football team, the total cost for all of them is 16 * $47 = $752.\nThe answer is: 752")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def no_math_verify(monkeypatch):
    """math-verify made unimportable, as where the extra is not installed."""
    monkeypatch.setitem(sys.modules, "math_verify", None)


# --- answers: "The answer is:", \boxed, ####, and which one counts ------------------------------------------

def test_metamathqa_answers_are_read_on_gsm8k_and_math():
    assert extract_gsm8k(BELIZE) == "240" and extract_gsm8k(FOOTBALL) == "752"
    assert gsm8k_correct(FOOTBALL, "The treasurer ... 16 * 47 = <<16*47=752>>752\n#### 752")
    assert final_answer(GRACIE) == "\\sqrt{5}" and math_correct(GRACIE, "\\sqrt{5}")
    assert math_correct("So $x = 4$.\nThe answer is: 4", "We solve ... $x = \\boxed{4}$.")  # a MATH solution
    assert not math_correct("The answer is: 5", "\\sqrt{5}") and not gsm8k_correct(FOOTBALL, "#### 750")
    # MetaMathQA's values: a final full stop, thousands, a percentage, $...$, a box on the answer line
    assert extract_gsm8k("The answer is: 1,200.") == "1200" and extract_gsm8k("The answer is: 12.5%") == "12.5"
    assert final_answer("The answer is: $\\frac{3}{4}$.") == "\\frac{3}{4}"
    assert final_answer("so it is\nThe answer is: $\\boxed{36}$") == "36"


def test_the_first_final_line_ends_the_solution_and_the_last_marker_before_it_counts():
    # a model that goes on past its answer is graded on its own answer, whatever the marker
    assert extract_gsm8k("The answer is: 752\n\nQuestion: Tom has 9 apples ...\nThe answer is: 9") == "752"
    assert extract_gsm8k("#### 72\nThe answer is: 72\n\nQuestion: ...\n#### 9") == "72"
    assert final_answer("The answer is: 5\n\nProblem: Find $y$.\n... $\\boxed{7}$") == "5"
    # the final line's answer, not a box before it; a box after the marker on its line; else the last box
    assert final_answer("$\\boxed{3}$ is wrong; redo: $\\boxed{4}$.\nThe answer is: 4") == "4"
    assert final_answer("$\\boxed{3}$.\nThe answer is: 4") == "4"
    assert final_answer("first $\\boxed{3}$, then $\\boxed{4}$") == "4"
    assert final_answer("$\\boxed{3}$.\nThe answer is:") == "3"  # an empty final line answers nothing
    assert extract_gsm8k("#### 7 #### 12") == "7" and extract_gsm8k("#### 72 The answer is: 9") == "72"
    # a marked answer beats the last number of the text (the old fallback)
    assert extract_gsm8k("So she earns $\\boxed{72}$ over the 3 days") == "72"
    assert extract_gsm8k("She earns 72 over the 3 days") == "3"
    # a Markdown heading "#### Step 1" is no GSM8K answer; a "The answer is" without the colon is no marker
    steps = "#### Step 1: 48/2 = 24\n#### Step 2: 48 + 24 = 72\nThe answer is: 72"
    assert extract_gsm8k(steps) == "72" and gsm8k_correct(steps, "#### 72")
    assert final_answer("the answer is 5, so $\\boxed{6}$") == "6" and final_answer("The answer is:") is None
    assert final_answer("#### 5") is None  # "####" is GSM8K's marker, not MATH's


# --- the MATH grader: math-verify where installed, Hendrycks' normalisation otherwise ---------------------

def test_without_math_verify_the_normalisation_grades_and_is_reported(no_math_verify):
    assert scoring.math_verify_version() is None and math_grader() == "hendrycks-normalisation"
    assert math_correct("The answer is: 0.5", "\\frac12") and math_correct("$\\boxed{\\dfrac{1}{2}}$", "1/2")
    assert not math_correct("The answer is: 2\\sqrt{3}", "\\sqrt{12}")  # equal, but not as normalised strings
    assert not math_correct("The answer is: 0.25", "\\frac14")
    with pytest.raises(ValueError, match=r"pip install 'minimoe\[math\]'"):
        math_grader(use_math_verify=True)
    with pytest.raises(ValueError, match="math-verify"):
        math_correct("The answer is: 1", "1 + 0", use_math_verify=True)


def test_math_verify_is_asked_gold_first_each_answer_as_one_latex_expression(monkeypatch):
    """The wiring, with a stand-in for the package (runs where math-verify is not installed)."""
    from importlib import metadata

    calls = []
    fake = types.ModuleType("math_verify")
    fake.__version__ = "9.9.9"
    fake.parse = lambda text, parsing_timeout=None: calls.append(("parse", text, parsing_timeout)) or [text]
    fake.verify = lambda gold, pred, timeout_seconds=None: calls.append(("verify", gold, pred)) or True
    monkeypatch.setitem(sys.modules, "math_verify", fake)
    real_version = metadata.version

    def version(name):
        if name == "math-verify":
            raise metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(metadata, "version", version)
    assert math_grader() == "math-verify 9.9.9"
    assert math_correct("... $\\boxed{2\\sqrt{3}}$", "\\sqrt{12}")
    assert calls == [("parse", "$\\sqrt{12}$", 5), ("parse", "$2\\sqrt{3}$", 5),
                     ("verify", ["$\\sqrt{12}$"], ["$2\\sqrt{3}$"])]
    calls.clear()
    assert math_correct("The answer is: \\frac12", "0.5") and calls == []  # normalised equal: not asked
    assert not math_correct("no answer here", "3") and calls == []  # nothing marked: nothing to ask
    assert not math_correct("The answer is: 4", "3", use_math_verify=False) and calls == []


def test_math_verify_decides_equivalence_symbolically():
    import math_verify  # noqa: F401  (the test extra installs it; the fallback is tested by hiding it)

    assert math_grader().startswith("math-verify ")
    assert math_correct("The answer is: 2\\sqrt{3}", "\\sqrt{12}") and math_correct("The answer is: 0.25", "\\frac14")
    assert math_correct("$\\boxed{(x+1)^2}$", "x^2+2x+1") and math_correct("The answer is: 1,000", "1000")
    assert not math_correct("The answer is: 2\\sqrt{2}", "\\sqrt{12}") and not math_correct("The answer is: 7", "8")
    assert not math_correct("The answer is: 0.25", "\\frac14", use_math_verify=False)


def test_eval_reports_the_math_grader_and_scores_metamathqa_completions(tmp_path):
    rows = [{"problem": "How far apart are Gracie and Joe's points?", "solution": "... $\\boxed{\\sqrt{5}}$.",
             "answer": "\\sqrt{5}"},
            {"problem": "What is $\\sqrt{4 \\cdot 3}$?", "solution": "It is $\\boxed{\\sqrt{12}}$."},
            {"problem": "What is $1/4$ as a fraction?", "solution": "It is $\\boxed{\\frac14}$."},
            {"problem": "What is $3 + 4$?", "solution": "$3 + 4 = \\boxed{7}$."}]
    completions = [GRACIE, "$\\sqrt{12} = \\sqrt{4 \\cdot 3}$.\nThe answer is: 2\\sqrt{3}",
                   "The answer is: 0.25", "The answer is: 8"]
    data = _jsonl(tmp_path / "math.jsonl", rows)
    comp = _jsonl(tmp_path / "c.jsonl", [{"index": i, "completion": c} for i, c in enumerate(completions)])

    def run(out, *flags):
        assert evaluate.main(["--task", "math", "--data", str(data), "--completions", str(comp),
                              "--out", str(tmp_path / out), *flags]) == 0
        return json.loads((tmp_path / out / "summary.json").read_text())

    plain = run("plain", "--math-grader", "normalisation")
    assert plain["grader"] == "hendrycks-normalisation" and plain["exact_match"] == 0.25
    auto = run("auto")
    if scoring.math_verify_version() is None:
        assert auto == {**plain, "grader": "hendrycks-normalisation"}
    else:
        assert auto["grader"] == f"math-verify {scoring.math_verify_version()}" and auto["exact_match"] == 0.75


def test_asking_for_math_verify_without_it_is_an_error_before_anything_runs(tmp_path, capsys, no_math_verify):
    data = _jsonl(tmp_path / "math.jsonl", [{"problem": "1+1?", "solution": "$\\boxed{2}$"}])
    comp = _jsonl(tmp_path / "c.jsonl", [{"index": 0, "completion": "The answer is: 2"}])
    assert evaluate.main(["--task", "math", "--data", str(data), "--completions", str(comp),
                          "--math-grader", "math-verify", "--out", str(tmp_path / "m")]) == 2
    assert "minimoe[math]" in capsys.readouterr().err and not (tmp_path / "m").exists()
    assert evaluate.main(["--task", "math", "--data", str(data), "--completions", str(comp),
                          "--out", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m/summary.json").read_text()) == {
        "problems": 1, "exact_match": 1.0, "grader": "hendrycks-normalisation", "task": "math",
        "completions": str(comp)}


def test_an_interrupted_math_evaluation_resumes_only_with_the_grader_that_began_it(tmp_path, capsys,
                                                                                   no_math_verify):
    data = _jsonl(tmp_path / "math.jsonl", [{"problem": "1+1?", "solution": "$\\boxed{2}$"}])
    comp = _jsonl(tmp_path / "c.jsonl", [{"index": 0, "completion": "The answer is: 2"}])
    argv = ["--task", "math", "--data", str(data), "--completions", str(comp), "--out", str(tmp_path / "m")]
    partial = tmp_path / "m.partial"
    partial.mkdir()  # what an evaluation graded by math-verify left when it was killed
    run = {**evaluate.evaluation(evaluate.build_parser().parse_args(argv)), "grader": "math-verify 0.9.0"}
    (partial / "run.json").write_text(json.dumps(run))
    assert evaluate.main(argv) == 2
    assert "differs in: grader" in capsys.readouterr().err
    (partial / "run.json").write_text(json.dumps({**run, "grader": "hendrycks-normalisation"}))
    assert evaluate.main(argv) == 0 and not partial.exists()


# --- multiple choice: the benchmarks' rows as distributed -------------------------------------------------

GEORGE = "George wants to warm his hands quickly by rubbing them. Which skin surface will produce the most heat?"
WARM = ["dry palms", "wet palms", "palms covered with oil", "palms covered with lotion"]
ARC_HUB = {"id": "Mercury_SC_415702", "question": GEORGE,
           "choices": {"text": WARM, "label": ["A", "B", "C", "D"]}, "answerKey": "A"}
ARC_JSONL = {"id": "Mercury_SC_415702", "question": {"stem": GEORGE, "choices": [
    {"text": t, "label": lab} for t, lab in zip(WARM, "ABCD")]}, "answerKey": "A"}
ARC_DIGITS = {"id": "NYSEDREGENTS_2015_4_8", "question": "Which form of energy is produced when a rubber band "
              "vibrates?", "choices": {"text": ["chemical", "light", "electrical", "sound"],
                                       "label": ["1", "2", "3", "4"]}, "answerKey": "4"}
OBQA_HUB = {"id": "7-980", "question_stem": "The sun is responsible for", "choices": {
    "text": ["puppies learning new tricks", "children growing up and getting old", "flowers wilting in a vase",
             "plants sprouting, blooming and wilting"], "label": ["A", "B", "C", "D"]}, "answerKey": "D"}
OBQA_JSONL = {"id": "7-980", "question": {"stem": "The sun is responsible for", "choices": [
    {"text": t, "label": lab} for t, lab in zip(OBQA_HUB["choices"]["text"], "ABCD")]}, "answerKey": "D",
    "fact1": "the sun is the source of energy for physical cycles on Earth"}
SCIENCEQA_TEXT = {"image": None, "question": "Which tense does the sentence use?\nMona will print her name with care.",
                  "choices": ["present tense", "future tense", "past tense"], "answer": 1, "hint": "",
                  "task": "closed choice", "grade": "grade2", "subject": "language science", "topic": "verbs",
                  "category": "Verb tense", "skill": "Is the sentence in the past, present, or future tense?",
                  "lecture": "Present tense verbs tell you about something that is happening now.", "solution": ""}
SCIENCEQA_HINT = {**SCIENCEQA_TEXT, "question": "Which word would you find on a dictionary page with the guide words "
                  "helmet - hunt?", "choices": ["hobby", "hole"], "answer": 0,
                  "hint": "Pick the word that comes between the guide words."}
SCIENCEQA_IMAGE = {**SCIENCEQA_TEXT, "image": {"bytes": "iVBORw0KGgo=", "path": None},
                   "question": "Which of these states is farthest north?",
                   "choices": ["West Virginia", "Louisiana", "Arizona", "Oklahoma"], "answer": 0}
MMLU = {"question": "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.",
        "subject": "abstract_algebra", "choices": ["0", "4", "2", "6"], "answer": 1}


def test_every_layout_reads_into_question_choices_answer_index():
    native = [ARC_HUB, ARC_JSONL, ARC_DIGITS, OBQA_HUB, OBQA_JSONL, SCIENCEQA_TEXT, SCIENCEQA_HINT, SCIENCEQA_IMAGE,
              MMLU, {"question": "Sky?", "choices": ["blue", "green"], "answer": "B", "task_id": "own/0"}]
    rows, skipped = mc_rows([(f"mixed.jsonl:{n}", row) for n, row in enumerate(native, 1)], "mixed.jsonl")
    assert skipped == 1 and len(rows) == 9
    scored = [{k: r[k] for k in ("question", "choices", "answer")} for r in rows]
    george = {"question": GEORGE, "choices": WARM, "answer": 0}
    assert scored[0] == scored[1] == george
    assert scored[2] == {"question": ARC_DIGITS["question"], "choices": ["chemical", "light", "electrical", "sound"],
                         "answer": 3}
    assert scored[3] == scored[4] == {"question": "The sun is responsible for", "choices": OBQA_HUB["choices"]["text"],
                                      "answer": 3}
    assert scored[5] == {"question": SCIENCEQA_TEXT["question"], "choices": SCIENCEQA_TEXT["choices"], "answer": 1}
    assert scored[6]["question"] == ("Context: Pick the word that comes between the guide words.\n"
                                     + SCIENCEQA_HINT["question"]) and scored[6]["answer"] == 0
    assert scored[7] == {"question": MMLU["question"], "choices": ["0", "4", "2", "6"], "answer": 1}
    assert scored[8] == {"question": "Sky?", "choices": ["blue", "green"], "answer": 1}
    # the other fields stay (for --data-filter, task_id for --completions); what was read into the three goes
    assert rows[0] == rows[1] | {"id": "Mercury_SC_415702"} and rows[2]["id"] == "NYSEDREGENTS_2015_4_8"
    assert rows[4] == scored[4] | {"id": "7-980", "fact1": OBQA_JSONL["fact1"]}
    kept = ("task", "grade", "subject", "topic", "category", "skill", "lecture", "solution")  # not image, hint
    assert rows[5] == scored[5] | {k: SCIENCEQA_TEXT[k] for k in kept}
    assert rows[7] == scored[7] | {"subject": "abstract_algebra"} and rows[8]["task_id"] == "own/0"
    # a row handed to the task directly, not read through its rows(), is graded the same
    mc = get_task("mc")
    assert mc.reference(ARC_DIGITS) == "D. sound" and mc.correct(ARC_DIGITS, "D") and not mc.correct(ARC_DIGITS, "A")
    assert mc.correct({"question": "Sky?", "choices": ["blue", "green"], "answer": "B"}, "(B)")


@pytest.mark.parametrize("row, why", [
    ({"question": "Sky?", "options": ["blue", "green"], "answer": 0}, "no multiple-choice row of a known layout"),
    ({"question": "Sky?", "choices": ["blue", "green"]}, "no multiple-choice row of a known layout"),
    ({"question": "Sky?", "choices": ["blue", "green"], "answer": 2}, "answer index 2 is not one of 0..1"),
    ({**ARC_HUB, "answerKey": "E"}, "answer 'E' is not one of its labels A, B, C, D"),
    ({"question": "Sky?", "choices": "blue or green", "answer": 0}, "choices are neither"),
])
def test_a_row_that_fits_no_layout_names_the_file_the_line_and_its_keys(tmp_path, capsys, row, why):
    data = _jsonl(tmp_path / "arc.jsonl", [ARC_HUB, row])
    comp = _jsonl(tmp_path / "c.jsonl", [{"index": 0, "completion": "A"}, {"index": 1, "completion": "A"}])
    assert evaluate.main(["--task", "mc", "--mc-mode", "letter", "--data", str(data), "--completions", str(comp),
                          "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: " in err and why in err and f"(its keys: {', '.join(row)})" in err


def test_only_image_rows_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no text-only multiple-choice rows .1 rows with an image skipped"):
        mc_rows([("sqa.jsonl:1", SCIENCEQA_IMAGE)], "sqa.jsonl")


def test_letter_mode_grades_native_rows_and_reports_the_skipped_images(tmp_path):
    rows = [ARC_HUB, ARC_JSONL, ARC_DIGITS, OBQA_HUB, SCIENCEQA_IMAGE, SCIENCEQA_TEXT, MMLU]
    data = _jsonl(tmp_path / "mc.jsonl", rows)
    # completions of the six text-only problems, in order; the ARC row labelled 1..4 is shown as A..D
    answers = ["The answer is (A).", "B", "D. sound", "The answer is C", "B. future tense", "(A)"]
    comp = _jsonl(tmp_path / "c.jsonl", [{"index": i, "completion": c} for i, c in enumerate(answers)])
    assert evaluate.main(["--task", "mc", "--mc-mode", "letter", "--data", str(data), "--completions", str(comp),
                          "--out", str(tmp_path / "m")]) == 0
    summary = json.loads((tmp_path / "m/summary.json").read_text())
    assert summary["problems"] == 6 and summary["skipped_rows"] == {"image": 1}
    assert summary["exact_match"] == pytest.approx(3 / 6)  # right: ARC hub, ARC digits, ScienceQA
    records = [json.loads(line) for line in (tmp_path / "m/samples.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in records] == [True, False, True, False, True, False]
    assert [r["reference"] for r in records] == ["A. dry palms", "A. dry palms", "D. sound",
                                                 "D. plants sprouting, blooming and wilting", "B. future tense",
                                                 "B. 4"]


def test_a_json_array_row_is_named_by_its_line_and_rows_are_filtered_by_their_own_fields(tmp_path, capsys):
    data = tmp_path / "mmlu.json"
    data.write_text(json.dumps([MMLU, {**MMLU, "subject": "anatomy", "choices": ["a", "b"], "answer": 0}],
                               indent=1))
    comp = _jsonl(tmp_path / "c.jsonl", [{"index": 0, "completion": "B"}])
    assert evaluate.main(["--task", "mc", "--mc-mode", "letter", "--data", str(data), "--completions", str(comp),
                          "--data-filter", "subject=abstract_algebra", "--out", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m/summary.json").read_text())["exact_match"] == 1.0
    data.write_text(json.dumps([MMLU, {"question": "Sky?", "choices": ["blue", "green"]}], indent=1))
    assert evaluate.main(["--task", "mc", "--mc-mode", "letter", "--data", str(data), "--completions", str(comp),
                          "--out", str(tmp_path / "m2")]) == 2
    lines = data.read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if '"Sky?"' in text) - 1  # the line its object starts on
    assert f"{data}:{line} (item 1): it is no multiple-choice row" in capsys.readouterr().err


def test_loglik_mode_scores_native_rows_with_a_model(tmp_path):
    data = _jsonl(tmp_path / "mc.jsonl", [ARC_JSONL, SCIENCEQA_IMAGE, ARC_DIGITS, MMLU])
    assert evaluate.main(["--model", "tiny-moe", "--device", "cpu", "--task", "mc",
                          "--data", str(data), "--out", str(tmp_path / "m")]) == 0
    summary = json.loads((tmp_path / "m/summary.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "m/samples.jsonl").read_text().splitlines()]
    assert summary["problems"] == 3 and summary["skipped_rows"] == {"image": 1}
    assert [len(r["scores"]) for r in records] == [4, 4, 4]
    assert [r["reference"] for r in records] == ["A. dry palms", "D. sound", "B. 4"]
    assert [r["correct"] for r in records] == [r["choice"] == want for r, want in zip(records, [0, 3, 1])]
    assert summary["accuracy"] == sum(r["correct"] for r in records) / 3
    assert GEORGE in records[0]["prompt"]
