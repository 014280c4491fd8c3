"""The repetition guard: it stops output that loops, and never a page of honest repeated structure
(empty forms, checkbox grids, tables of zeros, dotted leaders), tokenised as the model would write it."""

from __future__ import annotations

import pytest

from gnosis_ocr.worker.engines.repetition import RepetitionGuard

GUARD = dict(window=512, max_tokens=4096)
"""The service's defaults: a 512-token window, a 4,096-token cap, 100 repeats."""


@pytest.fixture(scope="module")
def tokenize(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def row(cells: list[str]) -> str:
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>\n"


LEGITIMATE = {
    "an empty 20-row table": "<table>\n" + row(["Name", "Date", "Hours", "Signature"]) + row([""] * 4) * 20
                             + "</table>",
    "a 60-row table of zeros": "<table>\n" + row(["0", "0", "0", "0.00"]) * 60 + "</table>",
    "a timesheet of dashes and N/A": "<table>\n" + row(["-", "N/A", "-", "N/A", ""]) * 45 + "</table>",
    "a checkbox grid": ("☐ " * 12 + "\n") * 40,
    "dotted leaders": "".join(f"Section {n} {'.' * 60} {n * 3}\n" for n in range(1, 50)),
    "a dotted fill-in form": ("Name: " + "_" * 70 + "\n" + "Date: " + "." * 40 + "\n") * 30,
    "blank lines between paragraphs": "".join(f"Paragraph {n} of the letter.\n\n\n\n" for n in range(80)),
}

# A unit must repeat 100 times within the cap to be caught: with a 4,096-token cap, units of up to 40
# tokens (a table row in the real tokenizer; this byte-level one spends more). Longer loops run to the
# cap and are marked truncated by it.
LOOPING = {
    "a row repeated until the cap": "<table>\n" + row(["1", "0.00"]) * 400,
    "one token forever": "\n" * 2000,
    "a sentence looping": "The quick brown fox. " * 300,
    "a cell repeated without end": "<tr>" + "<td></td>" * 600,
}


@pytest.mark.parametrize("name", sorted(LEGITIMATE))
def test_honest_repeated_structure_is_never_stopped(tokenize, name):
    tokens = tokenize(LEGITIMATE[name])
    assert not RepetitionGuard(**GUARD).repeating(tokens), f"{name} ({len(tokens)} tokens) was cut"


@pytest.mark.parametrize("name", sorted(LOOPING))
def test_looping_output_is_stopped_before_the_cap(tokenize, name):
    tokens = tokenize(LOOPING[name])[:4096]
    watcher, written, stopped_at = RepetitionGuard(**GUARD).watch(), [], None
    for token in tokens:
        written.append(token)
        if watcher.update(written):
            stopped_at = len(written)
            break
    assert stopped_at is not None, f"{name} ({len(tokens)} tokens) was never stopped"
    assert stopped_at < 4096


def test_a_loop_needs_both_the_window_and_the_repeats():
    guard = RepetitionGuard(window=32, min_repeats=4, every=1)
    assert guard.repeating([7] * 40)
    assert guard.repeating(list(range(50)) + [1, 2, 3] * 11)
    assert not guard.repeating([1, 2, 3] * 8)  # shorter than the window
    assert not guard.repeating(list(range(64)))
    assert not guard.repeating(list(range(20)) * 3)  # a unit of 20: fewer than 4 repeats
    assert not RepetitionGuard(window=0).repeating([7] * 1000)


def test_checking_in_strides_gives_the_same_answer_as_every_token():
    tokens = list(range(300)) + [5, 6, 7, 8] * 150
    every_token = RepetitionGuard(window=64, min_repeats=20, every=1).repeating(tokens)
    strided = RepetitionGuard(window=64, min_repeats=20, every=16).repeating(tokens)
    assert every_token and strided
