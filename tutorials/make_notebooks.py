"""Regenerate the tutorial notebooks: ``python tutorials/make_notebooks.py [NAME ...]``.

Each ``tutorials/NN_*.py`` (jupytext percent format) is converted to ``NN_*.ipynb``
with jupytext and executed with nbclient at full size (``BAYES_SUSC_FAST`` is
cleared), so the committed notebook carries outputs and figures. Never edit the
``.ipynb`` by hand: edit the ``.py`` and rerun this script.
``tests/test_tutorials.py`` fails when a notebook's code cells differ from its ``.py``.

Needs the ``docs`` extra: ``pip install -e '.[docs]'``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MAX_BYTES = 1_000_000


def tutorials(names: list[str] | None = None) -> list[Path]:
    """The tutorial scripts, ``NN_*.py`` in ``tutorials/`` (optionally only ``names``)."""
    paths = sorted(HERE.glob("[0-9][0-9]_*.py"))
    if names:
        paths = [p for p in paths if p.stem in names or p.name in names]
    return paths


def build(path: Path, timeout: int = 1200, kernel: str = "python3") -> Path:
    """Convert ``path`` to a notebook beside it, execute it, write it; return its path."""
    nb = jupytext.read(path)
    # Keep the jupytext pairing header out of the notebook metadata noise.
    nb.metadata.pop("jupytext", None)
    env_fast = os.environ.pop("BAYES_SUSC_FAST", None)
    try:
        client = NotebookClient(
            nb,
            timeout=timeout,
            kernel_name=kernel,
            resources={"metadata": {"path": str(ROOT)}},
        )
        client.execute()
    finally:
        if env_fast is not None:
            os.environ["BAYES_SUSC_FAST"] = env_fast
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type == "code":
            # tqdm's "IProgress not found" warning is kernel noise, not tutorial output.
            cell.outputs = [
                o
                for o in cell.outputs
                if not (o.output_type == "stream" and "TqdmWarning" in o.text)
            ]
    out = path.with_suffix(".ipynb")
    nbformat.write(nb, out)
    size = out.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{out.name} is {size} bytes (limit {MAX_BYTES}): shrink its figures")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="tutorials to build (default: all)")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per cell")
    args = parser.parse_args(argv)
    paths = tutorials(args.names)
    if not paths:
        print("no tutorials matched", file=sys.stderr)
        return 1
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    for path in paths:
        start = time.perf_counter()
        out = build(path, timeout=args.timeout)
        print(
            f"{out.relative_to(ROOT)}: {out.stat().st_size / 1e3:.0f} kB, "
            f"executed in {time.perf_counter() - start:.0f} s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
