"""Build the shipped sample corpus from the Debian ``python3.11-doc`` package.

The HTML pages of the Python 3.11 documentation (PSF License) are reduced to their
prose: headings and ``<p>`` paragraphs of the main body, without code blocks, tables,
navigation, scripts or styles; the C-API, distutils and "What's New" trees are left out.
Every ``<h2>`` section (and the intro before the first one) of at least MIN_DOC_CHARS
characters becomes one document. Pages are read in sorted path order and every 20th
document goes to the validation split, so the output is byte-identical on every run.

Usage::

    apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb /tmp/pydoc
    python data/scripts/build_sample_corpus.py --deb-dir /tmp/pydoc --output-dir data/sample
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

HTML_SUBDIR = Path("usr/share/doc/python3.11/html")
SKIPPED_PAGES = re.compile(r"^(genindex.*|search|py-modindex|contents)\.html$")
# Assets, plus API-listing and release-note trees (mostly identifiers, not prose).
SKIPPED_DIRS = {
    "_static",
    "_sources",
    "_downloads",
    "_images",
    "c-api",
    "distutils",
    "install",
    "whatsnew",
}
SKIPPED_TAGS = {"script", "style", "pre", "table", "dt", "nav"}
HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
VOID_TAGS = {"br", "img", "hr", "input", "meta", "link", "wbr", "col", "area", "base", "source"}
VALID_EVERY = 20
MIN_DOC_CHARS = 200


class ProseExtractor(HTMLParser):
    """Collects the prose sections of a Sphinx page's main body."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: list[list[str]] = [[]]
        self._stack: list[str] = []
        self._main_depth: int | None = None
        self._skip_depth: int | None = None
        self._block: str | None = None
        self._parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in VOID_TAGS:
            return
        self._stack.append(tag)
        attributes = dict(attrs)
        if self._main_depth is None:
            if tag == "div" and attributes.get("role") == "main":
                self._main_depth = len(self._stack)
            return
        if self._skip_depth is not None:
            return
        if tag in SKIPPED_TAGS or "headerlink" in (attributes.get("class") or ""):
            self._skip_depth = len(self._stack)
        elif self._block is None and (tag == "p" or tag in HEADINGS):
            if tag == "h2" and any(self.sections[-1]):
                self.sections.append([])
            self._block = tag
            self._parts = []

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID_TAGS or tag not in self._stack:
            return
        while self._stack:
            depth = len(self._stack)
            closed = self._stack.pop()
            self._close(closed, depth)
            if closed == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._block is not None and self._skip_depth is None:
            self._parts.append(data)

    def _close(self, tag: str, depth: int) -> None:
        if depth == self._main_depth:
            self._main_depth = None
        if depth == self._skip_depth:
            self._skip_depth = None
        elif tag == self._block and self._skip_depth is None:
            text = " ".join("".join(self._parts).split())
            if text:
                self.sections[-1].append(text)
            self._block = None


def page_documents(path: Path) -> list[str]:
    """Return the prose documents (one per ``<h2>`` section) of one HTML page."""
    parser = ProseExtractor()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    documents = ("\n\n".join(section) for section in parser.sections)
    return [doc for doc in documents if len(doc) >= MIN_DOC_CHARS]


def html_pages(html_dir: Path) -> list[Path]:
    """All documentation pages under ``html_dir`` in sorted relative-path order."""
    pages = []
    for path in html_dir.rglob("*.html"):
        relative = path.relative_to(html_dir)
        if relative.parts[0] in SKIPPED_DIRS or SKIPPED_PAGES.match(relative.name):
            continue
        pages.append(relative)
    return [html_dir / rel for rel in sorted(pages, key=lambda p: p.as_posix())]


def write_jsonl_gz(path: Path, documents: list[str]) -> None:
    """Write ``{"text": ...}`` lines gzip-compressed with a fixed mtime (reproducible)."""
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz,
    ):
        for doc in documents:
            gz.write((json.dumps({"text": doc}, ensure_ascii=False) + "\n").encode("utf-8"))


def write_splits(output_dir: Path, documents: list[str]) -> dict[str, dict[str, int]]:
    """Every `VALID_EVERY`-th document to ``valid.jsonl.gz``, the rest to ``train.jsonl.gz``;
    prints and returns each split's document count and UTF-8 bytes."""
    valid = documents[VALID_EVERY - 1 :: VALID_EVERY]
    train = [doc for i, doc in enumerate(documents) if (i + 1) % VALID_EVERY]
    output_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, docs in (("train", train), ("valid", valid)):
        write_jsonl_gz(output_dir / f"{name}.jsonl.gz", docs)
        size = sum(len(doc.encode("utf-8")) for doc in docs)
        sizes[name] = {"documents": len(docs), "utf8_bytes": size}
        print(f"{name}: {len(docs)} documents, {size / 1e6:.2f} MB of text")
    return sizes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--deb-dir",
        type=Path,
        required=True,
        help="directory the python3.11-doc .deb was extracted into",
    )
    parser.add_argument("--output-dir", type=Path, required=True)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    html_dir = args.deb_dir / HTML_SUBDIR
    if not html_dir.is_dir():
        print(f"error: no HTML documentation at {html_dir}", file=sys.stderr)
        return 1
    documents = [doc for page in html_pages(html_dir) for doc in page_documents(page)]
    write_splits(args.output_dir, documents)
    return 0


if __name__ == "__main__":
    sys.exit(main())
