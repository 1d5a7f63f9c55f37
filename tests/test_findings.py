"""prefdyn.book.glue.glue_findings: a chapter's closing verdict sentences, the ones a reader must see
first (not reproduced, inconclusive) first."""
from types import SimpleNamespace

import pytest

from prefdyn.book import glue


def checks(**statuses):
    return SimpleNamespace(checks=[SimpleNamespace(prediction={"id": pid.replace("_", "-")}, status=s)
                                   for pid, s in statuses.items()]
                           + [SimpleNamespace(prediction=None, status="pass")])


def test_findings_put_failures_and_inconclusive_verdicts_first(monkeypatch):
    glued = {}
    monkeypatch.setattr(glue, "glue_markdown", lambda name, text: glued.update({name: text}))
    verification = checks(a="reproduced", b="inconclusive (failed; power 0.41 < 0.8)", c="not reproduced",
                          d="implied by eq-1", e="underpowered")
    glue.glue_findings("found", verification, {"a": "A held.", "b": "B", "c": "C", "d": "D", "e": "E"})
    lines = glued["found"].split("\n")
    assert [line.split("(`")[1][0] for line in lines] == ["c", "b", "e", "d", "a"]
    assert lines[-1] == "- A held (`a`): **reproduced**."
    with pytest.raises(ValueError, match="sentences for"):
        glue.glue_findings("found", verification, {"a": "A"})
