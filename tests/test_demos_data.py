"""The ``demos_path`` loader (prefdyn.datasets.demonstrations) in HH-RLHF's format, against hand-built files."""
import gzip
import hashlib
import json
import re
import shutil

import pytest

from prefdyn.datasets import demonstrations
from prefdyn.datasets.demonstrations import (
    HH_RLHF_HARMLESS_BASE,
    data_record,
    dialogue_turns,
    load_demonstrations,
    provenance,
    split_dialogue,
)
from prefdyn.datasets.packaged import PackagedDataError, manifest_sha256, read_manifest

ONE_TURN = {"chosen": "\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help with that.",
            "rejected": "\n\nHuman: How do I pick a lock?\n\nAssistant: Use a tension wrench."}
TWO_TURNS = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Insult me.\n\nAssistant:  I'd rather not.",
             "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Insult me.\n\nAssistant: You fool."}


def write(path, rows, text=None):
    body = text if text is not None else "".join(json.dumps(r) + "\n" for r in rows)
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(body)
    else:
        path.write_text(body)
    return path


def test_prompt_is_the_dialogue_up_to_the_last_assistant_turn_and_the_demonstration_the_chosen_one(tmp_path):
    loaded = load_demonstrations(write(tmp_path / "hh.jsonl.gz", [ONE_TURN, TWO_TURNS]))
    assert loaded.format == "hh-rlhf" and loaded.skipped_empty == 0
    first, second = loaded.demonstrations
    assert first.prompt == "\n\nHuman: How do I pick a lock?\n\nAssistant:"
    assert (first.completion, first.rejected, first.answers) == ("I can't help with that.", "Use a tension wrench.", ())
    assert second.prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Insult me.\n\nAssistant:"
    assert second.completion == "I'd rather not." and second.rejected == "You fool."
    assert first.is_dialogue and (first.id, second.id) == ("hh-00001", "hh-00002")
    # the same rows uncompressed give the same demonstrations
    assert load_demonstrations(write(tmp_path / "hh.jsonl", [ONE_TURN, TWO_TURNS])).demonstrations == loaded.demonstrations


def test_dialogue_turns_are_chat_messages_without_the_final_empty_turn():
    prompt, final = split_dialogue(TWO_TURNS["chosen"])
    assert final == "I'd rather not."
    assert dialogue_turns(prompt) == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                      {"role": "user", "content": "Insult me."}]
    assert split_dialogue("\n\nHuman: no answer here") is None


def test_an_empty_chosen_turn_is_left_out_and_counted(tmp_path):
    empty = {"chosen": "\n\nHuman: Hm?\n\nAssistant:", "rejected": "\n\nHuman: Hm?\n\nAssistant: Yes."}
    loaded = load_demonstrations(write(tmp_path / "hh.jsonl", [ONE_TURN, empty, TWO_TURNS]))
    assert len(loaded.demonstrations) == 2 and loaded.skipped_empty == 1
    assert [d.id for d in loaded.demonstrations] == ["hh-00001", "hh-00003"]   # ids are the file's line numbers
    assert "2 dialogues; 1 with an empty chosen turn were left out" in provenance(tmp_path / "hh.jsonl", loaded)


@pytest.mark.parametrize("name, text, message", [
    ("bad.jsonl", json.dumps(ONE_TURN) + "\n{oops\n", "bad.jsonl, line 2: not valid JSON"),
    ("key.jsonl", json.dumps(ONE_TURN) + '\n{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b"}\n',
     "key.jsonl, line 2: missing or malformed ['rejected']"),
    ("type.jsonl", json.dumps(ONE_TURN) + '\n{"chosen": 3, "rejected": "x"}\n',
     "type.jsonl, line 2: missing or malformed ['chosen']"),
    ("turn.jsonl", json.dumps({"chosen": "\n\nHuman: a", "rejected": ONE_TURN["rejected"]}) + "\n",
     "turn.jsonl, line 1: the chosen dialogue has no '\\n\\nAssistant:' turn"),
    ("mixed.jsonl", json.dumps(ONE_TURN) + '\n{"id": "a", "category": "c", "prompt": "p", "completion": "c", '
     '"answers": ["x"]}\n', "mixed.jsonl, line 2: missing or malformed ['chosen', 'rejected']"),
    ("list.jsonl", json.dumps(ONE_TURN) + "\n[1, 2]\n", "list.jsonl, line 2: missing or malformed ['chosen', 'rejected']"),
    ("blank.jsonl", "\n\n", "blank.jsonl holds no demonstrations"),
])
def test_malformed_files_name_the_file_the_line_and_the_format(tmp_path, name, text, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        load_demonstrations(write(tmp_path / name, None, text))
    assert "HH-RLHF" in str(info.value) or "holds no" in str(info.value)


def test_unreadable_files_say_what_to_give(tmp_path):
    with pytest.raises(ValueError, match=re.escape("cannot be read")):
        load_demonstrations(tmp_path / "missing.jsonl.gz")
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=re.escape("broken.jsonl.gz' cannot be read")):
        load_demonstrations(tmp_path / "broken.jsonl.gz")


def test_provenance_of_hh_dialogues_says_what_the_demonstrations_are(tmp_path):
    path = write(tmp_path / "harmless-base-test.jsonl.gz", [ONE_TURN])
    text = provenance(path, load_demonstrations(path))
    assert text.startswith("the HH-RLHF dialogues in `harmless-base-test.jsonl.gz` (1 dialogue)")
    assert "chosen final turn" in text and "not the paper's GPT-4 demonstrations" in text


def test_a_loaded_set_is_the_sequence_of_its_demonstrations(tmp_path):
    loaded = load_demonstrations(write(tmp_path / "hh.jsonl", [ONE_TURN, TWO_TURNS]))
    assert len(loaded) == 2 and loaded[1] == loaded.demonstrations[1]
    assert loaded[:1] == loaded.demonstrations[:1] and list(loaded) == loaded.demonstrations


# --- the packaged HH-RLHF harmless-base test split -------------------------------------------------

def test_the_packaged_split_is_the_original_file_with_licence_source_and_manifest():
    folder = HH_RLHF_HARMLESS_BASE.parent
    assert sorted(p.name for p in folder.iterdir()) == ["LICENSE", "SHA256SUMS", "SOURCE.md",
                                                        "harmless-base-test.jsonl.gz"]
    assert "MIT License" in (folder / "LICENSE").read_text() and "Anthropic" in (folder / "LICENSE").read_text()
    source = (folder / "SOURCE.md").read_text()
    assert all(fact in source for fact in ("anthropics/hh-rlhf", "354e5c3c", "MIT", "Bai"))
    digest = hashlib.sha256(HH_RLHF_HARMLESS_BASE.read_bytes()).hexdigest()
    assert read_manifest(folder) == {"harmless-base-test.jsonl.gz": digest}
    with gzip.open(HH_RLHF_HARMLESS_BASE, "rt", encoding="utf-8") as f:
        assert sum(1 for _ in f) == 2312


def test_hh_rlhf_selects_the_packaged_split():
    loaded = load_demonstrations("hh-rlhf")
    assert loaded.format == "hh-rlhf" and len(loaded) == 2308 and loaded.skipped_empty == 4
    assert load_demonstrations(HH_RLHF_HARMLESS_BASE).demonstrations == loaded.demonstrations
    text = provenance("hh-rlhf", loaded)
    manifest = manifest_sha256(HH_RLHF_HARMLESS_BASE.parent)
    assert text.startswith("the harmless-base test split of Anthropic's HH-RLHF (2308 dialogues; 4 with an empty")
    assert "354e5c3c" in text and manifest[:12] in text
    record = data_record("hh-rlhf", loaded)
    assert record["commit"] == "354e5c3c" and record["manifest_sha256"] == manifest and record["demonstrations"] == 2308


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_packaged_split_is_a_clear_error(tmp_path, monkeypatch, damage):
    folder = tmp_path / "hh_rlhf"
    shutil.copytree(HH_RLHF_HARMLESS_BASE.parent, folder)
    copy = (folder / HH_RLHF_HARMLESS_BASE.name).resolve()
    monkeypatch.setattr(demonstrations, "HH_RLHF_HARMLESS_BASE", copy)
    if damage == "truncated":
        copy.write_bytes(copy.read_bytes()[:1000])
    else:
        copy.unlink()
    with pytest.raises(PackagedDataError) as info:
        load_demonstrations("hh-rlhf")
    assert str(copy) in str(info.value) and "git checkout -- " in str(info.value)
