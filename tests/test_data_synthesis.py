"Data synthesis (SELF-GUIDE, non-instructional pairs): the bundled tasks' verifiers, the filters, the text split, bad input and registration."
import pytest
from peftlab.core.data import get_task
from peftlab.core.registry import get_method
from peftlab.data.core import select
from peftlab.data.self_guide import (SOLVERS, task_verifier, seed_profile, input_reason, answer_reason, normalised,
                                     self_guide, SELF_GUIDE_PAPER)
from peftlab.data.non_instructional import split_text, non_instructional, NON_INSTRUCTIONAL_PAPER

@pytest.mark.parametrize("task", sorted(SOLVERS))
def test_solver_answers_every_generated_example(task):
    t = get_task(task, n_train=80, n_test=20, seed=11)
    assert [SOLVERS[task](e["prompt"]) for e in t.train + t.test] == [e["answer"] for e in t.train + t.test]

VERDICTS = [  # task, prompt, answer, right?
    ("arithmetic", "What is 19 + 23?", "42", True),
    ("arithmetic", "What is 19 + 23?", "41", False),
    ("sort_numbers", "Sort these numbers from smallest to largest: 30, 4, 17", "4, 17, 30", True),
    ("sort_numbers", "Sort these numbers from smallest to largest: 30, 4, 17", "4, 30, 17", False),
    ("reverse_words", "Reverse the order of these words: kitten ladder", "ladder kitten", True),
    ("iso_date", "Write 7 June 1950 as a date.", "1950-06-07", True),
    ("iso_date", "Write the 22nd of June 1950 as a date.", "1950-06-21", False),
    ("record_format", "Make a record: In Oslo lives Ana, who is 34.", "name: Ana | age: 34 | city: Oslo", True),
    ("record_format", "Make a record: In Oslo lives Ana.", "name: Ana | age: 34 | city: Oslo", False),   # not an input of the task
    ("reverse_words", "What is 1 + 2?", "2 + 1 is What", False),                                            # another task's input
]

@pytest.mark.parametrize("task,prompt,answer,right", VERDICTS)
def test_verifier(task, prompt, answer, right):
    assert task_verifier(task)(prompt, answer) is right

def test_no_verifier_for_facts():
    assert task_verifier("fictional_facts") is None

SEEDS = [dict(prompt="Reverse the order of these words: apple river stone", answer="stone river apple"),
         dict(prompt="Reverse the order of these words: tiger paper", answer="paper tiger")]
INPUTS = [  # generated input, why it is dropped (None: kept)
    ("Reverse the order of these words: zebra wagon", None),
    ("Reverse the order of these words: tiger  PAPER", "duplicate"),
    ("Reverse these words: zebra wagon", "format: does not open as the seeds do"),
    ("Reverse the order of these words: " + "zebra " * 12, "length: input"),
    ("Task: Reverse the order of these words: zebra", "noise: template text"),
    ("   ", "noise: empty"),
]

@pytest.mark.parametrize("text,reason", INPUTS)
def test_input_filters(text, reason):
    from peftlab.core.models import load_tokenizer
    seen = {normalised(s["prompt"]) for s in SEEDS}
    assert input_reason(text, seed_profile(SEEDS, slack=0.5), seen, load_tokenizer("tiny-llama")) == reason

def test_answer_length_range():
    from peftlab.core.models import load_tokenizer
    profile, tok = seed_profile(SEEDS, slack=0.5), load_tokenizer("tiny-llama")
    assert profile.answer_lengths == (1, 5)           # floor(2 * 0.5), ceil(3 * 1.5)
    assert [answer_reason(a, profile, tok) for a in ("wagon zebra", "a b c d e f")] == [None, "length: answer"]

SPLITS = [("a b c d e f g h", ("a b c d", "e f g h")), ("a b c d e f g h i", ("a b c d", "e f g h i"))]

@pytest.mark.parametrize("text,halves", SPLITS)
def test_split_text(text, halves):
    assert split_text(text) == halves

BAD = [  # call, what the error says
    (lambda: self_guide(None, None, "arithmetic", [], 4), "needs seed examples"),
    (lambda: self_guide(None, None, "arithmetic", SEEDS, 0), "n=0: ask for a positive number"),
    (lambda: self_guide(None, None, "arithmetic", SEEDS, -3), "n=-3"),
    (lambda: self_guide(None, None, "arithmetic", SEEDS, 4, oversample=0.5), "oversample"),
    (lambda: non_instructional(["far too short"], None, None), "texts[0]: the text 'far too short' has 3 word(s): too short to split"),
    (lambda: non_instructional([], None, None), "non-empty list"),
]

@pytest.mark.parametrize("call,message", BAD)
def test_bad_input(call, message):
    with pytest.raises(ValueError) as e: call()
    assert message in str(e.value)

@pytest.mark.parametrize("name,paper", [("self-guide", SELF_GUIDE_PAPER), ("non-instructional", NON_INSTRUCTIONAL_PAPER)])
def test_registered_but_not_a_selector(name, paper):
    m = get_method(name)
    assert (m.category, m.paper) == ("data", paper) and m.apply.synthesiser   # marked, so selector families leave it out
    with pytest.raises(TypeError, match="writes new examples rather than selecting"):
        select([dict(prompt="a", answer="b")] * 3, name, 2)
