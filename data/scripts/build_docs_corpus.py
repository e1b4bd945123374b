"""Build a larger prose corpus from Debian documentation packages (output not committed).

The TST-vs-baseline benchmark needs data that no variant reads twice: a TST run reads about
``1 + r(s - 1)`` times the baseline's data tokens, more than the shipped sample corpus holds
at benchmark scale. This script downloads Debian packages of Sphinx-built documentation
with ``apt-get download`` (no root needed), unpacks them with ``dpkg-deb -x`` and reduces
every HTML page to its prose exactly as `build_sample_corpus.py` does (headings and ``<p>``
paragraphs of the main body, one document per ``<h2>`` section of at least 200 characters).
Packages and pages are read in sorted order, identical documents are kept once, and every
20th document goes to the validation split, so the output is the same on every run of the
same package versions (recorded in ``manifest.json``).

The default packages (Debian bookworm, main, listed in ``PACKAGES``) are the Sphinx
documentation of Python 3.11 and of 26 Python projects (Django, SQLAlchemy, SciPy, pandas,
scikit-learn, Astropy, statsmodels, ...); their licences (PSF, BSD and MIT style) are in each
package's ``usr/share/doc/*/copyright``. ``manifest.json`` records the package versions and
document counts.

Usage::

    python data/scripts/build_docs_corpus.py --work-dir /tmp/debdocs --output-dir data/docs
    python tools/preprocess_data.py --input data/docs/train.jsonl.gz ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_sample_corpus import (
    MIN_DOC_CHARS,
    SKIPPED_DIRS,
    SKIPPED_PAGES,
    VOID_TAGS,
    ProseExtractor,
    write_splits,
)

PACKAGES = (
    "python3.11-doc",
    "python-django-doc",
    "python-sqlalchemy-doc",
    "sphinx-doc",
    "python-sympy-doc",
    "python-scipy-doc",
    "python-pandas-doc",
    "python-flask-doc",
    "python-werkzeug-doc",
    "python-jinja2-doc",
    "python-cryptography-doc",
    "python-sklearn-doc",
    "python-astropy-doc",
    "python-statsmodels-doc",
    "python-skimage-doc",
    "python-biopython-doc",
    "python-dask-doc",
    "python-xarray-doc",
    "python-celery-doc",
    "python-pytest-doc",
    "python-ase-doc",
    "python-tornado-doc",
    "python-lxml-doc",
    "python-hypothesis-doc",
    "python-mpmath-doc",
    "python-setuptools-doc",
    "cython-doc",
)
# Generated API listings and source listings: identifiers, not prose.
SKIPPED_PARTS = {*SKIPPED_DIRS, "_modules", "generated", "reference", "api"}


class DocsProseExtractor(ProseExtractor):
    """`ProseExtractor` that also finds the main body of other Sphinx themes: any element
    with ``role="main"`` (pydata: ``<main>``) and Django's ``<div class="yui-g">``."""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        is_main = attributes.get("role") == "main" or "yui-g" in (attributes.get("class") or "")
        if self._main_depth is None and tag not in VOID_TAGS and is_main:
            self._stack.append(tag)
            self._main_depth = len(self._stack)
            return
        super().handle_starttag(tag, attrs)


def page_documents(path: Path) -> list[str]:
    """The prose documents (one per ``<h2>`` section) of one HTML page."""
    parser = DocsProseExtractor()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    parser.close()
    documents = ("\n\n".join(section) for section in parser.sections)
    return [doc for doc in documents if len(doc) >= MIN_DOC_CHARS]


def unpack(package: str, work_dir: Path) -> tuple[Path, str]:
    """Download (once) and unpack ``package``; returns (its root, its version)."""
    debs = sorted(work_dir.glob(f"{package}_*.deb"))
    if not debs:
        subprocess.run(["apt-get", "download", package], cwd=work_dir, check=True)
        debs = sorted(work_dir.glob(f"{package}_*.deb"))
    root = work_dir / package
    if not root.is_dir():
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(root)], check=True)
    return root, unquote(debs[-1].name.split("_")[1])


def pages(root: Path) -> list[Path]:
    """The package's documentation pages, in sorted path order."""
    found = []
    for path in (root / "usr" / "share" / "doc").rglob("*.html"):
        relative = path.relative_to(root)
        if SKIPPED_PARTS & set(relative.parts) or SKIPPED_PAGES.match(path.name):
            continue
        if path.is_file() and not path.is_symlink():
            found.append(relative)
    return [root / rel for rel in sorted(found, key=lambda p: p.as_posix())]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True, help="downloads and unpacking")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--packages", nargs="+", default=list(PACKAGES))
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    documents, seen, manifest = [], set(), {"packages": {}}
    for package in sorted(args.packages):
        root, version = unpack(package, args.work_dir.resolve())
        kept = 0
        for page in pages(root):
            for doc in page_documents(page):
                digest = hashlib.sha256(doc.encode("utf-8")).digest()
                if digest not in seen:
                    seen.add(digest)
                    documents.append(doc)
                    kept += 1
        manifest["packages"][package] = {"version": version, "documents": kept}
        print(f"{package} {version}: {kept} documents", flush=True)
    manifest.update(write_splits(args.output_dir, documents))
    (args.output_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
