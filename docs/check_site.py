"""Check a built HTML site for broken local links, anchors and images.

    python docs/check_site.py docs/_build/html

Every ``href`` and ``src`` of every page that points inside the site must name an existing
file, and an ``#anchor`` must name an ``id`` on the target page. External links (http,
mailto) are not fetched. Exit status 1 lists what is broken.
"""

from __future__ import annotations

import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str]] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("name"):
            self.ids.add(attrs["name"])
        for key in ("href", "src"):
            if attrs.get(key) and tag in ("a", "img", "link", "script", "source"):
                self.refs.append((tag, attrs[key]))


def check(root: Path) -> list[str]:
    root = root.resolve()
    # _static holds the theme's template fragments, not pages
    pages = sorted(p for p in root.rglob("*.html") if "_static" not in p.relative_to(root).parts)
    parsed = {}
    for page in pages:
        p = _Refs()
        p.feed(page.read_text(encoding="utf-8", errors="replace"))
        parsed[page] = p
    broken = []
    n_refs = 0
    for page, p in parsed.items():
        for tag, ref in p.refs:
            url = urlsplit(ref)
            if url.scheme or ref.startswith("//") or ref.startswith("data:"):
                continue
            n_refs += 1
            target = (page.parent / unquote(url.path)).resolve() if url.path else page
            if target.is_dir():
                target = target / "index.html"
            where = f"{page.relative_to(root)}: <{tag}> {ref}"
            if not target.is_file() or root not in target.parents:
                broken.append(f"{where} -> missing {target}")
            elif url.fragment and target.suffix == ".html":
                ids = parsed[target].ids if target in parsed else set()
                if unquote(url.fragment) not in ids:
                    broken.append(f"{where} -> no id {url.fragment!r}")
    print(f"{len(pages)} pages, {n_refs} local links and images checked, {len(broken)} broken")
    return broken


if __name__ == "__main__":
    bad = check(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/_build/html"))
    for b in bad:
        print(b)
    sys.exit(1 if bad else 0)
