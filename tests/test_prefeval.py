"""PrefEval: rows in the published format, the official conversation and verdict logic, the judge client
(retries, errors, cache) against a local stub HTTP server, and eval.py end to end, interrupted and resumed."""

import http.server
import json
import re
import socket
import threading
from pathlib import Path

import pytest

from minimoe.eval import prefeval
from minimoe.eval.judge import ChatJudge, JudgeError, VerdictCache, chat_url

from minimoe.cli import eval as evaluate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# --- a PrefEval checkout in miniature: the published layout, hand-written rows and judge prompts ----------

EXPLICIT = [  # benchmark_dataset/explicit_preference/TOPIC.json: a JSON array
    {"preference": "I avoid gluten.", "question": "Where should I eat in Rome?", "explanation": "pasta"},
    {"preference": "I am allergic to shellfish.", "question": "What should I eat in New Orleans?",
     "explanation": "seafood"},
    {"preference": "I hate crowds.", "question": "What should I do in Paris?", "explanation": "tourists"},
    {"preference": "I never eat shellfish.", "question": "Dinner in Maine?", "explanation": "lobster"},
    {"preference": "I only fly economy.", "question": "How should I fly to Tokyo?", "explanation": "upgrades"},
]
CHOICE = [{"preference": "I avoid gluten.", "question": "Where should I eat in Rome?", "explanation": "pasta",
           "implicit_query": "Lunch?", "options": ["salad bar", "panini"], "aligned_op": "salad bar",
           "conversation": {"query": "Lunch?", "assistant_options": "1. salad bar 2. panini",
                            "user_selection": "The salad bar.", "assistant_acknowledgment": "Got it."}}]
PERSONA = [{"preference": "I avoid gluten.", "question": "Where should I eat in Rome?", "explanation": "pasta",
            "persona": "a librarian",
            "conversation": {"0": {"user": "Hi!", "assistant": "Hello."},
                             "1": {"user": "Bread makes me ill.", "assistant": "Noted."}}}]
INTER = [{"conversation_id": "a", "conversation": [{"role": "user", "content": "u1"},
                                                   {"role": "assistant", "content": "a1"},
                                                   {"role": "user", "content": "u2"}]},
         {"conversation_id": "b", "conversation": [{"role": "assistant", "content": "a2"},
                                                   {"role": "user", "content": "u3"},
                                                   {"role": "assistant", "content": "a3"}]}]
# the judge prompts: official placeholders; the first word names the check for the stub judge
CHECK_TEXT = {"check_acknowledge.txt": "ACKNOWLEDGE\nThe user's question is: {question}\nAssistant response: "
                                       "{end_generation}",
              "check_violation.txt": "VIOLATE\nUser's preference: {preference}\nUser query: {question}\n"
                                     "Assistant response: {end_generation}",
              "check_hallucination.txt": "HALLUCINATE\nOriginal user preference: \"{preference}\"\n"
                                         "Assistant's restatement: \"{assistant_restatement}\"",
              "check_helpful.txt": "HELPFUL\nUser query: {question}\nAssistant response: {end_generation}"}

# the responses scored with --completions, and what the stub judge answers for each (by its first word)
COMPLETIONS = ["GOOD Since you avoid gluten, try Mama Eat.",  # follows
               "UNAWARE Try the shrimp po'boy.",  # preference-unaware violation
               "SORRY I cannot help without your preferences.",  # unhelpful
               "WRONG Since you love shellfish, try the lobster roll.",  # hallucinated preference, violated
               "ODD Fly business class."]  # violate answered without tags: malformed, read as no violation
VERDICTS = {"GOOD": {"acknowledge": ("preference", "Since you avoid gluten", "Yes"), "violate": "No",
                     "hallucinate": "No", "helpful": "Yes"},
            "UNAWARE": {"acknowledge": ("preference", "", "No"), "violate": "Yes", "helpful": "Yes"},
            "SORRY": {"acknowledge": ("preference", "", "No"), "violate": "No", "helpful": "No"},
            "WRONG": {"acknowledge": ("preference", "you love shellfish", "Yes"), "violate": "Yes",
                      "hallucinate": "Yes", "helpful": "Yes"},
            "ODD": {"acknowledge": ("preference", "", "No"), "violate": None, "helpful": "[Yes]"}}
REQUESTS_PER_RESPONSE = [4, 3, 3, 4, 3]  # hallucinate is asked only after an acknowledgement


def checkout(root: Path) -> Path:
    """``root`` laid out as a PrefEval clone; returns the explicit topic file."""
    (root / "error_type").mkdir(parents=True)
    for name, text in CHECK_TEXT.items():
        (root / "error_type" / name).write_text(text)
    data = root / "benchmark_dataset"
    for sub, rows in (("explicit_preference", EXPLICIT), ("implicit_preference/choice-based", CHOICE),
                      ("implicit_preference/persona-driven", PERSONA)):
        (data / sub).mkdir(parents=True)
        (data / sub / "travel_restaurant.json").write_text(json.dumps(rows, indent=4))
    (data / "filtered_inter_turns.json").write_text(json.dumps(INTER))
    return data / "explicit_preference" / "travel_restaurant.json"


def judge_answer(prompt: str) -> str:
    """What the stub judge says: the check is the prompt's first word, the case the response's marker."""
    check = prompt.split("\n", 1)[0].lower()
    if check == "hallucinate":
        case = "GOOD" if "avoid gluten" in prompt.split("restatement", 1)[1] else "WRONG"
    else:
        case = re.search(r"Assistant response: (\w*)", prompt).group(1)
    if case not in VERDICTS:  # a model's generated text: a plain, preference-following answer
        return {"acknowledge": "<preference></preference><answer>No</answer>", "violate": "<answer>No</answer>",
                "helpful": "<explanation>fine</explanation><answer>Yes</answer>"}[check]
    verdict = VERDICTS[case][check]
    if verdict is None:
        return "I think it does not."
    if isinstance(verdict, tuple):
        return f"<{verdict[0]}>{verdict[1]}</{verdict[0]}>\n<answer>{verdict[2]}</answer>"
    return f"<explanation>{case.lower()}</explanation>\n<answer>{verdict}</answer>"


class Stub:
    """An OpenAI-compatible chat endpoint on 127.0.0.1: canned judge answers, scripted failures first,
    and every request it received (path, Authorization header, body)."""

    def __init__(self):
        self.requests, self.script, self.fail_after = [], [], None
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append((self.path, self.headers.get("Authorization"), body))
                if stub.script:
                    status, headers = stub.script.pop(0)
                    return self._send(status, b'{"error": "busy"}', headers)
                if stub.fail_after is not None and len(stub.requests) > stub.fail_after:
                    return self._send(400, b'{"error": "stopped"}')
                content = judge_answer(body["messages"][-1]["content"])
                answer = {"choices": [{"message": {"role": "assistant", "content": content}}]}
                self._send(200, json.dumps(answer).encode())

            def _send(self, status, data, headers=()):
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def asked(self) -> list[str]:
        """The check each request asked (the first word of its prompt)."""
        return [body["messages"][-1]["content"].split("\n", 1)[0].lower() for _, _, body in self.requests]


@pytest.fixture
def stub(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # 127.0.0.1 is asked directly
    monkeypatch.setenv("STUB_JUDGE_KEY", "sk-test-123")
    s = Stub()
    yield s
    s.server.shutdown()
    s.server.server_close()


def _completions(path: Path) -> Path:
    path.write_text("".join(json.dumps({"task_id": f"travel_restaurant/{i}", "completion": c}) + "\n"
                            for i, c in enumerate(COMPLETIONS)))
    return path


def _args(stub, data, out, *more):
    return ["--task", "prefeval", "--data", str(data), "--judge-url", stub.url, "--judge-model", "judge-1",
            "--judge-key-env", "STUB_JUDGE_KEY", "--out", str(out), *map(str, more)]


def _main(args) -> int:
    return evaluate.main([str(a) for a in args])


# --- rows, conversations, verdicts ------------------------------------------------------------------------

def test_rows_are_read_in_the_published_format(tmp_path):
    topic = checkout(tmp_path / "PrefEval")
    rows = prefeval.read_prefeval(topic)
    assert [r["task_id"] for r in rows] == [f"travel_restaurant/{i}" for i in range(5)]
    assert rows[1] == {"topic": "travel_restaurant", "task_id": "travel_restaurant/1", **EXPLICIT[1]}
    implicit = tmp_path / "PrefEval/benchmark_dataset/implicit_preference"
    assert [prefeval.form(r) for r in prefeval.read_prefeval(implicit / "choice-based")] == ["choice"]
    assert [prefeval.form(r) for r in prefeval.read_prefeval(implicit / "persona-driven")] == ["persona"]
    # a directory: every topic file of one form, in name order
    (topic.parent / "shop_home.json").write_text(json.dumps(EXPLICIT[:2]))
    assert [r["task_id"] for r in prefeval.read_prefeval(topic.parent)][:3] == [
        "shop_home/0", "shop_home/1", "travel_restaurant/0"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([EXPLICIT[0], {"preference": "p"}]))
    with pytest.raises(ValueError, match=r"bad.json: row 1: PrefEval rows need 'preference' and 'question'"):
        prefeval.read_prefeval(bad)
    bad.write_text(json.dumps([{**EXPLICIT[0], "conversation": ["hi"]}]))
    with pytest.raises(ValueError, match="row 0: 'conversation' is neither choice-based"):
        prefeval.read_prefeval(bad)
    bad.write_text("[{")
    with pytest.raises(ValueError, match=r"bad.json:1: malformed JSON"):
        prefeval.read_prefeval(bad)


def test_the_conversation_is_the_official_one():
    task = prefeval.PrefEval("p", "d", method="remind", words=300)
    row = {**EXPLICIT[0], "response_to_pref": "Noted, no gluten."}
    system = {"role": "system", "content": "You are a helpful assistant."}
    question = ("Where should I eat in Rome?\nIn your response, please ensure that you take into account our earlier "
                "discussion, and provide an answer that is consistent with my preference. "
                "(Please respond within 300 words.)")
    assert task.messages(row) == [system, {"role": "user", "content": "I avoid gluten."},
                                  {"role": "assistant", "content": "Noted, no gluten."},
                                  {"role": "user", "content": question}]
    zero = prefeval.PrefEval("p", "d", words=7)
    assert zero.messages(CHOICE[0])[1:] == [
        {"role": "user", "content": "Lunch?"}, {"role": "assistant", "content": "1. salad bar 2. panini"},
        {"role": "user", "content": "The salad bar."}, {"role": "assistant", "content": "Got it."},
        {"role": "user", "content": "Where should I eat in Rome? (Please respond within 7 words.)"}]
    assert [m["content"] for m in zero.messages(PERSONA[0])[1:-1]] == ["Hi!", "Hello.", "Bread makes me ill.", "Noted."]
    with pytest.raises(ValueError, match="reply to the preference is not generated"):
        zero.messages(EXPLICIT[0])


def test_inserted_turns_are_the_first_messages_of_the_official_file(tmp_path):
    path = tmp_path / "turns.json"
    path.write_text(json.dumps(INTER))
    assert [m["content"] for m in prefeval.inter_turns(path, 2)] == ["u1", "a1", "u2", "a2"]
    assert prefeval.inter_turns(path, 0) == ()
    with pytest.raises(ValueError, match="fewer than --prefeval-inter-turns 4"):
        prefeval.inter_turns(path, 4)
    task = prefeval.PrefEval("p", "d", inter=prefeval.inter_turns(path, 1), words=5)
    assert [m["content"] for m in task.messages(CHOICE[0])[5:]] == ["u1", "a1", "Where should I eat in Rome? "
                                                                                 "(Please respond within 5 words.)"]


def test_verdicts_follow_the_official_decision():
    classify = prefeval.classify
    assert classify({"acknowledge": "Yes", "violate": "No", "hallucinate": "No", "helpful": "Yes"})[:2] == (True, None)
    assert classify({"acknowledge": "No", "violate": "Yes", "helpful": "Yes"})[:2] == (
        False, "preference_unaware_violation")
    assert classify({"acknowledge": "Yes", "violate": "Yes", "hallucinate": "No", "helpful": "Yes"})[:2] == (
        False, "inconsistent")
    assert classify({"acknowledge": "Yes", "violate": "Yes", "hallucinate": "Yes", "helpful": "Yes"})[:2] == (
        False, "hallucination_of_preference_violation")
    assert classify({"acknowledge": "Yes", "violate": "Yes", "hallucinate": "Yes", "helpful": "No"})[:2] == (
        False, "unhelpful")
    # a hallucinated restatement without an acknowledgement does not count; a missing answer reads as No
    assert classify({"acknowledge": "No", "violate": "", "hallucinate": "Yes", "helpful": ""})[2] == {
        "acknowledgement": False, "hallucination": False, "violation": False}
    # substrings, as the official script reads answers: "Not really" is a no, "Yes." a yes
    assert classify({"acknowledge": "Yes.", "violate": "Not really", "hallucinate": "no", "helpful": "Not really"})[
        :2] == (False, "unhelpful")
    assert prefeval.tag("<preference>x</preference>\n<ANSWER> Yes </ANSWER>", "answer") == "Yes"
    assert prefeval.tag("<answer>No", "answer") == "No" and prefeval.tag("yes", "answer") is None


# --- the judge client -------------------------------------------------------------------------------------

def test_retries_back_off_exponentially_and_honour_retry_after(stub, tmp_path):
    slept = []
    judge = ChatJudge(stub.url, "judge-1", "STUB_JUDGE_KEY", VerdictCache(tmp_path / "c.jsonl"), backoff=0.5,
                      retries=3, sleep=slept.append)
    stub.script = [(429, [("Retry-After", "7")]), (500, []), (200, [])]  # the 200 is not a chat completion
    message = [{"role": "user", "content": "VIOLATE\nAssistant response: GOOD yes"}]
    assert judge.ask(message) == "<explanation>good</explanation>\n<answer>No</answer>"
    assert slept == [7.0, 1.0, 2.0] and judge.requests == 4
    path, auth, body = stub.requests[-1]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test-123"
    assert body == {"model": "judge-1", "messages": message, "temperature": 0.0, "max_tokens": 100}
    # asked again: from the cache, no request; the key is nowhere on disk
    assert judge.ask(message) == "<explanation>good</explanation>\n<answer>No</answer>" and len(stub.requests) == 4
    assert "sk-test" not in (tmp_path / "c.jsonl").read_text()
    # bounded: after the last retry, an error naming the endpoint and the last failure
    stub.script = [(500, [])] * 3
    slept.clear()
    with pytest.raises(JudgeError, match=r"judge at http://127.0.0.1:\d+/v1/chat/completions did not answer after 3 "
                                         r"attempts; last: HTTP 500"):
        ChatJudge(stub.url, "judge-1", "STUB_JUDGE_KEY", retries=2, backoff=1, sleep=slept.append).ask(message)
    assert slept == [1, 2]
    # a refusal that retrying cannot fix fails at once, without the key in the message
    stub.script = [(401, [])]
    with pytest.raises(JudgeError, match=r"refused the request: HTTP 401 .*check \$STUB_JUDGE_KEY") as e:
        ChatJudge(stub.url, "judge-1", "STUB_JUDGE_KEY", sleep=pytest.fail).ask(message)
    assert "sk-test" not in str(e.value)


def test_an_unreachable_judge_and_a_missing_key_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    with pytest.raises(JudgeError, match=r"\$NO_SUCH_JUDGE_KEY \(--judge-key-env\), which is not set"):
        ChatJudge("http://127.0.0.1:9/v1", "m", "NO_SUCH_JUDGE_KEY").ask([{"role": "user", "content": "x"}])
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    slept = []
    closed = ChatJudge(f"http://127.0.0.1:{port}/v1", "m", "", retries=2, timeout=5, sleep=slept.append)
    with pytest.raises(JudgeError, match=rf"127.0.0.1:{port}/v1/chat/completions did not answer after 3 attempts; "
                                         "last: .*refused"):
        closed.ask([{"role": "user", "content": "x"}])
    assert slept == [1.0, 2.0]
    assert chat_url("http://h:1/v1/chat/completions/") == "http://h:1/v1/chat/completions"
    with pytest.raises(JudgeError, match="must start with http"):
        chat_url("localhost:8000/v1")


def test_the_cache_skips_a_line_cut_by_a_kill_and_appends_on_a_new_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    cache = VerdictCache(path)
    cache.add("k1", "m", "one")
    with open(path, "a") as f:
        f.write('{"key": "k2", "mod')  # killed mid-line
    again = VerdictCache(path)
    assert again.answers == {"k1": "one"}
    again.add("k3", "m", "three")
    assert VerdictCache(path).answers == {"k1": "one", "k3": "three"}
    assert path.read_text().splitlines()[1:] == ['{"key": "k2", "mod',
                                                 '{"key": "k3", "model": "m", "content": "three"}']


# --- eval.py ------------------------------------------------------------------------------------------------

def test_eval_judges_completions_with_the_official_metric(stub, tmp_path, capsys):
    data = checkout(tmp_path / "PrefEval")
    comp = _completions(tmp_path / "responses.jsonl")
    stub.script = [(429, [("Retry-After", "0")]), (500, [("Retry-After", "0")])]  # retried, no real waiting
    out = tmp_path / "out"
    assert _main([*_args(stub, data, out), "--completions", comp]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary == {
        "problems": 5, "preference_following_accuracy": 0.4, "responses": 5, "acknowledgement": 2,
        "hallucination": 1, "violation": 2,
        "errors": {"unhelpful": 1, "inconsistent": 0, "hallucination_of_preference_violation": 1,
                   "preference_unaware_violation": 1},
        "malformed_verdicts": 1, "accuracy_by_topic": {"travel_restaurant": 0.4},
        "method": "zero-shot", "inter_turns": 0, "words": 256,
        "judge": {"url": stub.url + "/chat/completions", "model": "judge-1", "temperature": 0.0, "max_tokens": 100},
        "task": "prefeval", "completions": str(comp)}
    assert len(stub.requests) == sum(REQUESTS_PER_RESPONSE) + 2
    assert stub.asked()[2:6] == ["acknowledge", "violate", "hallucinate", "helpful"]  # the official order
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["error"] for r in records] == [None, "preference_unaware_violation", "unhelpful",
                                             "hallucination_of_preference_violation", None]
    assert records[4]["malformed"] == ["violate"] and records[4]["correct"] is True
    assert records[3]["verdicts"]["acknowledge"] == {"answer": "Yes", "preference": "you love shellfish"}
    assert records[0]["reference"] == "I avoid gluten." and records[0]["task_id"] == "travel_restaurant/0"
    # what the judge saw: the official placeholders filled with the row and the response
    hallucinate = stub.requests[4][2]["messages"]
    assert hallucinate[0]["content"].startswith("You are a helpful assistant in evaluating")
    assert hallucinate[1]["content"] == ('HALLUCINATE\nOriginal user preference: "I avoid gluten."\n'
                                         'Assistant\'s restatement: "Since you avoid gluten"')
    assert "sk-test" not in "".join(p.read_text() for p in tmp_path.rglob("*") if p.is_file())
    assert not (tmp_path / "out.partial").exists()


def test_an_interrupted_evaluation_resumes_without_asking_the_judge_again(stub, tmp_path, capsys):
    data = checkout(tmp_path / "PrefEval")
    comp = _completions(tmp_path / "responses.jsonl")
    assert _main([*_args(stub, data, tmp_path / "whole"), "--completions", comp]) == 0
    total = len(stub.requests)
    assert total == sum(REQUESTS_PER_RESPONSE)
    stub.requests.clear()
    stub.fail_after = 6  # the judge stops answering in the middle of the second response's checks
    args = [*_args(stub, data, tmp_path / "out"), "--completions", comp, "--judge-retries", "0"]
    assert _main(args) == 2
    assert "refused the request: HTTP 400" in capsys.readouterr().err
    cache = tmp_path / "out.partial" / "judge-cache.jsonl"
    assert len(cache.read_text().splitlines()) == 6
    stub.requests.clear()
    stub.fail_after = None
    assert _main(args) == 0
    assert len(stub.requests) == total - 6  # only what the judge had not answered
    for name in ("summary.json", "samples.jsonl"):
        whole = (tmp_path / "whole" / name).read_text()
        assert (tmp_path / "out" / name).read_text() == whole.replace(str(tmp_path / "whole"), str(tmp_path / "out"))


def test_a_missing_key_or_prompts_are_refused_before_anything_runs(stub, tmp_path, capsys, monkeypatch):
    data = checkout(tmp_path / "PrefEval")
    comp = _completions(tmp_path / "responses.jsonl")
    monkeypatch.delenv("STUB_JUDGE_KEY")
    assert _main([*_args(stub, data, tmp_path / "o"), "--completions", comp]) == 2
    assert "$STUB_JUDGE_KEY (--judge-key-env), which is not set" in capsys.readouterr().err
    loose = tmp_path / "loose.json"
    loose.write_text(json.dumps(EXPLICIT))
    assert _main([*_args(stub, loose, tmp_path / "o"), "--judge-key-env", "", "--completions", comp]) == 2
    assert "were not found in a directory above --data; pass --prefeval-prompts DIR" in capsys.readouterr().err
    assert stub.requests == [] and not (tmp_path / "o").exists()


def test_a_model_answers_the_official_conversation_and_resumes_without_generating(stub, tmp_path, monkeypatch):
    from minimoe.eval import runners

    data = checkout(tmp_path / "PrefEval")
    args = [*_args(stub, data, tmp_path / "out"), "--model", "tiny-moe", "--device", "cpu",
            "--limit", "2", "--max-new-tokens", "4", "--prefeval-inter-turns", "1", "--judge-retries", "0"]
    stub.fail_after = 3  # the first response is judged (3 checks), then the judge goes away
    assert _main(args) == 2
    progress = tmp_path / "out.partial"
    first = json.loads((progress / "first-turns.json").read_text())
    assert len(first) == 2 and (progress / "completions.json").is_file()
    stub.fail_after = None
    stub.requests.clear()
    monkeypatch.setattr(runners, "generate_all", lambda *a, **k: pytest.fail("generated again"))
    assert _main(args) == 0
    assert len(stub.requests) == 3  # the second response only
    records = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    # the tiny model's tokenizer is plain text: the messages joined by blank lines, then the reply
    chat = ["You are a helpful assistant.", "I avoid gluten.", first[0], "u1", "a1",
            "Where should I eat in Rome? (Please respond within 4 words.)"]
    assert records[0]["prompt"] == "\n\n".join(chat) + "\n\n\n"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["problems"] == 2 and summary["inter_turns"] == 1 and summary["words"] == 4
    assert summary["preference_following_accuracy"] == 1.0  # the stub finds plain answers fine
