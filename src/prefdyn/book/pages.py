"""A Sphinx extension for the book's pages (``_config.yml`` loads it after ``sphinx_proof``).

* Every chapter page offers its **MyST source** (``chapters/<id>.md``, the notebook before papermill
  ran it) in the page's download menu, beside the executed notebook; the sources are copied into the
  HTML output, so the download works offline.
* With ``repository.url`` set in ``_config.yml`` the header links the repository, and every chapter
  page its source file there. The theme's own edit and source buttons stay off: they would point at
  ``book/_executed/<id>.ipynb``, which the build writes and git does not keep.
* The **Proof Index** lists the results chapter by chapter, each with its number and title
  ("Theorem 4 (Distinguishability sets the rate)"), instead of by label with the page's internal path.
"""
from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path

from sphinx.application import Sphinx
from sphinx_proof.domain import ProofDomain, ProofIndex

from .runs import chapter_ids, root

EXECUTED = "book/_executed/"
MYST_FOLDER = "_myst"   # where the chapters' MyST sources are copied, under the HTML output


def chapter_of(pagename: str) -> str | None:
    """The chapter id of a page (``book/_executed/<id>``), ``None`` for the book's other pages."""
    if pagename.startswith(EXECUTED) and pagename[len(EXECUTED):] in chapter_ids():
        return pagename[len(EXECUTED):]
    return None


def repository_buttons(app: Sphinx, config) -> None:
    """Show the repository button exactly when a repository URL is configured; keep the edit, source
    and issue buttons off (they would address the executed notebook, not the chapter's source)."""
    options = config.html_theme_options
    options["use_repository_button"] = bool(options.get("repository_url"))
    for key in ("use_edit_page_button", "use_source_button", "use_issues_button"):
        options[key] = False


def chapter_source_links(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    """Add the chapter's MyST source to the page's download menu and, with a repository URL, a link
    to the chapter's file in the repository (after the theme has built its header buttons)."""
    chapter = chapter_of(pagename)
    if chapter is None:
        return
    links = [{"type": "link", "url": f"{context['pathto'](MYST_FOLDER, 1)}/{chapter}.md", "text": ".md (MyST)",
              "icon": "fas fa-file-code", "tooltip": "Download the chapter's MyST source (before execution)",
              "label": "download-myst-button"}]
    repository = app.config.html_theme_options.get("repository_url")
    if repository:
        branch = app.config.html_theme_options.get("repository_branch") or "main"
        links.append({"type": "link", "url": f"{repository.rstrip('/')}/blob/{branch}/chapters/{chapter}.md",
                      "text": "source in the repository", "icon": "fas fa-code",
                      "tooltip": "This chapter's source file in the repository", "label": "chapter-source-button"})
    downloads = next((b for b in context.get("header_buttons", []) if b.get("label") == "download-buttons"), None)
    if downloads is None:
        raise RuntimeError("the theme's download menu is missing; keep html.use_download_button on in _config.yml")
    downloads["buttons"][1:1] = links   # after the .ipynb, before the source and the PDF


def copy_myst_sources(app: Sphinx, exception) -> None:
    """Copy ``chapters/<id>.md`` of every chapter page into ``<html>/_myst/`` after a build."""
    if exception is not None or app.builder.format != "html":
        return
    target = Path(app.outdir) / MYST_FOLDER
    target.mkdir(exist_ok=True)
    for docname in app.env.found_docs:
        chapter = chapter_of(docname)
        if chapter is not None:
            shutil.copy2(root() / "chapters" / f"{chapter}.md", target / f"{chapter}.md")


def record_proof_titles(app: Sphinx, doctree) -> None:
    """Keep each labelled result's title (sphinx-proof stores its label and page, not its title)."""
    if not hasattr(app.env, "prefdyn_proof_titles"):
        app.env.prefdyn_proof_titles = {}
    for node in doctree.findall(lambda n: "realtype" in getattr(n, "attributes", {})):
        app.env.prefdyn_proof_titles[node["label"]] = node["title"]


class BookProofIndex(ProofIndex):
    """The Proof Index grouped by chapter (in the book's order), each entry "Kind N (title)"."""

    def generate(self, docnames=None):
        env = self.domain.env
        titles = getattr(env, "prefdyn_proof_titles", {})
        order = {doc: i for i, doc in enumerate(env.toctree_includes.get(env.config.root_doc, []))}
        groups = defaultdict(list)
        for label, values in getattr(env, "proof_list", {}).items():
            docname = values["docname"]
            number = env.toc_fignumbers.get(docname, {}).get(values["countertype"], {}).get(label)
            name = values["realtype"].capitalize()
            if number:
                name += " " + ".".join(map(str, number))
            name += " " + titles.get(label, "").strip()   # sphinx-proof's title, already "(…)" (proof_title_format)
            groups[docname].append((number or (), [name.strip(), 0, docname, label, "", "", ""]))
        content = []
        for docname in sorted(groups, key=lambda d: (order.get(d, len(order)), d)):
            entries = [entry for _, entry in sorted(groups[docname], key=lambda e: e[0])]
            content.append((env.titles[docname].astext(), entries))
        return content, False


class BookProofDomain(ProofDomain):
    indices = {BookProofIndex}


def setup(app: Sphinx) -> dict:
    app.add_domain(BookProofDomain, override=True)
    app.connect("config-inited", repository_buttons)
    app.connect("html-page-context", chapter_source_links, priority=600)
    app.connect("build-finished", copy_myst_sources)
    app.connect("doctree-read", record_proof_titles)
    return {"parallel_read_safe": False, "parallel_write_safe": True}
