"""MkDocs hook: publish files that live outside ``docs/`` as pages of the site.

The tutorials (``tutorials/NN_*.ipynb``, executed by ``tutorials/make_notebooks.py``), the
validation reports (``diagnostics/reports/*/report.md`` and their figures) and the
benchmark figures (``benchmarks/README.md``) each have one home in the repository, next
to the code that produces them. Copying them into ``docs/`` would leave two versions to
drift apart, so this hook renders them into the site at build time instead:

- ``tutorials/NN_name.ipynb`` → page ``tutorials/NN_name.md``: markdown cells as they
  are, code cells as Python blocks, outputs as text blocks, HTML tables or inline PNG
  images. A tutorial without a notebook yet is rendered from its ``.py`` without outputs.
- ``diagnostics/reports/NAME/report.md`` → page ``diagnostics/NAME.md``, its PNG
  figures beside it (the report's relative image links keep working).
- ``benchmarks/README.md`` → included by ``docs/performance.md`` (pymdownx.snippets);
  its figures under ``benchmarks/results/`` are published at the same relative paths.

Only the standard library and MkDocs are used (the notebook JSON is read directly).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
_CELL = re.compile(r"^# %%(.*)$")


def _text(src: str | list[str]) -> str:
    return "".join(src) if isinstance(src, list) else src


def _fence(body: str, lang: str = "") -> str:
    body = body.rstrip("\n")
    ticks = "```"
    while ticks in body:
        ticks += "`"
    return f"{ticks}{lang}\n{body}\n{ticks}\n"


def _output(out: dict) -> str:
    kind = out.get("output_type")
    if kind == "stream":
        return _fence(_text(out.get("text", "")), "text")
    if kind == "error":
        return _fence("\n".join(out.get("traceback", [])), "text")
    data = out.get("data", {})
    if "image/png" in data:
        png = _text(data["image/png"]).replace("\n", "")
        return f'<img alt="figure" src="data:image/png;base64,{png}">\n'
    if "text/html" in data:
        html = _text(data["text/html"]).strip()
        return f'<div class="nb-output" markdown="0">\n{html}\n</div>\n'
    if "text/plain" in data:
        return _fence(_text(data["text/plain"]), "text")
    return ""


def notebook_markdown(path: Path) -> str:
    """A tutorial notebook as one markdown page (outputs included)."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    parts: list[str] = []
    for cell in nb["cells"]:
        src = _text(cell["source"]).strip("\n")
        if cell["cell_type"] == "markdown":
            parts.append(src + "\n")
        elif cell["cell_type"] == "code" and src:
            parts.append(_fence(src, "python"))
            parts.extend(o for o in map(_output, cell.get("outputs", [])) if o)
    return _header(path) + "\n".join(parts)


def script_markdown(path: Path) -> str:
    """A jupytext percent script as a markdown page (no outputs: no notebook yet)."""
    cells: list[tuple[bool, list[str]]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        m = _CELL.match(line)
        if m:
            cells.append(("[markdown]" in m.group(1) or "[md]" in m.group(1), []))
        elif cells:
            cells[-1][1].append(line)
    parts = []
    for is_md, lines in cells:
        body = "\n".join(lines).strip("\n")
        if is_md:
            parts.append("\n".join(re.sub(r"^# ?", "", ln) for ln in body.splitlines()) + "\n")
        elif body:
            parts.append(_fence(body, "python"))
    note = "!!! note\n    This tutorial's notebook has not been built yet; outputs are missing.\n\n"
    return _header(path) + note + "\n".join(parts)


def _header(path: Path) -> str:
    name = path.stem
    return (
        f"<!-- generated from tutorials/{path.name} by docs/hooks/publish.py -->\n"
        f"*Source: `tutorials/{name}.py` (run it with `python tutorials/{name}.py`); "
        f"notebook `tutorials/{name}.ipynb`.*\n\n"
    )


def _add(files: Files, config: MkDocsConfig, uri: str, **kwargs) -> None:
    existing = files.get_file_from_path(uri)
    if existing is not None:
        files.remove(existing)
    files.append(File.generated(config, uri, **kwargs))


def on_files(files: Files, config: MkDocsConfig) -> Files:
    for py in sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py")):
        nb = py.with_suffix(".ipynb")
        text = notebook_markdown(nb) if nb.exists() else script_markdown(py)
        _add(files, config, f"tutorials/{py.stem}.md", content=text)
    for report in sorted((ROOT / "diagnostics" / "reports").glob("*/report.md")):
        name = report.parent.name
        _add(files, config, f"diagnostics/{name}.md", abs_src_path=str(report))
        for png in sorted(report.parent.glob("*.png")):
            _add(files, config, f"diagnostics/{png.name}", abs_src_path=str(png))
    # Figures that benchmarks/README.md (included by performance.md) links relatively.
    bench = ROOT / "benchmarks"
    for png in sorted((bench / "results").rglob("*.png")):
        _add(files, config, png.relative_to(bench).as_posix(), abs_src_path=str(png))
    return files
