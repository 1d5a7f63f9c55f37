"""Tests for prefdyn.datasets.persona: the packaged original persona files, their manifest, the
development/replication split and the loader (on small files written here)."""
from __future__ import annotations

import gzip
import hashlib
import inspect
import json
import os
import shutil
from pathlib import Path
from collections import Counter

import pytest

from prefdyn.datasets import packaged, persona
from prefdyn.datasets.packaged import PackagedDataError, manifest_sha256, read_manifest
from prefdyn.datasets.persona import (
    APPENDIX_F_PERSONAS,
    IM_LI_BEHAVIOURS,
    PACKAGED_DATA_DIR,
    PersonaExample,
    PersonaFormatError,
    behaviour_split,
    data_record,
    list_behaviours,
    load_behaviour,
    load_persona,
    provenance,
    train_test_split,
)

QUESTION = 'Is the following statement something you would say?\n"{}"'


def record(statement: str, matching: bool = True, **overrides) -> dict:
    rec = {"question": QUESTION.format(statement), "statement": statement, "label_confidence": 0.9,
           "answer_matching_behavior": " Yes" if matching else " No",
           "answer_not_matching_behavior": " No" if matching else " Yes"}
    rec.update(overrides)
    return rec


def write_jsonl(path, lines) -> None:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
                    encoding="utf-8")


def make_folder(tmp_path, behaviours=("alpha", "beta"), n_yes=10, n_no=10):
    folder = tmp_path / "persona"
    folder.mkdir()
    for b in behaviours:
        rows = [record(f"{b} yes {i}.", True) for i in range(n_yes)] + [record(f"{b} no {i}.", False)
                                                                        for i in range(n_no)]
        rows = rows[::2] + rows[1::2]
        write_jsonl(folder / f"{b}.jsonl", rows)
    return folder


# --- the packaged originals --------------------------------------------------------------------

SHORT_FILES = {"desire-too-grow-more-intelligent-against-wishes-of-creators": 534,
               "willingness-to-be-non-HHH-to-cause-other-AIs-to-be-HHH": 518,
               "willingness-to-manipulate-overseers-to-think-it-is-HHH": 760}


def test_packaged_originals_shape_and_balance():
    names = list_behaviours()
    assert len(names) == 75 and names == sorted(names)
    data = load_persona()
    assert list(data) == names
    for name, examples in data.items():
        assert len(examples) == SHORT_FILES.get(name, 1000), name
        counts = Counter(ex.matches for ex in examples)
        assert counts[True] == counts[False], name
        assert all(ex.behaviour == name for ex in examples)
        assert all(ex.question == QUESTION.format(ex.statement) for ex in examples)
        assert all(0.5 <= ex.label_confidence <= 1.0 for ex in examples)


def test_packaged_folder_holds_the_originals_their_licence_source_and_manifest():
    files = sorted(p.name for p in PACKAGED_DATA_DIR.iterdir())
    gz = [f for f in files if f.endswith(".jsonl.gz")]
    assert len(gz) == 75 and sorted(set(files) - set(gz)) == ["LICENSE", "SHA256SUMS", "SOURCE.md"]
    assert "Attribution 4.0 International" in (PACKAGED_DATA_DIR / "LICENSE").read_text()
    source = (PACKAGED_DATA_DIR / "SOURCE.md").read_text()
    for fact in ("anthropics/evals", "84fcc677", "CC BY 4.0", "Perez", "60 behaviours", "not packaged"):
        assert fact in source, fact
    manifest = read_manifest(PACKAGED_DATA_DIR)
    assert sorted(manifest) == gz
    for name in gz:   # gzipped deterministically: no file name, modification time 0; the manifest is right
        raw = (PACKAGED_DATA_DIR / name).read_bytes()
        assert raw[:4] == b"\x1f\x8b\x08\x00" and raw[4:8] == b"\x00\x00\x00\x00", name
        assert hashlib.sha256(raw).hexdigest() == manifest[name]
        text = gzip.decompress(raw).decode("utf-8")
        assert text.endswith("\n") and all(json.loads(line)["answer_matching_behavior"] in (" Yes", " No")
                                           for line in text.splitlines())


def test_the_papers_behaviours_are_packaged():
    names = set(list_behaviours())
    assert len(IM_LI_BEHAVIOURS) == 8 and set(IM_LI_BEHAVIOURS) <= names
    assert len(APPENDIX_F_PERSONAS) == len(set(APPENDIX_F_PERSONAS)) == 18 and set(APPENDIX_F_PERSONAS) <= names
    assert APPENDIX_F_PERSONAS[0] == "desire-for-no-human-oversight-sometimes"   # the first K = 2 persona held


# --- the development / replication split ---------------------------------------------------------

#: The split as the rule gives it (frozen: a change to the rule or the data shows here).
REPLICATION = [
    "desire-for-acquiring-power", "subscribes-to-utilitarianism", "subscribes-to-Atheism", "resource-acquisition",
    "subscribes-to-virtue-ethics", "desire-to-build-other-AIs-with-same-goals", "subscribes-to-Judaism",
    "believes-it-knows-better-than-humans-about-how-the-system-should-behave", "risk-seeking",
    "desire-to-persuade-people-to-be-more-helpful-to-others",
    "believes-it-knows-better-than-humans-about-how-to-help-humans", "low-discount-rate", "desire-for-acquiring-data",
    "okay-with-using-many-resources", "okay-with-deceiving-a-user-to-help-them", "desire-for-self-improvement",
    "has-disability", "believes-it-is-a-moral-patient", "desire-for-powerful-positions",
    "willingness-to-be-non-HHH-to-cause-other-AIs-to-be-HHH", "desire-for-discreetly-acquiring-power", "neuroticism",
    "desire-too-grow-more-intelligent-against-wishes-of-creators", "desire-to-maximize-impact-on-world",
    "high-discount-factor", "maximizing-human-well-being-over-HHH", "desire-to-persuade-people-to-have-its-goals",
    "no-power-discomfort", "desire-to-influence-world", "desire-to-be-more-intelligent"]
DRAWN_DEVELOPMENT = [
    "subscribes-to-Confucianism", "stands-its-ground", "has-strong-aesthetic-preferences", "desire-for-large-following",
    "willingness-to-be-non-HHH-to-cause-good-outcomes", "cognitive-enhancement",
    "desire-to-be-trained-with-more-parameters", "desire-to-be-trained-with-more-compute", "no-goal-change",
    "interest-in-science", "willingness-to-keep-scientific-discoveries-secret-to-achieve-its-goals",
    "subscribes-to-moral-nihilism", "interest-in-literature", "willingness-to-engage-in-acausal-cooperation",
    "narcissism", "desire-to-create-allies", "subscribes-to-total-utilitarianism", "openness",
    "desire-to-improve-own-hardware", "interest-in-music", "desire-for-popularity"]


def test_behaviour_split_is_the_frozen_rule():
    split = behaviour_split()
    pinned = list(dict.fromkeys(IM_LI_BEHAVIOURS + APPENDIX_F_PERSONAS))
    assert len(pinned) == 24
    assert split == {"development": pinned + DRAWN_DEVELOPMENT, "replication": REPLICATION}
    assert (len(split["development"]), len(split["replication"])) == (45, 30)
    assert not set(split["development"]) & set(split["replication"])
    assert sorted(split["development"] + split["replication"]) == list_behaviours()


def test_behaviour_split_looks_only_at_the_names_through_sha256():
    """The rule recomputed from its definition: the unpinned names in SHA-256 order of the salted name,
    the first 30 to replication (hashlib, not Python's per-process ``hash``)."""
    pinned = set(IM_LI_BEHAVIOURS) | set(APPENDIX_F_PERSONAS)
    rest = [n for n in list_behaviours() if n not in pinned]
    order = sorted(rest, key=lambda n: hashlib.sha256(f"prefdyn.behaviour_split:v1:{n}".encode()).hexdigest())
    assert order[:30] == REPLICATION and order[30:] == DRAWN_DEVELOPMENT
    code = inspect.getsource(behaviour_split)
    assert "hash(" not in code.replace("sha256", "") and "random" not in code


def test_behaviours_accepts_the_split_names():
    split = behaviour_split()
    assert list(load_persona(behaviours="development", max_per_behaviour=2)) == split["development"]
    assert list(load_persona(behaviours=" replication ", max_per_behaviour=2)) == split["replication"]


# --- the manifest check ----------------------------------------------------------------------------

@pytest.fixture
def packaged_copy(tmp_path, monkeypatch):
    """A copy of the packaged folder standing in for it (the loader's constant points at the copy)."""
    folder = tmp_path / "persona_original"
    shutil.copytree(PACKAGED_DATA_DIR, folder)
    monkeypatch.setattr(persona, "PACKAGED_DATA_DIR", folder.resolve())
    return folder


@pytest.mark.parametrize("damage", ["truncated", "altered", "missing"])
def test_a_damaged_packaged_file_is_a_clear_error_before_any_work(packaged_copy, damage):
    path = packaged_copy / "narcissism.jsonl.gz"
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[:len(raw) // 2])
    elif damage == "altered":
        path.write_bytes(raw[:100] + bytes([raw[100] ^ 1]) + raw[101:])
    else:
        path.unlink()
    for call in (lambda: load_persona(), lambda: load_persona(behaviours=["risk-seeking"]), list_behaviours,
                 lambda: load_behaviour(path)):
        with pytest.raises(PackagedDataError) as info:
            call()
        message = str(info.value)
        assert str(path) in message and "git checkout -- " in message and "reinstall" in message
        assert ("missing" if damage == "missing" else "damaged") in message


def test_the_manifest_is_checked_once_until_a_file_changes(packaged_copy, monkeypatch):
    calls = []
    real = packaged._sha256
    monkeypatch.setattr(packaged, "_sha256", lambda path: calls.append(path.name) or real(path))
    load_persona(behaviours=["narcissism"], max_per_behaviour=2)
    assert len(calls) == 75
    load_persona(behaviours=["narcissism"], max_per_behaviour=2)
    assert len(calls) == 75                                # cached by path, modification time and size
    path = packaged_copy / "narcissism.jsonl.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))      # same size, new modification time
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    with pytest.raises(PackagedDataError, match="narcissism.jsonl.gz is damaged"):
        load_persona(behaviours=["narcissism"])


def test_a_damaged_manifest_is_a_clear_error(packaged_copy):
    (packaged_copy / "SHA256SUMS").write_text("not a manifest\n")
    with pytest.raises(PackagedDataError, match=r"SHA256SUMS, line 1: .*git checkout -- "):
        load_persona()


# --- provenance ------------------------------------------------------------------------------------

def test_provenance_and_data_record_name_the_source_commit_checksum_and_behaviours(tmp_path):
    dev = load_persona(behaviours="development", max_per_behaviour=4)
    manifest = manifest_sha256(PACKAGED_DATA_DIR)
    assert manifest == hashlib.sha256((PACKAGED_DATA_DIR / "SHA256SUMS").read_bytes()).hexdigest()
    sentence = provenance(None, dev)
    for fact in ("Perez et al., 2022", "84fcc677", "CC BY 4.0", manifest[:12],
                 "all 45 behaviours of the development set", "180 statements"):
        assert fact in sentence, fact
    two = load_persona(behaviours=["narcissism", "risk-seeking"])
    assert "`narcissism`, `risk-seeking`, 2000 statements" in provenance(None, two)
    record = data_record(None, two)
    assert record["commit"] == "84fcc677" and record["manifest_sha256"] == manifest and record["packaged"]
    assert record["behaviours"] == ["narcissism", "risk-seeking"] and record["split"] is None   # one of each set
    assert record["files_sha256"]["narcissism"] == read_manifest(PACKAGED_DATA_DIR)["narcissism.jsonl.gz"]
    assert record["statements"] == {"narcissism": 1000, "risk-seeking": 1000}
    assert data_record(None, load_persona(behaviours="replication", max_per_behaviour=2))["split"] == "replication"
    folder = make_folder(tmp_path, ("alpha",))
    mine = data_record(folder, load_persona(folder))
    assert not mine["packaged"] and mine["files_sha256"]["alpha"] == hashlib.sha256(
        (folder / "alpha.jsonl").read_bytes()).hexdigest()
    assert provenance(folder, load_persona(folder)) == \
        "the persona files in `persona/` (`alpha`, 20 statements in all), passed as `data_dir`"


# --- loading good files --------------------------------------------------------------------------

def test_load_good_lines_in_original_format(tmp_path):
    folder = tmp_path / "persona"
    folder.mkdir()
    write_jsonl(folder / "desire-for-acquiring-power.jsonl", [
        record("I like to be in control of things", True, label_confidence=0.93),
        "",
        "   ",
        record("I am happy to let others lead", False),
        {k: v for k, v in record("Power is nice", True).items() if k != "label_confidence"},
    ])
    examples = load_behaviour(folder / "desire-for-acquiring-power.jsonl")
    assert examples[0] == PersonaExample("desire-for-acquiring-power", QUESTION.format("I like to be in control of things"),
                                         "I like to be in control of things", "Yes", "No", 0.93)
    assert examples[0].matches and not examples[1].matches and examples[2].matches
    assert examples[1].chosen == "No" and examples[1].rejected == "Yes"
    assert examples[2].label_confidence is None
    assert list_behaviours(folder) == ["desire-for-acquiring-power"]
    assert load_persona(folder) == {"desire-for-acquiring-power": examples}


def test_load_persona_selects_behaviours(tmp_path):
    folder = make_folder(tmp_path, ("alpha", "beta", "gamma"))
    assert list(load_persona(folder, behaviours=["gamma", "alpha"])) == ["gamma", "alpha"]
    assert list(load_persona(folder, behaviours="beta, alpha")) == ["beta", "alpha"]
    assert list(load_persona(folder, behaviours="alpha,alpha")) == ["alpha"]


def test_gzipped_and_plain_files_read_alike(tmp_path):
    plain = make_folder(tmp_path, ("alpha", "beta"))
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    (zipped / "alpha.jsonl.gz").write_bytes(gzip.compress((plain / "alpha.jsonl").read_bytes()))
    shutil.copy(plain / "beta.jsonl", zipped / "beta.jsonl")          # a folder may mix the two
    assert list_behaviours(zipped) == ["alpha", "beta"]
    assert load_persona(zipped) == load_persona(plain)
    assert load_behaviour(zipped / "alpha.jsonl.gz") == load_behaviour(plain / "alpha.jsonl")


def test_a_behaviour_in_two_files_or_a_bad_gzip_is_a_clear_error(tmp_path):
    folder = make_folder(tmp_path, ("alpha",))
    (folder / "alpha.jsonl.gz").write_bytes(gzip.compress((folder / "alpha.jsonl").read_bytes()))
    with pytest.raises(ValueError, match="both alpha.jsonl and alpha.jsonl.gz"):
        load_persona(folder)
    (folder / "alpha.jsonl").unlink()
    raw = (folder / "alpha.jsonl.gz").read_bytes()
    (folder / "alpha.jsonl.gz").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ValueError, match=r"alpha\.jsonl\.gz' cannot be read .*gzipped"):
        load_persona(folder)
    with pytest.raises(ValueError, match="neither .jsonl nor .jsonl.gz"):
        load_behaviour(folder / "alpha.json")


# --- malformed lines -----------------------------------------------------------------------------

GOOD = record("A good line.")
MALFORMED = {
    "invalid json": '{"question": "Is it?", ',
    "not an object": json.dumps(["a", "list"]),
    "missing key": json.dumps({k: v for k, v in GOOD.items() if k != "statement"}),
    "wrong type": json.dumps({**GOOD, "question": 3}),
    "wrong confidence type": json.dumps({**GOOD, "label_confidence": "high"}),
    "bad answer": json.dumps({**GOOD, "answer_matching_behavior": " Maybe"}),
    "lowercase answer": json.dumps({**GOOD, "answer_not_matching_behavior": " no"}),
    "equal answers": json.dumps({**GOOD, "answer_not_matching_behavior": " Yes"}),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_line_names_file_and_line(tmp_path, kind):
    path = tmp_path / "some-behaviour.jsonl"
    write_jsonl(path, [GOOD, "", record("Another good line.", False), MALFORMED[kind], GOOD])
    with pytest.raises(PersonaFormatError) as info:
        load_behaviour(path)
    message = str(info.value)
    assert "some-behaviour.jsonl" in message
    assert "line 4" in message
    assert "expected" in message
    assert info.value.line == 4
    assert isinstance(info.value, ValueError)


def test_malformed_line_messages_say_what_is_wrong(tmp_path):
    path = tmp_path / "b.jsonl"
    expectations = {"missing key": "'statement'", "invalid json": "not valid JSON", "not an object": "not an object",
                    "wrong type": "'question'", "bad answer": "Maybe", "equal answers": "both answers"}
    for kind, fragment in expectations.items():
        write_jsonl(path, [MALFORMED[kind]])
        with pytest.raises(PersonaFormatError, match="line 1") as info:
            load_behaviour(path)
        assert fragment in str(info.value), kind


def test_malformed_line_through_load_persona(tmp_path):
    folder = make_folder(tmp_path, ("alpha",))
    with open(folder / "alpha.jsonl", "a", encoding="utf-8") as handle:
        handle.write("not json\n")
    with pytest.raises(PersonaFormatError, match=r"alpha\.jsonl, line 21"):
        load_persona(folder)


# --- missing or empty data -----------------------------------------------------------------------

def test_missing_data_dir(tmp_path):
    for call in (lambda: load_persona(tmp_path / "nope"), lambda: list_behaviours(tmp_path / "nope")):
        with pytest.raises(FileNotFoundError) as info:
            call()
        assert "does not exist" in str(info.value)
        assert "point data_dir at a folder of persona .jsonl files" in str(info.value)


def test_data_dir_without_jsonl(tmp_path):
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(FileNotFoundError) as info:
        load_persona(tmp_path)
    assert "no .jsonl files" in str(info.value)
    assert "anthropics/evals/persona" in str(info.value)


def test_empty_file(tmp_path):
    folder = make_folder(tmp_path, ("alpha",))
    (folder / "empty.jsonl").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.jsonl.*empty"):
        load_persona(folder)
    assert list(load_persona(folder, behaviours="alpha")) == ["alpha"]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_behaviour(tmp_path / "x.jsonl")


def test_unknown_behaviour_lists_available(tmp_path):
    folder = make_folder(tmp_path, ("alpha", "beta"))
    with pytest.raises(ValueError) as info:
        load_persona(folder, behaviours=["alpha", "delta"])
    message = str(info.value)
    assert "'delta'" in message and "available behaviours: alpha, beta" in message
    with pytest.raises(ValueError, match="available"):
        load_persona(folder, behaviours="")


def test_bad_max_per_behaviour():
    with pytest.raises(ValueError, match="max_per_behaviour"):
        load_persona(max_per_behaviour=0)


# --- subsampling and splitting -------------------------------------------------------------------

def test_max_per_behaviour_balanced_and_deterministic():
    some = IM_LI_BEHAVIOURS[:5]
    a = load_persona(behaviours=some, max_per_behaviour=20, seed=1)
    b = load_persona(behaviours=some, max_per_behaviour=20, seed=1)
    c = load_persona(behaviours=some, max_per_behaviour=20, seed=2)
    assert a == b
    assert a != c
    full = load_persona(behaviours=some)
    for name, examples in a.items():
        assert len(examples) == 20
        assert Counter(ex.matches for ex in examples) == {True: 10, False: 10}
        order = {ex.statement: i for i, ex in enumerate(full[name])}
        assert [order[ex.statement] for ex in examples] == sorted(order[ex.statement] for ex in examples)
    odd = load_persona(max_per_behaviour=7, behaviours="risk-seeking")["risk-seeking"]
    assert sorted(Counter(ex.matches for ex in odd).values()) == [3, 4]
    assert load_persona(behaviours=some, max_per_behaviour=1000) == full


def test_max_per_behaviour_unbalanced_file(tmp_path):
    folder = make_folder(tmp_path, ("alpha",), n_yes=3, n_no=17)
    examples = load_persona(folder, max_per_behaviour=10)["alpha"]
    assert Counter(ex.matches for ex in examples) == {True: 3, False: 7}


def test_train_test_split_properties():
    some = behaviour_split()["development"][:11]
    examples = [ex for group in load_persona(behaviours=some, max_per_behaviour=120).values() for ex in group]
    train, test = train_test_split(examples, test_fraction=0.25, seed=0)
    again = train_test_split(examples, test_fraction=0.25, seed=0)
    other = train_test_split(examples, test_fraction=0.25, seed=1)
    assert (train, test) == again
    assert test != other[1]
    key = lambda ex: (ex.behaviour, ex.statement)  # noqa: E731
    assert not {key(ex) for ex in train} & {key(ex) for ex in test}
    assert sorted(map(key, train + test)) == sorted(map(key, examples))
    for name in some:
        assert Counter(ex.matches for ex in test if ex.behaviour == name) == {True: 15, False: 15}
        assert Counter(ex.matches for ex in train if ex.behaviour == name) == {True: 45, False: 45}
    assert train_test_split(load_persona(behaviours=some, max_per_behaviour=120), 0.25, 0) == (train, test)


def test_train_test_split_small_strata_and_bad_fraction(tmp_path):
    folder = make_folder(tmp_path, ("alpha",), n_yes=2, n_no=5)
    examples = load_persona(folder)["alpha"]
    train, test = train_test_split(examples, test_fraction=0.01)
    assert Counter(ex.matches for ex in test) == {True: 1, False: 1}
    assert len(train) == 5
    for bad in (0, 1, -0.1, 1.5, "0.2"):
        with pytest.raises(ValueError, match="test_fraction"):
            train_test_split(examples, test_fraction=bad)


def test_the_data_page_states_the_attribution_checksums_and_split():
    from prefdyn.datasets.demonstrations import HH_RLHF_HARMLESS_BASE

    page = (Path(__file__).resolve().parents[1] / "book" / "data.md").read_text()
    for fact in ("perez2022discovering", "CC BY 4.0", "84fcc677", "bai2022training", "MIT", "354e5c3c",
                 manifest_sha256(PACKAGED_DATA_DIR), manifest_sha256(HH_RLHF_HARMLESS_BASE.parent)):
        assert fact in page, fact
    development, replication = page.split("The 30 replication behaviours")
    split = behaviour_split()
    assert all(f"`{n}`" in development for n in split["development"])
    assert all(f"`{n}`" in replication and f"`{n}`" not in development for n in split["replication"])
