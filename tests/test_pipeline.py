"""The command line and the cache key, without executing any chapter."""
import json
import subprocess
import sys

import pytest

from prefdyn.book import build, execute, runs


def prefdyn(*args):
    return subprocess.run([sys.executable, "-m", "prefdyn", *args], capture_output=True, text=True, timeout=120)


def test_list_prints_one_chapter_id_per_line():
    out = prefdyn("list")
    assert out.returncode == 0
    assert out.stdout.split() == runs.chapter_ids() and "ch01-rlhf-dpo-ipo" in out.stdout.split()


def test_unknown_scale_is_refused_by_the_command_line():
    out = prefdyn("run", "ch01-rlhf-dpo-ipo", "--scale", "huge")
    assert out.returncode == 2 and "invalid choice: 'huge'" in out.stderr


def test_unknown_chapter_and_parameter_fail_before_any_execution():
    out = prefdyn("run", "ch99-nothing", "--scale", "smoke")
    assert out.returncode == 2 and "unknown chapter 'ch99-nothing'" in out.stderr
    out = prefdyn("run", "ch01-rlhf-dpo-ipo", "--scale", "smoke", "-p", "stepz", "3")
    assert out.returncode == 2 and "unknown parameter(s) ['stepz']" in out.stderr and "it accepts:" in out.stderr


def test_every_chapter_declares_the_common_parameters():
    for chapter in runs.chapter_ids():
        declared = set(execute.declared_parameters(chapter))
        assert {"scale", "device", "seed", "model"} <= declared and "checks_path" not in declared


@pytest.mark.parametrize("text,value", [("3", 3), ("0.5", 0.5), ("true", True), ('["a", "b"]', ["a", "b"]),
                                        ("cpu", "cpu"), ("/tmp/x.gguf", "/tmp/x.gguf")])
def test_parse_value(text, value):
    assert execute.parse_value(text) == value


def test_run_key_changes_with_parameters_and_source(tmp_path, monkeypatch):
    chapter = runs.chapter_ids()[0]
    a = execute.run_key(chapter, {"scale": "ci"})
    assert a == execute.run_key(chapter, {"scale": "ci"})
    assert a != execute.run_key(chapter, {"scale": "smoke"})
    (tmp_path / "chapters").mkdir()
    src = runs.chapter_source(chapter).read_text()
    (tmp_path / "chapters" / f"{chapter}.md").write_text(src + "\n<!-- edited -->\n")
    monkeypatch.setenv("PREFDYN_ROOT", str(tmp_path))
    assert execute.run_key(chapter, {"scale": "ci"}) != a


def test_book_refuses_to_build_before_chapters_are_executed(tmp_path, monkeypatch):
    (tmp_path / "chapters").mkdir()
    (tmp_path / "chapters" / "chx.md").write_text("# x\n")
    monkeypatch.setenv("PREFDYN_ROOT", str(tmp_path))
    with pytest.raises(runs.ChapterError, match="have not been executed"):
        build.build_book()


def test_mathjax_is_staged_from_its_package(tmp_path):
    target = build.stage_mathjax(tmp_path)
    assert (target / "tex-mml-chtml.js").stat().st_size > 100_000
    assert any((target / "output" / "chtml" / "fonts").rglob("*.woff"))


def test_reproducibility_report_lists_live_and_recorded_runs(tmp_path, monkeypatch):
    from prefdyn.book import report

    monkeypatch.setenv("PREFDYN_ROOT", str(tmp_path))
    (tmp_path / "chapters").mkdir()
    for chapter in ("cha", "chb"):
        (tmp_path / "chapters" / f"{chapter}.md").write_text(f"---\n---\n# Title of {chapter}\n")
    out = tmp_path / "book" / "_executed"
    out.mkdir(parents=True)
    checks = [{"kind": "identity", "claim": "c1", "predicted": 0.0, "observed": 0.5, "tolerance": "observed <= 1",
               "passed": True, "status": "pass", "prediction": None},
              {"kind": "bound", "claim": "c2", "predicted": "> 0", "observed": -1.0, "tolerance": "observed > 0",
               "passed": False, "status": "FAIL", "prediction": None}]
    (out / "cha.checks.json").write_text(json.dumps({"checks": checks, "reported": []}))
    (out / "cha.run.json").write_text(json.dumps({
        "parameters": {"scale": "smoke", "device": "cpu"}, "defaults": {"seed": "0", "model": '"smollm2-135m"',
                                                                         "lr": "0.1"},
        "seconds": 12.3, "finished": "2026-01-02T03:04:05+0000", "python": "3.11", "packages": {"torch": "9.9"},
        "git": "abc1234", "hardware": "Some CPU, 2 cores"}))
    rec = dict(json.loads((out / "cha.run.json").read_text()), parameters={"scale": "full"}, hardware="Some GPU",
               label="full-gpu", checks=checks[:1], reported=[])
    (tmp_path / "book" / "recorded" / "cha").mkdir(parents=True)
    (tmp_path / "book" / "recorded" / "cha" / "full-gpu.json").write_text(json.dumps(rec))

    text = report.reproducibility_markdown()
    glance = text.split("## At a glance")[1].split("\n## ")[0]
    assert ("| {doc}`cha <cha>` | 1 identity and 1 bound (1 FAILED) | smoke, cpu, 12 s, 2026-01-02 | 1 | `full-gpu` |"
            in glance)
    assert "| {doc}`chb <chb>` | not run | — | 0 | none |" in glance
    assert "No `full` run of the current code is recorded for {doc}`chb <chb>`" in text
    section = text.split("## Title of cha")[1].split("## Title of chb")[0]
    assert '`scale="smoke"`, `device="cpu"`, `seed=0`, `model="smollm2-135m"`; chapter-specific: `lr=0.1`' in section
    assert "Some CPU, 2 cores" in section and "`abc1234`" in section and "torch 9.9" in section
    assert section.count("| c1 |") == 2 and "| FAIL |" in section and "### Recorded run `full-gpu`" in section
    assert "`prefdyn run cha --scale smoke --device cpu`" in section and "`prefdyn reproduce cha full-gpu`" in section
    assert section.count(":::{dropdown} Checks of") == 2
    assert "*Not executed in this build.*" in text.split("## Title of chb")[1]
    path = report.write_reproducibility_page()
    assert path == out / "reproducibility.md" and path.read_text() == text


def code_cells(chapter):
    return [c.source for c in execute.read_notebook(chapter).cells if c.cell_type == "code"]


@pytest.mark.parametrize("chapter", runs.chapter_ids())
def test_chapter_cells_show_the_mathematics_and_call_the_library(chapter):
    """No code cell over 30 non-blank lines, no thread toggling, and no chapter typing its own id or
    where its checks go (the executor hands both to the kernel)."""
    for source in code_cells(chapter):
        lines = [line for line in source.splitlines() if line.strip()]
        assert len(lines) <= 30, f"a cell of {len(lines)} lines starts with {lines[0]!r}"
        assert "set_num_threads" not in source and "checks_path" not in source
        assert chapter not in source


def test_executed_notebooks_keep_no_progress_bars_and_no_absolute_paths(tmp_path, monkeypatch):
    import sys

    import nbformat

    monkeypatch.setenv("PREFDYN_ROOT", str(tmp_path))
    out = nbformat.v4.new_output
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [
        out("stream", name="stderr", text="\rdpo training:  11%|█         | 1/9 [00:13<01:47, 13.45s/it]"),
        out("stream", name="stderr", text="\n"),
        out("stream", name="stderr", text=f"{sys.prefix}/lib/tqdm/auto.py:21: TqdmWarning: IProgress not found."),
        out("stream", name="stderr", text="UserWarning: a real warning\n"),
        out("stream", name="stdout", text=f"wrote {tmp_path}/book/_executed/x.json\n"),
        out("display_data", data={"text/plain": f"'{tmp_path}/chapters'", "image/png": "AAAA"}),
    ]
    nb = nbformat.v4.new_notebook(cells=[cell, nbformat.v4.new_markdown_cell(f"{tmp_path} stays in prose")])
    execute.clean_outputs(nb)
    texts = [o.get("text") or o["data"]["text/plain"] for o in nb.cells[0].outputs]
    assert texts == ["UserWarning: a real warning\n", "wrote book/_executed/x.json\n", "'chapters'"]
    assert nb.cells[0].outputs[-1]["data"]["image/png"] == "AAAA"


def test_a_readers_runs_go_to_a_book_folder_of_their_own(tmp_path):
    """`prefdyn run --out DIR` copies the book once (chapters, registries, pages, recorded runs) and
    leaves this book's results alone; `prefdyn book --from` refuses a folder that is not a book."""
    from prefdyn.book import runs

    mine = runs.stage_book(tmp_path / "mine")
    assert (mine / "chapters" / "claims" / "papers.yml").is_file() and (mine / "_config.yml").is_file()
    assert sorted(p.stem for p in (mine / "chapters").glob("*.md")) == runs.chapter_ids()
    assert (mine / "book" / "_toc.yml").is_file() and not (mine / "book" / "_executed").exists()
    (mine / "chapters" / "note.txt").write_text("kept")
    assert runs.stage_book(mine) == mine and (mine / "chapters" / "note.txt").read_text() == "kept"
    assert not list(tmp_path.glob(".*partial"))          # staged in a sibling folder, then renamed
    (tmp_path / "empty").mkdir()
    assert (runs.stage_book(tmp_path / "empty") / "_config.yml").is_file()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    with pytest.raises(runs.ChapterError, match="neither empty nor a book folder"):
        runs.stage_book(tmp_path / "other")
    refused = prefdyn("run", "ch01-rlhf-dpo-ipo", "--out", str(tmp_path / "other"))
    assert refused.returncode == 2 and "neither empty nor a book folder" in refused.stderr
    bad = prefdyn("book", "--from", str(tmp_path / "nothing"))
    assert bad.returncode == 2 and "not a book folder" in bad.stderr


def test_chapter_source_links_add_the_myst_source_and_the_repository_file(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from prefdyn.book import pages
    monkeypatch.setattr(pages, "chapter_ids", lambda: ["ch09-x"])
    def context():
        return {"pathto": lambda name, resource: f"../../{name}",
                "header_buttons": [{"label": "download-buttons", "buttons": [{"text": ".ipynb"}, {"text": ".md"}]}]}
    app = SimpleNamespace(config=SimpleNamespace(html_theme_options={}))
    ctx = context()
    pages.chapter_source_links(app, "book/_executed/ch09-x", "page.html", ctx, None)
    assert [b.get("text") for b in ctx["header_buttons"][0]["buttons"]] == [".ipynb", ".md (MyST)", ".md"]
    assert ctx["header_buttons"][0]["buttons"][1]["url"] == "../../_myst/ch09-x.md"
    other = context()
    pages.chapter_source_links(app, "book/intro", "page.html", other, None)   # not a chapter: untouched
    assert [b["text"] for b in other["header_buttons"][0]["buttons"]] == [".ipynb", ".md"]
    app.config.html_theme_options = {"repository_url": "https://github.com/o/prefdyn/", "repository_branch": "dev"}
    pages.repository_buttons(app, app.config)
    assert app.config.html_theme_options["use_repository_button"] and not app.config.html_theme_options["use_edit_page_button"]
    ctx = context()
    pages.chapter_source_links(app, "book/_executed/ch09-x", "page.html", ctx, None)
    assert ctx["header_buttons"][0]["buttons"][2]["url"] == "https://github.com/o/prefdyn/blob/dev/chapters/ch09-x.md"
    app.config.html_theme_options = {"repository_url": ""}
    pages.repository_buttons(app, app.config)
    assert app.config.html_theme_options["use_repository_button"] is False
    with pytest.raises(RuntimeError, match="use_download_button"):
        pages.chapter_source_links(app, "book/_executed/ch09-x", "page.html", {"pathto": ctx["pathto"], "header_buttons": []}, None)


def test_every_command_reports_bad_input_as_one_line_and_exit_2():
    bad_model = prefdyn("train", "--model", "no-such-model", "--steps", "1")
    assert bad_model.returncode == 2 and bad_model.stderr.startswith("[prefdyn] error: model 'no-such-model'")
    no_record = prefdyn("reproduce", "ch01-rlhf-dpo-ipo", "no-such-label")
    assert no_record.returncode == 2 and "has no recorded run 'no-such-label'" in no_record.stderr
    no_chapter = prefdyn("record", "ch99-x", "--label", "a")
    assert no_chapter.returncode == 2 and "unknown chapter 'ch99-x'" in no_chapter.stderr
