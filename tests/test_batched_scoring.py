"""Batched multiple-choice scoring and length-sorted generation give what one sequence at a time gives.

``options_loglik`` runs a batch's contexts once into a KV cache and all their options together; the
reference is ``option_loglik``, one forward per (context + option). Padding and batching change only the
float rounding: every option's log-likelihood sum is held to 1e-5 absolute plus 1e-6 relative (fp32; the
sums of the longest options below are about -270, and what was measured is at most 4e-6 apart), and the
chosen options, both accuracies and every other field of a record are held to be exactly equal.
"""

from dataclasses import dataclass, field

import pytest
import torch

import minimoe
from minimoe.eval.runners import Decoding, generate_all, mc_loglik, option_loglik, options_loglik
from minimoe.model.tokenizer import byte_tokenizer
from minimoe.parallel.distributed import World

TOLERANCE = dict(rel=1e-6, abs=1e-5)

# options of different lengths in bytes (one byte, a sentence), contexts of different lengths, 2 to 5 options
ROWS = [
    {"question": "Which colour is the sky on a clear day?", "choices": ["blue", "green", "red", "grey"], "answer": 0},
    {"question": "2 + 2?", "choices": ["4", "five", "twenty-two, or so it is said by some"], "answer": "A"},
    {"question": "A much longer question, which goes on for a good many more bytes than the others, so that "
                 "a batch holding it pads the others a lot: which of these is a mammal?",
     "choices": ["whale", "shark", "trout", "an eel of the deep sea", "x"], "answer": 0},
    {"question": "Yes?", "choices": ["yes", "no"], "answer": 1},
    {"question": "Which is heavier, a kilogram of feathers or a kilogram of lead?",
     "choices": ["the lead", "the feathers", "neither: they weigh the same"], "answer": "C"},
]


@pytest.fixture(scope="module", params=["tiny-olmoe", "tiny-qwen3"])
def model(request):
    """A tiny random model (MoE or dense) over the byte tokenizer, long enough a context for every row."""
    torch.manual_seed(0)
    return minimoe.CausalLM(minimoe.preset(request.param, vocab_size=272, max_position_embeddings=512)).eval()


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def one_option_at_a_time(model, tok, rows):
    """The records and summary of ``mc_loglik`` as computed before batching: one forward per option."""
    from minimoe.data.dataset import prompt_text

    records = []
    for i, row in enumerate(rows):
        context, options = prompt_text(tok, row["question"]), [" " + c for c in row["choices"]]
        scores = [option_loglik(model, tok, context, o) for o in options]
        normed = [s / len(o.encode()) for s, o in zip(scores, options, strict=True)]
        want = row["answer"] if isinstance(row["answer"], int) else "ABCDE".index(row["answer"])
        pick = max(range(len(scores)), key=scores.__getitem__)
        pick_norm = max(range(len(normed)), key=normed.__getitem__)
        records.append({"index": i, "scores": scores, "choice": pick, "correct": pick == want, "choice_norm": pick_norm,
                        "correct_norm": pick_norm == want, "prompt": context,
                        "reference": f"{'ABCDE'[want]}. {row['choices'][want]}"})
    summary = {"problems": len(rows), "accuracy": sum(r["correct"] for r in records) / len(rows),
               "accuracy_norm": sum(r["correct_norm"] for r in records) / len(rows)}
    return summary, records


def assert_same_records(got, want):
    """Scores within the tolerance, everything else (choices, correctness, prompt, reference) equal."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g["scores"] == pytest.approx(w["scores"], **TOLERANCE)
        assert {k: v for k, v in g.items() if k != "scores"} == {k: v for k, v in w.items() if k != "scores"}


def test_batched_option_logliks_match_one_forward_per_option(model, tok):
    questions = [(row["question"], [" " + c for c in row["choices"]]) for row in ROWS]
    questions.append(("Empty and one-byte options:", ["", " ", " a"]))  # no option token; one token
    got = options_loglik(model, tok, questions)
    want = [[option_loglik(model, tok, context, o) for o in options] for context, options in questions]
    assert [len(g) for g in got] == [len(options) for _, options in questions]
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, **TOLERANCE)
    assert got[-1][0] == 0.0  # an option of no tokens has probability 1, as alone
    # a question scored alone, in a batch of one, gives the same sums as in the batch
    assert options_loglik(model, tok, questions[2:3])[0] == pytest.approx(got[2], **TOLERANCE)
    assert options_loglik(model, tok, []) == []


@pytest.mark.parametrize("batch_size", [1, 2, 3, 64])  # one question, some, a batch larger than all of them
def test_mc_scores_choices_and_accuracy_match_one_forward_per_option(model, tok, batch_size):
    want_summary, want = one_option_at_a_time(model, tok, ROWS)
    summary, records = mc_loglik(model, tok, ROWS, batch_size=batch_size)
    assert_same_records(records, want)
    assert summary == want_summary  # accuracy and the length-normalised accuracy_norm, exactly


@dataclass(frozen=True)
class SharedOut(World):
    """Process ``rank`` of ``size`` without torch.distributed: ``gather`` returns the parts the processes run
    so far handed in (run the others first, then rank 0 gets the whole result)."""

    parts: dict = field(default_factory=dict, compare=False)

    def gather(self, value, device: str = "cpu") -> list:
        self.parts[self.rank] = value
        return [self.parts.get(r, []) for r in range(self.size)]


def test_scoring_shared_over_processes_is_the_one_process_result_bit_for_bit(model, tok):
    one = mc_loglik(model, tok, ROWS, batch_size=2)
    parts: dict = {}
    mc_loglik(model, tok, ROWS, world=SharedOut(1, 2, parts=parts), batch_size=2)
    assert parts[1] and len(parts[1]) < len(ROWS)  # process 1 scored whole batches, not all of them
    assert mc_loglik(model, tok, ROWS, world=SharedOut(0, 2, parts=parts), batch_size=2) == one


def test_generation_sorted_by_length_returns_the_prompts_order(model, tok):
    prompts = ["Hi", "A long prompt, longer than every other prompt here by far.", "Mid-sized one", "Q", "Two words"]
    greedy = Decoding(max_new_tokens=6, batch_size=2)
    alone = [generate_all(model, tok, [p], Decoding(max_new_tokens=6, batch_size=1), progress=False)[0]
             for p in prompts]
    assert generate_all(model, tok, prompts, greedy, progress=False) == alone  # in order; padding changes nothing
    sampled = Decoding(max_new_tokens=6, n=2, temperature=1.0, batch_size=3, seed=1)
    one = generate_all(model, tok, prompts, sampled, progress=False)
    assert [len(c) for c in one] == [2] * len(prompts)
    parts: dict = {}
    generate_all(model, tok, prompts, sampled, progress=False, world=SharedOut(1, 2, parts=parts))
    assert generate_all(model, tok, prompts, sampled, progress=False, world=SharedOut(0, 2, parts=parts)) == one
