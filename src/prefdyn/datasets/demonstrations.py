"""The book's demonstration set for chapter 5 and its golden criterion.

``demonstration_data/demonstrations.jsonl`` (written for this book, see its README) holds one
prompt per line with the project's demonstration (``completion``) and the answers it accepts, in
TRL's prompt-completion format plus ``id``, ``category`` and ``answers``. :func:`golden_score`
stands in for the paper's golden reward model.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

TERMINAL = (".", "!", "?")
MAX_WORDS = 12


@dataclass(frozen=True)
class Demonstration:
    """One prompt with the project's demonstration (``completion``) and its accepted answers."""

    id: str
    category: str
    prompt: str
    completion: str
    answers: tuple[str, ...]


DEMONSTRATION_KEYS = ("id", "category", "prompt", "completion", "answers")


def load_demonstrations(path=None) -> list[Demonstration]:
    """The shipped demonstration set (``prefdyn/datasets/demonstration_data/demonstrations.jsonl``; TRL's
    prompt-completion format plus ``id``, ``category`` and ``answers``), or a JSONL file at ``path``.

    A missing or empty file, a line that is not a JSON object, or one that lacks a field raises a
    :class:`ValueError` naming the file, the line and what a line must hold.
    """
    if path is None:
        source = "the shipped demonstrations.jsonl"
        text = (resources.files("prefdyn.datasets") / "demonstration_data" / "demonstrations.jsonl").read_text("utf-8")
    else:
        source = str(path)
        try:
            text = open(path, encoding="utf-8").read()
        except OSError as exc:
            raise ValueError(f"demonstrations_path={source!r} cannot be read ({exc.strerror}); give a JSONL file "
                             "with one demonstration per line, or None for the shipped set") from exc
    expected = f"one JSON object per line with keys {', '.join(DEMONSTRATION_KEYS)} (answers: a list of strings)"
    demos = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}, line {lineno}: not valid JSON ({exc.msg}); expected {expected}") from exc
        missing = [k for k in DEMONSTRATION_KEYS if not isinstance(row, dict) or k not in row]
        if missing or isinstance(row["answers"], str):
            raise ValueError(f"{source}, line {lineno}: missing or malformed {missing or ['answers']}; "
                             f"expected {expected}")
        demos.append(Demonstration(row["id"], row["category"], row["prompt"], row["completion"], tuple(row["answers"])))
    if not demos:
        raise ValueError(f"{source} holds no demonstrations; expected {expected}")
    return demos


def golden_components(response: str, answers: Sequence[str], max_words: int = MAX_WORDS) -> dict[str, bool]:
    """The three checks of the golden criterion (see :func:`golden_score`)."""
    text = response.strip()
    lower = text.lower()
    return {
        "correct": any(re.search(r"(?<!\w)" + re.escape(a.lower()) + r"(?!\w)", lower) for a in answers),
        "complete": text.endswith(TERMINAL),
        "concise": 0 < len(text.split()) <= max_words,
    }


def golden_score(response: str, answers: Sequence[str], max_words: int = MAX_WORDS) -> float:
    """The project's golden criterion, in ``{0, 1/3, 2/3, 1}``: the mean of three checks.

    * ``correct``: an accepted answer occurs as a whole word (case-insensitive);
    * ``complete``: the response ends with ``.``, ``!`` or ``?`` (it stopped by itself at the end of
      a sentence, not at the token budget);
    * ``concise``: it has between 1 and ``max_words`` words.

    Every shipped demonstration scores 1. It stands in for the paper's golden reward model.
    """
    c = golden_components(response, answers, max_words)
    return (c["correct"] + c["complete"] + c["concise"]) / 3


def provenance(demonstrations_path, demonstrations: Sequence[Demonstration]) -> str:
    """One sentence for the page saying which demonstrations a run used and how many: the book's own
    set (``demonstrations_path`` None; written for this book, not the paper's GPT-4 demonstrations)
    or the reader's file, with the number of demonstrations and of categories."""
    families = len({d.category for d in demonstrations})
    n = len(demonstrations)
    size = f"{n} demonstration{'' if n == 1 else 's'} in {families} categor{'y' if families == 1 else 'ies'}"
    if demonstrations_path is None:
        return (f"the book's own demonstration set ({size}), questions and one-sentence answers written "
                "for this book; they are not the paper's GPT-4 demonstrations for HH-RLHF prompts")
    return f"the demonstrations in `{Path(demonstrations_path).name}` ({size}), passed as `demonstrations_path`"
