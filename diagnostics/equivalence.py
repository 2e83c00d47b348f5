"""Behaviour kept: the same runs under an earlier commit and under this tree, bit for bit.

Run ``python -m diagnostics.equivalence [--before REV] [--out DIR] [--skip-gpt2]``.

It exports REV (default ``8cc9976``, the last commit before the package was reorganised
into stages) with ``git archive``, then runs, under each tree in a fresh interpreter
(``PYTHONPATH`` set to that tree, so the installed package plays no part):

* ``bayes-susc demo --quick --workers 1`` (the shipped demo model, every head);
* ``bayes-susc run examples/tiny_gpt2.toml`` (a seeded Hugging Face GPT-2; skipped with
  ``--skip-gpt2`` or when ``transformers`` is missing).

Every ``.nc`` file both run folders hold (``components/*.nc``, ``response_matrix.nc``,
analyses) is opened group by group, and every data variable and coordinate is compared
with ``numpy.array_equal`` (NaN equal to NaN) after checking dtype and dimensions.
Attributes are compared too, except those that record when or where a run happened.
It prints one line per file and exits 1 if any array differs or a file the earlier
commit wrote is missing (files only this tree writes, such as new analyses, are listed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import xarray as xr

# Attributes that legitimately differ between two runs of the same code.
VOLATILE_ATTRS = {
    "created_at",
    "creation_library_version",
    "arviz_version",
    "sampling_time",
    "elapsed_s",
    "wall_s",
    "python",
    "platform",
    "torch_version",
    "library_version",
    "hostname",
    "command",
    "git_commit",
}

REPO = Path(__file__).resolve().parents[1]


def export_tree(rev: str, dest: Path) -> Path:
    """Write the files of commit ``rev`` into ``dest`` (no git metadata); return ``dest``."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", rev],
        check=True,
        capture_output=True,
    ).stdout
    dest.mkdir(parents=True)
    tar_path = dest.parent / f"{dest.name}.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, filter="data")
    tar_path.unlink()
    return dest


def run_cli(tree: Path, args: list[str], log: Path) -> None:
    """Run ``bayes-susc ARGS`` with the package of ``tree``, from ``tree``; raise on failure."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    code = "import sys; from bayes_susc.cli import app; sys.argv[0] = 'bayes-susc'; app()"
    with log.open("w") as fh:
        proc = subprocess.run(
            [sys.executable, "-c", code, *args], cwd=tree, env=env, stdout=fh, stderr=fh
        )
    if proc.returncode != 0:
        raise SystemExit(f"`bayes-susc {' '.join(args)}` failed under {tree}; see {log}")


def _groups(path: Path) -> dict[str, xr.Dataset]:
    tree = xr.open_datatree(path)
    return {node.path: node.to_dataset(inherit=False).load() for node in tree.subtree}


def _attrs_differ(a: dict, b: dict) -> list[str]:
    keys = (set(a) | set(b)) - VOLATILE_ATTRS
    return sorted(k for k in keys if str(a.get(k)) != str(b.get(k)))


def compare_file(before: Path, after: Path) -> tuple[list[str], list[str], int]:
    """Compare two netCDF files group by group.

    Returns (array differences, attribute differences, number of arrays compared).
    """
    problems: list[str] = []
    attr_notes: list[str] = []
    count = 0
    ga, gb = _groups(before), _groups(after)
    if set(ga) != set(gb):
        problems.append(f"groups differ: {sorted(set(ga) ^ set(gb))}")
    for group in sorted(set(ga) & set(gb)):
        da, db = ga[group], gb[group]
        names_a = set(da.variables)
        names_b = set(db.variables)
        if names_a != names_b:
            problems.append(f"{group}: variables differ: {sorted(names_a ^ names_b)}")
        where = group.rstrip("/")
        for name in sorted(names_a & names_b):
            va, vb = da.variables[name], db.variables[name]
            count += 1
            if va.dims != vb.dims or va.dtype != vb.dtype:
                problems.append(f"{where}/{name}: {va.dims} {va.dtype} vs {vb.dims} {vb.dtype}")
                continue
            a, b = np.asarray(va.values), np.asarray(vb.values)
            nan_ok = a.dtype.kind in "fc"
            if a.shape != b.shape or not np.array_equal(a, b, equal_nan=nan_ok):
                problems.append(f"{where}/{name}: values differ")
            attr_notes += [
                f"{where}/{name}.{k}" for k in _attrs_differ(dict(va.attrs), dict(vb.attrs))
            ]
        attr_notes += [f"{group}.{k}" for k in _attrs_differ(dict(da.attrs), dict(db.attrs))]
    return problems, attr_notes, count


def compare_runs(before: Path, after: Path) -> bool:
    """Print a line per ``.nc`` file of two run folders; return True when all arrays agree."""
    files_a = {p.relative_to(before) for p in before.rglob("*.nc")}
    files_b = {p.relative_to(after) for p in after.rglob("*.nc")}
    ok = True
    for missing in sorted(files_a - files_b):
        print(f"  MISSING    {missing} (the earlier commit wrote it)")
        ok = False
    for added in sorted(files_b - files_a):
        print(f"  new        {added} (only this tree writes it)")
    for rel in sorted(files_a & files_b):
        problems, attr_notes, count = compare_file(before / rel, after / rel)
        verdict = "identical" if not problems else "DIFFERENT"
        print(f"  {verdict:9}  {rel}  ({count} arrays)")
        for line in problems:
            print(f"      {line}")
        if attr_notes:
            print(f"      attributes that differ: {', '.join(attr_notes)}")
        ok = ok and not problems
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="8cc9976", help="commit to compare against")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here")
    parser.add_argument("--skip-gpt2", action="store_true", help="only the demo")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="equivalence-")) if args.out is None else args.out
    work.mkdir(parents=True, exist_ok=True)
    old_tree = export_tree(args.before, work / "before-tree")
    trees = {"before": old_tree, "after": REPO}

    runs: list[tuple[str, list[str]]] = [
        ("demo", ["demo", "--quick", "--workers", "1", "--no-progress"]),
    ]
    have_hf = True
    try:
        import transformers  # noqa: F401
    except ImportError:
        have_hf = False
    if not args.skip_gpt2 and have_hf:
        runs.append(("tiny_gpt2", ["run", "examples/tiny_gpt2.toml", "--no-progress"]))
    elif not args.skip_gpt2:
        print("transformers is not installed: the tiny_gpt2 run is skipped")

    ok = True
    for label, cli_args in runs:
        folders = {}
        for side, tree in trees.items():
            folder = work / f"{label}-{side}"
            if folder.exists():
                shutil.rmtree(folder)
            run_cli(tree, [*cli_args, "--out", str(folder)], work / f"{label}-{side}.log")
            folders[side] = folder
        print(f"{label}: {args.before} vs this tree")
        ok = compare_runs(folders["before"], folders["after"]) and ok
    shutil.rmtree(old_tree)
    print("bit-identical" if ok else "NOT bit-identical")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
