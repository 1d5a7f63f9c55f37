"""The command line and the cache key, without executing any chapter."""
import subprocess
import sys

import pytest

from prefdyn import pipeline


def prefdyn(*args):
    return subprocess.run([sys.executable, "-m", "prefdyn", *args], capture_output=True, text=True, timeout=120)


def test_list_prints_one_chapter_id_per_line():
    out = prefdyn("list")
    assert out.returncode == 0
    assert out.stdout.split() == pipeline.chapter_ids() and "ch01-rlhf-dpo-ipo" in out.stdout.split()


def test_unknown_scale_is_refused_by_the_command_line():
    out = prefdyn("run", "ch01-rlhf-dpo-ipo", "--scale", "huge")
    assert out.returncode == 2 and "invalid choice: 'huge'" in out.stderr


def test_unknown_chapter_and_parameter_fail_before_any_execution():
    out = prefdyn("run", "ch99-nothing", "--scale", "smoke")
    assert out.returncode == 2 and "unknown chapter 'ch99-nothing'" in out.stderr
    out = prefdyn("run", "ch01-rlhf-dpo-ipo", "--scale", "smoke", "-p", "stepz", "3")
    assert out.returncode == 2 and "unknown parameter(s) ['stepz']" in out.stderr and "it accepts:" in out.stderr


def test_every_chapter_declares_the_common_parameters():
    for chapter in pipeline.chapter_ids():
        assert {"scale", "device", "seed", "model", "checks_path"} <= set(pipeline.declared_parameters(chapter))


@pytest.mark.parametrize("text,value", [("3", 3), ("0.5", 0.5), ("true", True), ('["a", "b"]', ["a", "b"]),
                                        ("cpu", "cpu"), ("/tmp/x.gguf", "/tmp/x.gguf")])
def test_parse_value(text, value):
    assert pipeline.parse_value(text) == value


def test_run_key_changes_with_parameters_and_source(tmp_path, monkeypatch):
    chapter = pipeline.chapter_ids()[0]
    a = pipeline.run_key(chapter, {"scale": "ci"})
    assert a == pipeline.run_key(chapter, {"scale": "ci"})
    assert a != pipeline.run_key(chapter, {"scale": "smoke"})
    (tmp_path / "chapters").mkdir()
    src = pipeline.chapter_source(chapter).read_text()
    (tmp_path / "chapters" / f"{chapter}.md").write_text(src + "\n<!-- edited -->\n")
    monkeypatch.setenv("PREFDYN_ROOT", str(tmp_path))
    assert pipeline.run_key(chapter, {"scale": "ci"}) != a


def test_book_refuses_to_build_before_chapters_are_executed(tmp_path, monkeypatch):
    (tmp_path / "chapters").mkdir()
    (tmp_path / "chapters" / "chx.md").write_text("# x\n")
    monkeypatch.setenv("PREFDYN_ROOT", str(tmp_path))
    with pytest.raises(pipeline.ChapterError, match="have not been executed"):
        pipeline.build_book()
