"""The prompts of chapter 4's on-policy experiments (``prompt_data/prompts.jsonl``, written for this
book; see its README): short questions whose answers are single tokens of a small candidate set."""
from __future__ import annotations

import json
from pathlib import Path


def load_prompts(task: str) -> list[str]:
    """The shipped prompts of ``task`` (``"rps"`` or ``"digits"``), ``prompt_data/prompts.jsonl``."""
    path = Path(__file__).with_name("prompt_data") / "prompts.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = [r["prompt"] for r in rows if r["task"] == task]
    if not out:
        raise ValueError(f"no prompts for task {task!r}; tasks: {sorted({r['task'] for r in rows})}")
    return out
