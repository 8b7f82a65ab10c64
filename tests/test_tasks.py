"""Behavioural tests for the locked quality data: harness/tasks.py, tasks.yaml, corpus.txt.

No mocks: every check runs for real, including the subprocess that runs model code.
"""

from __future__ import annotations

import builtins
import random
import re
import time
from dataclasses import replace
from pathlib import Path

import pytest

from harness.corpus import CORPUS_PATH, load_corpus
from harness.tasks import TASKS_PATH, Task, check, extract_code, extract_final_number, load_tasks

TASKS = load_tasks()
BY_ID = {t.id: t for t in TASKS}

# A known-good answer for every task, written the way a chat model would answer.
GOOD = {
    "train_speed": "To find the average speed, divide the distance by the time: 240 / 5 = 48. "
    "The average speed is 48 km/h.",
    "add_small": "7 + 5 = 12",
    "multiply_small": "12 times 3 is 36.",
    "apples_left": "You started with 10 apples and ate 3, so you have 7 apples left.",
    "flour_for_cakes": "Each cake needs 250 grams, so 4 cakes need 4 x 250 = 1,000 grams of flour.",
    "temperature_drop": "It was 3 degrees and fell by 8 degrees, so 3 - 8 = -5. "
    "The morning temperature was -5 degrees Celsius.",
    "code_add": "Here is the function:\n\n```python\ndef add(a, b):\n    return a + b\n```\n\n"
    "It returns the sum of the two arguments.",
    "code_is_even": "```python\ndef is_even(n):\n    \"\"\"Return True if n is even.\"\"\"\n"
    "    return n % 2 == 0\n```",
    "code_reverse_string": "Sure! You can use slicing:\n\ndef reverse_string(s):\n    return s[::-1]\n\n"
    "This works because a step of -1 walks the string backwards.",
    "code_factorial": "```python\ndef factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n"
    "        result *= i\n    return result\n\n\nprint(factorial(5))  # 120\n```",
    "code_count_vowels": "```py\ndef count_vowels(s):\n    return sum(1 for c in s.lower() if c in 'aeiou')\n```",
    "explain_photosynthesis": "Photosynthesis is the process by which green plants use energy from sunlight "
    "to turn carbon dioxide and water into glucose. It takes place mainly in the leaves, where the "
    "pigment chlorophyll absorbs light. Oxygen is released as a by-product.",
    "explain_water_cycle": "The sun heats water in oceans, lakes and rivers, and it evaporates into the air "
    "as water vapour. As the vapour rises it cools and condenses into clouds. When the droplets grow "
    "heavy they fall as rain or snow, and the water flows back to the sea to begin the cycle again.",
    "explain_exercise": "Regular exercise makes your heart and lungs stronger and helps you keep a healthy "
    "weight. It also builds muscle and bone, lowers the risk of disease, and improves your mood and sleep.",
    "poem_sea": "The sea rolls in with silver foam,\nIt calls the wandering sailors home,\n"
    "The waves keep time upon the sand,\nAnd whisper to the quiet land.",
    "poem_autumn": "Golden leaves come drifting down,\nRed and orange, amber, brown,\n"
    "The cold wind sings through empty trees,\nAnd autumn dances on the breeze.",
    "capital_france": "Paris",
    "red_planet": "Mars.",
    "water_formula": "The chemical formula of water is H2O.",
    "largest_ocean": "Pacific",
}

RANDOM_WORDS = " ".join(
    "".join(random.Random(i).choices("abcdefghijklmnopqrstuvwxyz", k=random.Random(-i).randint(2, 9)))
    for i in range(60)
)
CORPUS_SALAD = " ".join(random.Random(0).sample(load_corpus()[0].split(), 80))

DEGENERATE = {
    "empty": "",
    "whitespace": "  \n\t ",
    "numbers": "48 48 48 48",
    "random_words": RANDOM_WORDS,
    "corpus_word_salad": CORPUS_SALAD,
    "repeated_token": "the " * 100,
    "repeated_token_no_space": "!" * 100,
    "repeated_number": "48 " * 100,
    "repeated_sentence": "The answer is yes. " * 30,
}


def task_ids(kind: str) -> list[str]:
    return [t.id for t in TASKS if t.kind == kind]


# ----------------------------------------------------------------------------- data


def test_task_mix():
    kinds = [t.kind for t in TASKS]
    assert len(TASKS) >= 10
    assert kinds.count("arithmetic") >= 2
    assert kinds.count("code") >= 3
    assert kinds.count("prose") >= 2
    assert kinds.count("poem") >= 1
    assert kinds.count("fact") >= 2
    assert BY_ID["train_speed"].prompt == "A train travels 240 km in 5 hours. What is its average speed in km/h?"
    assert BY_ID["train_speed"].params["answer"] == 48


def test_every_task_has_a_known_good_answer():
    assert set(GOOD) == set(BY_ID)


def test_corpus_is_long_plain_ascii_prose():
    text, sha = load_corpus()
    assert re.fullmatch(r"[0-9a-f]{64}", sha)
    assert load_corpus(CORPUS_PATH) == (text, sha)
    assert text.isascii()
    assert not re.search(r"[^\x20-\x7e\n]", text), "only printable ASCII and newlines"
    pieces = re.findall(r"\w+|[^\w\s]", text)  # rough stand-in for a BPE tokenizer
    assert len(pieces) >= 2000
    assert len(text.split()) * 1.3 >= 2000
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    assert len(paragraphs) >= 10
    for p in paragraphs:  # prose, not lists or markup
        assert not re.match(r"\s*([-*#>|`]|\d+[.)])", p)
        assert p.rstrip().endswith((".", "!", "?"))


# ----------------------------------------------------------------------------- good answers


@pytest.mark.parametrize("task_id", sorted(GOOD))
def test_good_answer_passes(task_id):
    ok, reason = check(BY_ID[task_id], GOOD[task_id])
    assert ok, reason


@pytest.mark.parametrize(
    "task_id, answer",
    [
        ("train_speed", "48"),
        ("train_speed", "48 km/h."),
        ("train_speed", "The answer is forty-eight."),
        ("add_small", "twelve"),
        ("add_small", "The answer is 12"),
        ("apples_left", "There are seven apples left."),
        ("flour_for_cakes", "1000 g"),
        ("temperature_drop", "-5"),
        ("temperature_drop", "The temperature was \u22125 \u00b0C."),
        ("code_add", "def add(a, b): return a + b"),
        ("code_add", "    def add(a, b):\n        return a + b"),
        ("code_add", "```\ndef add(a, b):\n    return a + b\n```"),
        ("code_add", "```python\ndef add(a, b):\n    return a + b"),  # truncated: no closing fence
        ("code_add", "```python\ndef add(a, b):\n    return a + b\n\nprint(add(2,"),  # truncated mid-call
        ("code_is_even", "```python\ndef is_even(n):\n    return n % 2 == 0\n\n"
         "if __name__ == '__main__':\n    print(is_even(int(input())))\n```"),
        ("water_formula", "H\u2082O"),
        ("capital_france", "The capital of France is Paris."),
        ("red_planet", "The Red Planet is a planet in the solar system known as Mars."),
        ("largest_ocean", "The largest ocean on Earth is the Pacific Ocean."),
    ],
)
def test_other_good_answers_pass(task_id, answer):
    ok, reason = check(BY_ID[task_id], answer)
    assert ok, reason


# ----------------------------------------------------------------------------- bad answers


@pytest.mark.parametrize("label", sorted(DEGENERATE))
@pytest.mark.parametrize("task_id", sorted(BY_ID))
def test_degenerate_answer_fails_every_task(task_id, label):
    ok, reason = check(BY_ID[task_id], DEGENERATE[label])
    assert not ok, f"{label!r} passed {task_id}: {reason}"


@pytest.mark.parametrize("task_id", sorted(BY_ID))
def test_echoed_prompt_fails(task_id):
    task = BY_ID[task_id]
    assert not check(task, task.prompt)[0]
    assert not check(task, f"{task.prompt}\n{task.prompt}\n{task.prompt}")[0]


@pytest.mark.parametrize(
    "task_id, answer, reason_part",
    [
        ("train_speed", "48 is wrong, the answer is 50.", "50 != 48"),
        ("train_speed", "The average speed is 46 km/h.", "final number 46 != 48"),
        ("train_speed", "It is 48 km/h. Check: 48 x 5 = 240.", "240 != 48"),
        ("train_speed", "I don't know.", "no number found"),
        ("add_small", "7 + 5 = 13", "13 != 12"),
        ("apples_left", "You have 10 - 3 apples.", "3 != 7"),
        ("temperature_drop", "The temperature was 5 degrees.", "5 != -5"),
        ("capital_france", "Paris, London, Berlin or Rome.", "wrong answer"),
        ("capital_france", "I think that the capital of France is a lovely old city in the north of Europe, "
         "and its name is Paris.",
         "too long"),
        ("capital_france", "Parisian", "does not mention"),
        ("red_planet", "Venus", "wrong answer"),
        ("red_planet", "Jupiter is the biggest planet.", "wrong answer"),
        ("water_formula", "H2O2", "does not mention"),
        ("explain_photosynthesis", "Photosynthesis is the process in which green plants use the energy "
         "of sunlight to make sugar and oxygen from water and carbon dioxide.", "1 sentences"),
        ("explain_photosynthesis", "It is a thing that happens. I am not sure what it means. "
         "Many people study it at school.", "keywords"),
        ("explain_photosynthesis", "Plants use sunlight to make sugar. Plants use sunlight to make sugar. "
         "Plants use sunlight to make sugar.", "repeated"),
        ("poem_sea", "The sea is blue and deep.", "lines"),
        ("poem_sea", "The sea is blue\nThe sea is blue\nThe sea is blue\nThe sea is blue", "distinct lines"),
        ("poem_sea", "I like my cat\nShe sleeps on the mat\nAnd that is that", "keywords"),
        # A real looping output from a 135M model.
        ("poem_sea", "The waves of the ocean, a tapestry woven with life,\n"
         "A canvas of endless blue, a canvas of endless blue,\n"
         "A realm where the unknown lies, a realm where the unknown lies,\n"
         "A world where the sea is a place, a place where the sea is a place,\n"
         "A world where the sea is a place, a place where the sea is a place,", "distinct-word ratio"),
    ],
)
def test_wrong_answer_fails_with_reason(task_id, answer, reason_part):
    ok, reason = check(BY_ID[task_id], answer)
    assert not ok
    assert reason_part in reason


@pytest.mark.parametrize(
    "answer, reason_part",
    [
        ("```python\ndef add(a, b)\n    return a + b\n```", "syntax error"),
        ("def add(a, b):\n    return a - b", "test failed: assert add(2, 3) == 5"),
        ("def add(a, b):\n    return 5", "test failed: assert add(-1, 1) == 0"),
        ("def plus(a, b):\n    return a + b", "no top-level function named 'add'"),
        ("def add(a, b):\n    return undefined_name", "NameError"),
        ("The function add(a, b) returns a + b.", "no code found"),
        ("import sys\nsys.exit(0)\ndef add(a, b):\n    return a + b", "SystemExit"),
        ("import os\ndef add(a, b):\n    os._exit(0)", "exited with status 0"),
        ("def add(a, b):\n    return add(a, b)", "RecursionError"),
    ],
)
def test_bad_code_fails(answer, reason_part):
    ok, reason = check(BY_ID["code_add"], answer)
    assert not ok
    assert reason_part in reason


def test_wrong_type_fails_is_even():
    ok, reason = check(BY_ID["code_is_even"], "def is_even(n):\n    return 1 - n % 2")
    assert not ok and "test failed" in reason


def test_infinite_loop_fails_by_timeout_quickly():
    start = time.monotonic()
    ok, reason = check(BY_ID["code_factorial"], "def factorial(n):\n    while True:\n        pass")
    elapsed = time.monotonic() - start
    assert not ok
    assert "timed out" in reason
    assert elapsed < 8


def test_short_timeout_param_is_honoured():
    task = replace(BY_ID["code_add"], params={**BY_ID["code_add"].params, "timeout_s": 0.5})
    start = time.monotonic()
    ok, reason = check(task, "import time\ntime.sleep(30)\ndef add(a, b):\n    return a + b")
    assert not ok and "timed out" in reason
    assert time.monotonic() - start < 3


def test_code_runs_only_in_a_subprocess(tmp_path, monkeypatch):
    # Relative file operations happen in the child's scratch directory, and
    # nothing the answer does touches this interpreter.
    monkeypatch.chdir(tmp_path)
    canary = tmp_path / "canary.txt"
    canary.write_text("still here")
    answer = (
        "import builtins, os\n"
        "builtins.HACKED = True\n"
        "os.remove('canary.txt')\n"
        "def add(a, b):\n    return a + b\n"
    )
    ok, reason = check(BY_ID["code_add"], answer)
    assert not ok and "FileNotFoundError" in reason
    assert canary.read_text() == "still here"
    assert not hasattr(builtins, "HACKED")

    # The same side effect inside a passing answer still stays in the child.
    ok, reason = check(BY_ID["code_add"], "import builtins\nbuiltins.HACKED = True\ndef add(a, b):\n    return a + b")
    assert ok, reason
    assert not hasattr(builtins, "HACKED")


def test_code_printing_in_a_loop_does_not_flood():
    answer = "import sys\nfor _ in range(200000):\n    print('spam' * 50)\n    sys.stderr.write('x' * 100)\n" \
        "def add(a, b):\n    return a + b"
    ok, reason = check(BY_ID["code_add"], answer)
    assert ok, reason


# ----------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    "text, expected",
    [
        ("48", 48.0),
        ("The average speed is 48 km/h.", 48.0),
        ("It costs 1,234,567.5 dollars.", 1234567.5),
        ("-5.", -5.0),
        ("from 10-3 we get", 3.0),
        ("3.14 is pi", 3.14),
        ("water is H2O", None),
        ("no numbers here", None),
        ("", None),
        ("twelve", 12.0),
        ("forty-eight km/h", 48.0),
        ("ninety nine", 99.0),
        ("the right one", None),
        ("there are two, but the answer is 7", 7.0),
        ("12, 24 and then 48", 48.0),
    ],
)
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


def test_extract_code():
    assert extract_code("no code at all") is None
    assert extract_code("Sure") is None
    fenced = "Text\n```python\nx = 1\n```\nmore\n```python\ndef f():\n    return 2\n```"
    assert extract_code(fenced) == "def f():\n    return 2"
    unfenced = "Here you go:\ndef f(x):\n    return x * 2\nThis doubles x.\nprint(f(2))"
    assert extract_code(unfenced) == "def f(x):\n    return x * 2"
    assert extract_code("```js\nfunction f() {}\n```") is None


# ----------------------------------------------------------------------------- loader validation


def write_tasks(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "tasks.yaml"
    path.write_text(body)
    return path


@pytest.mark.parametrize(
    "body, message",
    [
        ("tasks: []", "non-empty 'tasks' list"),
        ("tasks: [{id: a, kind: essay, prompt: hi, params: {}}]", "'kind' must be one of"),
        ("tasks: [{id: A b, kind: fact, prompt: hi, params: {answers: [x]}}]", "lowercase identifier"),
        ("tasks: [{id: a, kind: fact, prompt: '', params: {answers: [x]}}]", "'prompt'"),
        ("tasks: [{id: a, kind: fact, prompt: hi, params: {}}]", "missing param(s) ['answers']"),
        ("tasks: [{id: a, kind: fact, prompt: hi, params: {answers: [x], max_word: 3}}]", "unknown param"),
        ("tasks: [{id: a, kind: fact, prompt: hi, params: {answers: [x]}},"
         " {id: a, kind: fact, prompt: hi, params: {answers: [x]}}]", "duplicate id"),
        ("tasks: [{id: a, kind: arithmetic, prompt: 'What is 2 + 2?', params: {answer: four}}]",
         "'answer' must be a number"),
        ("tasks: [{id: a, kind: arithmetic, prompt: 'What is 4 + 0?', params: {answer: 0}}]",
         "last number equals the answer"),
        ("tasks: [{id: a, kind: code, prompt: hi, params: {function: f, tests: ['assert f(']}}]",
         "does not parse"),
        ("tasks: [{id: a, kind: code, prompt: hi, params: {function: f, tests: ['f()'], timeout_s: 60}}]",
         "timeout_s"),
        ("tasks: [{id: a, kind: poem, prompt: hi, params: {keywords: [x], min_keywords: 2}}]",
         "exceeds"),
        ("tasks: [{id: a, kind: fact, prompt: hi, params: {answers: [x]}, extra: 1}]", "unknown field"),
        ("tasks: [unclosed", "invalid YAML"),
    ],
)
def test_load_tasks_rejects_bad_data(tmp_path, body, message):
    with pytest.raises(ValueError) as info:
        load_tasks(write_tasks(tmp_path, body))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_load_tasks_default_path_and_types():
    assert load_tasks(TASKS_PATH) == TASKS
    for task in TASKS:
        assert isinstance(task, Task)
        with pytest.raises(Exception):
            task.id = "changed"  # frozen
