"""The report as one self-contained HTML file: inline CSS, images as data URIs, no request to any network.

Each section has a stable element id (:data:`SECTION_IDS`); a section that could not be shown says why. A
small inline script records each image's box on the page (``data-box``) once it has loaded, which lets a
headless browser's DOM dump locate the figures in its screenshot.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Sequence

from featstore.report.figures import data_uri

SECTION_IDS = ("feature-maps", "distributions", "codec-error", "provenance", "throughput", "verify")

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1b1b1b;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
h3{font-size:14px;margin:14px 0 6px;font-weight:600} .meta{color:#555;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:6px 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top} th{background:#f4f4f4} td.v{font-family:ui-monospace,monospace;word-break:break-all;max-width:820px}
.note{background:#fff7e0;border-left:4px solid #e0a000;padding:6px 10px;margin:6px 0;font-size:13px}
.bad{background:#fdecea;border-left-color:#d62728} .ok{background:#eaf6ec;border-left-color:#2ca02c}
.record{margin-bottom:18px} .tiles{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
figure{margin:0;display:flex;flex-direction:column;gap:4px;padding:4px;border:2px solid transparent}
figure.kept{border-color:#ff7f0e;background:#fff3e6} figure.map-tile{border-left:2px dashed #999}
figure img{width:180px;height:auto;display:block} img.map{image-rendering:pixelated}
figcaption{font-size:11px;color:#444;max-width:180px;word-break:break-all}
.missing{width:180px;height:120px;display:flex;align-items:center;justify-content:center;background:#f0f0f0;
font-size:11px;color:#666;text-align:center;padding:4px;box-sizing:border-box;word-break:break-all}
img.plot{max-width:100%;height:auto;display:block;margin:6px 0}
"""

LAYOUT_SCRIPT = """
window.addEventListener('load',function(){document.querySelectorAll('img').forEach(function(i){
var b=i.getBoundingClientRect();i.setAttribute('data-box',[Math.round(b.left+window.scrollX),
Math.round(b.top+window.scrollY),Math.round(b.width),Math.round(b.height)].join(','));});
document.body.setAttribute('data-height',String(document.documentElement.scrollHeight));});
"""


def esc(text: object) -> str:
    """HTML-escaped text."""
    return html.escape(str(text), quote=True)


def note(text: str, kind: str = "") -> str:
    """A highlighted remark (``kind``: "", "bad" or "ok")."""
    return f'<div class="note {kind}">{esc(text)}</div>'


def table(rows: Sequence[Sequence[object]], header: Sequence[str] | None = None, values: bool = True) -> str:
    """A table of text cells (escaped); the cells after the first are monospace values when ``values``."""
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f'<td{" class=v" if values and i else ""}>{esc(c)}</td>'
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def plot(png: bytes, alt: str) -> str:
    """An embedded plot."""
    return f'<img class="plot figure" alt="{esc(alt)}" src="{data_uri(png)}">'


def picture(png: bytes | None, alt: str, cls: str, missing: str) -> str:
    """An embedded picture, or a grey box saying why there is none."""
    if png is None:
        return f'<div class="missing">{esc(missing)}</div>'
    return f'<img class="{cls}" alt="{esc(alt)}" src="{data_uri(png)}">'


@dataclass
class Section:
    """One section of the page: its element id, heading and HTML body."""

    id: str
    title: str
    body: list[str] = field(default_factory=list)

    def add(self, *parts: str) -> "Section":
        """Append HTML parts to the body."""
        self.body.extend(parts)
        return self

    def html(self) -> str:
        """The section's markup."""
        return f'<section id="{esc(self.id)}"><h2>{esc(self.title)}</h2>{"".join(self.body)}</section>'


def render(title: str, subtitle: str, sections: Sequence[Section], warnings: Sequence[str]) -> str:
    """The whole page."""
    top = "".join(note(w, "bad") for w in warnings)
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width\"><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body><header><h1>{esc(title)}</h1><div class=\"meta\">{esc(subtitle)}"
            f"</div>{top}</header>{''.join(s.html() for s in sections)}<script>{LAYOUT_SCRIPT}</script></body></html>")
