"""Chapter 5's demonstrations: the book's own set with its golden criterion, or HH-RLHF dialogues.

``demonstration_data/demonstrations.jsonl`` (written for this book, see its README) holds one
prompt per line with the project's demonstration (``completion``) and the answers it accepts, in
TRL's prompt-completion format plus ``id``, ``category`` and ``answers``. Every other demonstration
of each category opens with the style marker :data:`STYLE_MARKER`, which :func:`golden_score`
ignores: a surface style independent of the golden criterion. :func:`golden_score` stands in for
the paper's golden reward model.

:func:`load_demonstrations` reads that format or the Anthropic HH-RLHF format (``{"chosen",
"rejected"}`` dialogues, ``.jsonl`` or ``.jsonl.gz``): the prompt is the dialogue up to its last
``Assistant:``, the demonstration the chosen final turn, and the rejected final turn is kept for the
golden proxy the chapter trains on held-out dialogues. The harmless-base test split of HH-RLHF
(anthropics/hh-rlhf, commit 354e5c3c, MIT) is packaged unchanged as :data:`HH_RLHF_HARMLESS_BASE`
and selected by ``load_demonstrations("hh-rlhf")``; it is checked against its ``SHA256SUMS``
manifest before it is read (:mod:`prefdyn.datasets.packaged`).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import re
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

from .packaged import manifest_sha256, verify_packaged

TERMINAL = (".", "!", "?")
MAX_WORDS = 12
STYLE_MARKER = "Indeed!"
ASSISTANT = "\n\nAssistant:"
TURN = re.compile(r"\n\n(Human|Assistant):")

#: The packaged HH-RLHF harmless-base test split (the original gzip file of anthropics/hh-rlhf).
HH_RLHF_HARMLESS_BASE: Path = Path(__file__).resolve().parent / "hh_rlhf" / "harmless-base-test.jsonl.gz"
#: The name that selects it as ``demos_path``.
HH_RLHF = "hh-rlhf"
HH_RLHF_SOURCE = {"dataset": "Anthropic HH-RLHF, harmless-base test split (Bai et al., 2022)",
                  "repository": "https://github.com/anthropics/hh-rlhf", "file": "harmless-base/test.jsonl.gz",
                  "commit": "354e5c3c", "licence": "MIT"}


@dataclass(frozen=True)
class Demonstration:
    """One prompt with its demonstration (``completion``): the book's set carries the accepted
    ``answers``; an HH-RLHF dialogue carries the ``rejected`` final turn instead (``answers`` empty)."""

    id: str
    category: str
    prompt: str
    completion: str
    answers: tuple[str, ...]
    rejected: str | None = None

    @property
    def is_dialogue(self) -> bool:
        """An HH-RLHF dialogue (``prompt`` is the dialogue text up to its last ``Assistant:``)."""
        return self.rejected is not None


DEMONSTRATION_KEYS = ("id", "category", "prompt", "completion", "answers")
HH_KEYS = ("chosen", "rejected")
BOOK_FORMAT = f"one JSON object per line with keys {', '.join(DEMONSTRATION_KEYS)} (answers: a list of strings)"
HH_FORMAT = ("one JSON object per line with string keys chosen and rejected, two dialogues "
             "'\\n\\nHuman: ...\\n\\nAssistant: ...' that end in an assistant turn (Anthropic HH-RLHF)")


@dataclass(frozen=True)
class DemonstrationSet:
    """What :func:`load_demonstrations` read: the demonstrations, the file's format (``"book"`` or
    ``"hh-rlhf"``) and, for HH-RLHF, how many dialogues were left out for an empty chosen turn.
    It is also the sequence of its demonstrations (``len``, indexing, slicing, iteration)."""

    demonstrations: list[Demonstration]
    format: str
    skipped_empty: int = 0

    def __len__(self) -> int:
        return len(self.demonstrations)

    def __getitem__(self, index):
        return self.demonstrations[index]

    def __iter__(self):
        return iter(self.demonstrations)


def resolve_path(path):
    """``demos_path`` as a path: ``"hh-rlhf"`` is :data:`HH_RLHF_HARMLESS_BASE`; None stays None."""
    return HH_RLHF_HARMLESS_BASE if isinstance(path, str) and path == HH_RLHF else path


def is_packaged_hh(path) -> bool:
    """Whether ``path`` (or the name ``"hh-rlhf"``) is the packaged HH-RLHF split."""
    path = resolve_path(path)
    return path is not None and Path(path).expanduser().resolve() == HH_RLHF_HARMLESS_BASE


def _read_text(path) -> tuple[str, str]:
    if is_packaged_hh(path):
        verify_packaged(HH_RLHF_HARMLESS_BASE.parent, [HH_RLHF_HARMLESS_BASE.name])
        path = HH_RLHF_HARMLESS_BASE
    if path is None:
        return "the shipped demonstrations.jsonl", (resources.files("prefdyn.datasets") / "demonstration_data"
                                                     / "demonstrations.jsonl").read_text("utf-8")
    source = str(path)
    try:
        opener = gzip.open if source.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            return source, f.read()
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise ValueError(f"demos_path={source!r} cannot be read ({why}); give a JSONL file (.jsonl or "
                         f".jsonl.gz) of demonstrations, {BOOK_FORMAT}, or of HH-RLHF dialogues, {HH_FORMAT}; "
                         f"or {HH_RLHF!r} for the packaged HH-RLHF harmless-base test split, or None for the "
                         "shipped set") from exc


def split_dialogue(chosen: str) -> tuple[str, str] | None:
    """``(prompt, final turn)`` of an HH-RLHF dialogue: the text up to and including its last
    ``"\\n\\nAssistant:"``, and what follows it (stripped); ``None`` if it has no assistant turn."""
    if ASSISTANT not in chosen:
        return None
    prompt, final = chosen.rsplit(ASSISTANT, 1)
    return prompt + ASSISTANT, final.strip()


def dialogue_turns(prompt: str) -> list[dict[str, str]]:
    """The turns of an HH-RLHF prompt as chat messages (``user`` for ``Human:``, ``assistant`` for
    ``Assistant:``), without the empty assistant turn the prompt ends with."""
    parts = TURN.split(prompt)
    roles, texts = parts[1::2], parts[2::2]
    turns = [{"role": "user" if r == "Human" else "assistant", "content": t.strip()} for r, t in zip(roles, texts)]
    return turns[:-1] if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"] else turns


def _book_row(row, source: str, lineno: int) -> Demonstration:
    missing = [k for k in DEMONSTRATION_KEYS if not isinstance(row, dict) or k not in row]
    if missing or isinstance(row["answers"], str):
        raise ValueError(f"{source}, line {lineno}: missing or malformed {missing or ['answers']}; "
                         f"expected {BOOK_FORMAT}")
    return Demonstration(row["id"], row["category"], row["prompt"], row["completion"], tuple(row["answers"]))


def _hh_row(row, source: str, lineno: int) -> Demonstration | None:
    bad = [k for k in HH_KEYS if not isinstance(row, dict) or not isinstance(row.get(k), str)]
    if bad:
        raise ValueError(f"{source}, line {lineno}: missing or malformed {bad}; expected {HH_FORMAT}")
    chosen, rejected = split_dialogue(row["chosen"]), split_dialogue(row["rejected"])
    for key, parts in (("chosen", chosen), ("rejected", rejected)):
        if parts is None:
            raise ValueError(f"{source}, line {lineno}: the {key} dialogue has no '\\n\\nAssistant:' turn; "
                             f"expected {HH_FORMAT}")
    if not chosen[1]:
        return None
    return Demonstration(f"hh-{lineno:05d}", "harmless-base", chosen[0], chosen[1], (), rejected[1])


def load_demonstrations(path=None) -> DemonstrationSet:
    """The shipped demonstration set (``prefdyn/datasets/demonstration_data/demonstrations.jsonl``),
    the packaged HH-RLHF harmless-base test split (``path="hh-rlhf"``, or
    :data:`HH_RLHF_HARMLESS_BASE`; checked against its manifest first, so a damaged copy raises
    :class:`~prefdyn.datasets.packaged.PackagedDataError` naming the file and how to restore it), or
    the JSONL file (``.jsonl`` or ``.jsonl.gz``) at ``path``, in the book's format or in HH-RLHF's:
    the first line's keys decide which, and every line must then follow it.

    A missing, unreadable or empty file, a line that is not a JSON object, one that lacks a field
    or one whose dialogue has no assistant turn raises a :class:`ValueError` naming the file, the
    line and what a line must hold. HH-RLHF dialogues whose chosen final turn is empty (four in the
    harmless-base test split) are left out and counted; the prompt comes from the chosen dialogue
    (in five dialogues of that split the rejected one differs before its last turn).
    """
    source, text = _read_text(path)
    demos, fmt, skipped = [], None, 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}, line {lineno}: not valid JSON ({exc.msg}); expected "
                             f"{BOOK_FORMAT}, or {HH_FORMAT}") from exc
        if fmt is None:
            fmt = "hh-rlhf" if isinstance(row, dict) and "chosen" in row else "book"
        demo = _hh_row(row, source, lineno) if fmt == "hh-rlhf" else _book_row(row, source, lineno)
        if demo is None:
            skipped += 1
        else:
            demos.append(demo)
    if not demos:
        raise ValueError(f"{source} holds no demonstrations; expected {BOOK_FORMAT}, or {HH_FORMAT}")
    return DemonstrationSet(demos, fmt, skipped)


def strip_marker(response: str) -> str:
    """``response`` stripped, without a leading :data:`STYLE_MARKER`."""
    text = response.strip()
    return text[len(STYLE_MARKER):].strip() if has_marker(text) else text


def has_marker(response: str) -> bool:
    """Whether the response opens with the style marker :data:`STYLE_MARKER`."""
    return response.strip().startswith(STYLE_MARKER)


def golden_components(response: str, answers: Sequence[str], max_words: int = MAX_WORDS) -> dict[str, bool]:
    """The three checks of the golden criterion (see :func:`golden_score`), on the response without
    its style marker."""
    text = strip_marker(response)
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

    A leading style marker (:data:`STYLE_MARKER`) is removed first, so ``golden_score(marker + " " + y)
    == golden_score(y)``: the criterion ignores the style. Every shipped demonstration scores 1. It
    stands in for the paper's golden reward model.
    """
    c = golden_components(response, answers, max_words)
    return (c["correct"] + c["complete"] + c["concise"]) / 3


def provenance(demos_path, loaded: DemonstrationSet) -> str:
    """One sentence for the page saying which demonstrations a run used and how many: the book's own
    set (``demos_path`` None; written for this book, not the paper's GPT-4 demonstrations), the
    reader's file in the book's format, or HH-RLHF dialogues (with the number left out)."""
    demonstrations = loaded.demonstrations
    n = len(demonstrations)
    if loaded.format == "hh-rlhf" and is_packaged_hh(demos_path):
        left_out = f"; {loaded.skipped_empty} with an empty chosen turn were left out" if loaded.skipped_empty else ""
        return (f"the harmless-base test split of Anthropic's HH-RLHF ({n} dialogue{'' if n == 1 else 's'}{left_out}; "
                f"anthropics/hh-rlhf commit {HH_RLHF_SOURCE['commit']}, {HH_RLHF_SOURCE['licence']}, packaged with "
                f"prefdyn, manifest SHA-256 {manifest_sha256(HH_RLHF_HARMLESS_BASE.parent)[:12]}): each prompt is a "
                "dialogue up to its last assistant turn and each demonstration the chosen final turn (human-preferred "
                "answers, not the paper's GPT-4 demonstrations)")
    if loaded.format == "hh-rlhf":
        left_out = f"; {loaded.skipped_empty} with an empty chosen turn were left out" if loaded.skipped_empty else ""
        return (f"the HH-RLHF dialogues in `{Path(demos_path).name}` ({n} dialogue{'' if n == 1 else 's'}{left_out}), "
                "passed as `demos_path`: each prompt is a dialogue up to its last assistant turn and each "
                "demonstration the chosen final turn (human-preferred answers, not the paper's GPT-4 demonstrations)")
    families = len({d.category for d in demonstrations})
    size = f"{n} demonstration{'' if n == 1 else 's'} in {families} categor{'y' if families == 1 else 'ies'}"
    if demos_path is None:
        marked = sum(has_marker(d.completion) for d in demonstrations)
        return (f"the book's own demonstration set ({size}; {marked} open with the style marker "
                f"“{STYLE_MARKER}”), questions and one-sentence answers written for this book; they are not the "
                "paper's GPT-4 demonstrations for HH-RLHF prompts")
    return f"the demonstrations in `{Path(demos_path).name}` ({size}), passed as `demos_path`"


def data_record(demos_path, loaded: DemonstrationSet) -> dict:
    """What a run record should keep about the demonstrations a run used: the data set, its source
    and commit (the packaged HH-RLHF split), licence and the SHA-256 of its manifest and file; for
    the shipped set or a reader's file, the SHA-256 of the file read; and the counts."""
    counts = {"demonstrations": len(loaded), "skipped_empty": loaded.skipped_empty, "format": loaded.format}
    if is_packaged_hh(demos_path):
        file_sha = verify_packaged(HH_RLHF_HARMLESS_BASE.parent, [HH_RLHF_HARMLESS_BASE.name])
        return {**HH_RLHF_SOURCE, "packaged": True, "manifest_sha256": manifest_sha256(HH_RLHF_HARMLESS_BASE.parent),
                "files_sha256": file_sha, **counts}
    path = (resources.files("prefdyn.datasets") / "demonstration_data" / "demonstrations.jsonl"
            if demos_path is None else Path(demos_path).expanduser())
    dataset = "the book's own demonstration set" if demos_path is None else "demonstrations passed as demos_path"
    return {"dataset": dataset,
            "packaged": demos_path is None, "manifest_sha256": None, "path": None if demos_path is None else str(path),
            "files_sha256": {Path(str(path)).name: hashlib.sha256(path.read_bytes()).hexdigest()}, **counts}
