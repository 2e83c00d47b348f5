"""The one place that builds, reads, saves and loads sampling results.

ArviZ < 1.0 keeps results in ``arviz.InferenceData``; ArviZ ≥ 1.0 (Python ≥ 3.12) in
``xarray.DataTree``. Both hold the same groups of ``xarray.Dataset`` objects, so the
rest of the package only ever calls :func:`make_inference_data`, :func:`get_group`,
:func:`group_names`, :func:`save` and :func:`load`, and never cares which it got. The
default container follows the installed ArviZ (:func:`default_backend`); a DataTree
works under either generation, an InferenceData only under ArviZ < 1.

A file written by :func:`save` is the same netCDF under both generations (one netCDF
group per ArviZ group), so a run saved under ArviZ 0.x loads under 1.x and back.

Files are netCDF-4 with one netCDF group per ArviZ group, written atomically: to a
temporary file in the same folder, then renamed over the target.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import xarray as xr

Backend = Literal["inferencedata", "datatree"]
BACKENDS: tuple[Backend, ...] = ("inferencedata", "datatree")


def _arviz():
    with warnings.catch_warnings():
        # ArviZ 0.2x announces its 1.0 refactor on import; not actionable for users here.
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


def arviz_major() -> int:
    """Major version of the installed ArviZ: 0 (``InferenceData``) or 1+ (``DataTree``)."""
    return int(str(_arviz().__version__).split(".")[0])


def default_backend() -> Backend:
    """``"inferencedata"`` under ArviZ < 1, ``"datatree"`` under ArviZ ≥ 1."""
    return "inferencedata" if arviz_major() < 1 else "datatree"


def available_backends() -> tuple[Backend, ...]:
    """The backends the installed ArviZ can build: both under ArviZ < 1 (which also
    reads a ``DataTree``), only ``"datatree"`` under ArviZ ≥ 1 (no ``InferenceData``)."""
    return BACKENDS if arviz_major() < 1 else ("datatree",)


def check_backend(backend: Any) -> Backend:
    """``backend`` validated, ``None`` replaced by :func:`default_backend`.

    Raises:
        ValueError: ``backend`` is not ``"inferencedata"``, ``"datatree"`` or None, or it
            is ``"inferencedata"`` while ArviZ ≥ 1 is installed (which has no
            ``InferenceData``).
    """
    if backend is None:
        return default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'inferencedata', 'datatree' or None, got {backend!r}")
    if backend == "inferencedata" and arviz_major() >= 1:
        raise ValueError(
            f"backend='inferencedata' needs arviz<1, but ArviZ {_arviz().__version__} is "
            "installed, which keeps results in xarray.DataTree; pass backend='datatree' (or "
            "leave backend unset), or install arviz<1 (Python 3.11)"
        )
    return backend


def make_inference_data(groups: Mapping[str, xr.Dataset], backend: Backend | None = None) -> Any:
    """Bundle named groups (``posterior``, ``sample_stats``, ...) into the ArviZ container.

    Args:
        groups: group name → its ``xarray.Dataset``.
        backend: ``"inferencedata"`` (``arviz.InferenceData``, ArviZ < 1 only),
            ``"datatree"`` (``xarray.DataTree``, any ArviZ), or None: the installed ArviZ's
            own container (:func:`default_backend`).

    Raises:
        ValueError: a backend the installed ArviZ cannot build (see :func:`check_backend`).
    """
    backend = check_backend(backend)
    if backend == "inferencedata":
        return _arviz().InferenceData(**dict(groups))
    return xr.DataTree.from_dict(dict(groups))


def group_names(data: Any) -> list[str]:
    """Names of the groups held by an InferenceData or DataTree."""
    if isinstance(data, xr.DataTree):
        return list(data.children)
    return list(data.groups())


def get_group(data: Any, name: str) -> xr.Dataset:
    """Group ``name`` of an InferenceData or DataTree as an ``xarray.Dataset``."""
    if name not in group_names(data):
        raise KeyError(f"no group {name!r}; groups present: {group_names(data)}")
    if isinstance(data, xr.DataTree):
        return data[name].to_dataset()
    return getattr(data, name)


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over
    ``path``: readers see the old file or the new one, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates the file 0600; a result file gets the mode any new file would.
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _current_umask() -> int:
    # Linux reports the umask without changing it; os.umask's set-and-restore briefly
    # leaves other threads of the process with mask 0, so it is only the fallback.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def to_jsonable(obj: Any) -> Any:
    """``obj`` with NumPy arrays and scalars as Python values, non-finite floats as None
    (strict JSON has no NaN) and anything else unknown as its ``str``."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else None
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def save(data: Any, path: str | os.PathLike) -> Path:
    """Write ``data`` to a netCDF file atomically (a crash never leaves half a file)."""
    tree = xr.DataTree.from_dict({g: get_group(data, g) for g in group_names(data)})
    return atomic_write(path, lambda tmp: tree.to_netcdf(tmp, engine="netcdf4"))


def load(path: str | os.PathLike, backend: Backend | None = None) -> Any:
    """Read a file written by :func:`save` fully into memory (the file is closed).

    Args:
        path: the netCDF file.
        backend: the container to return, as for :func:`make_inference_data`.
    """
    backend = check_backend(backend)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no results file at {path}")
    with xr.open_datatree(path, engine="netcdf4") as tree:
        groups = {name: tree[name].to_dataset().load() for name in tree.children}
    return make_inference_data(groups, backend)
