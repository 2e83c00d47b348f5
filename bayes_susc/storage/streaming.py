"""Draws streamed to a zarr store as they are produced, and read back lazily.

``sample(..., store=PATH)`` keeps at most ``chunk_draws`` kept draws per chain in memory
(on the sampling device) and then writes them to a zarr (v3) store at ``PATH`` through a
:class:`DrawWriter`; the result it returns is :func:`open_store` of that store: the same
groups, variables, coordinates and attrs as the in-memory result (DESIGN.md §3), but
with every variable read from disk only when indexed. The estimators of
:mod:`bayes_susc.estimation.susceptibility` read ``probe_loss`` in probe chunks, so their memory is
O(chains × draws × probe_chunk) whatever the number of probe items.

Store layout (a zarr v3 group, readable by ``xarray.open_dataset(PATH, engine="zarr",
group=NAME)`` and ``xarray.open_datatree(PATH, engine="zarr")``):

- groups ``posterior``, ``sample_stats``, ``constant_data`` as in memory; arrays are
  chunked (1 chain, ``chunk_draws`` draws, :data:`STORE_PROBE_CHUNK` probe items), so
  reading a block of probe items touches only their chunks;
- root attrs: ``bayes_susc_store`` (:data:`STORE_FORMAT`), ``num_draws``,
  ``chunk_draws``, ``chain`` (the chain indices), ``draws_written`` (per chain: how
  many leading draws are on disk, updated after every chunk), ``variables`` (each
  group's variable order, written at the end) and ``bayes_susc_complete``.

Completion. ``bayes_susc_complete`` is ``False`` from the moment the store is created
and is set to ``True`` last, after every draw, ``constant_data`` and the run attrs are
written; zarr (≥ 3.1) replaces the root ``zarr.json`` atomically, so a reader sees the
marker only on a finished store. A run that is killed or raises leaves a store whose
marker is ``False``: it holds the first ``draws_written[k]`` draws of chain k (draws
not yet written read as NaN, ``diverged`` as False), the coordinates, no run attrs on
its groups, and no ``constant_data`` group. :func:`open_store` refuses such a store
with :class:`IncompleteStoreError` unless ``allow_incomplete=True``, which returns the
draws every chain has finished (a prefix of the run), flagged in its attrs.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from bayes_susc.storage.draws import Backend, check_backend, make_inference_data
from bayes_susc.validation import check_int

__all__ = [
    "BUFFER_VALUES",
    "COMPLETE_ATTR",
    "DEFAULT_CHUNK_DRAWS",
    "STORE_FORMAT",
    "STORE_PROBE_CHUNK",
    "DrawWriter",
    "IncompleteStoreError",
    "check_store_args",
    "default_chunk_draws",
    "open_store",
    "store_status",
]

#: Root attribute naming the layout version of a draw store.
STORE_FORMAT = "bayes_susc.draws/1"
#: Root attribute set to True as the very last write of a finished run.
COMPLETE_ATTR = "bayes_susc_complete"
#: Most kept draws per chain held in memory before a write when ``chunk_draws`` is not
#: given; fewer when the probe set is large (see :data:`BUFFER_VALUES`).
DEFAULT_CHUNK_DRAWS = 50
#: Default bound on the buffered probe losses, chains × chunk_draws × probe items
#: (2²¹ values, 16 MiB in float64): the buffer stays this size however large P is.
BUFFER_VALUES = 2**21
#: Probe items per zarr chunk: a probe block is read without decompressing the rest.
STORE_PROBE_CHUNK = 4096
_GROUPS = ("posterior", "sample_stats", "constant_data")


class IncompleteStoreError(ValueError):
    """The store's run did not finish: it has no completion marker."""


def _zarr() -> Any:
    try:
        import zarr
    except ImportError:  # pragma: no cover - zarr is in the test extra
        raise ImportError(
            "sample(store=...) and open_store need zarr >= 3.1: pip install 'bayes_susc[stream]'"
        ) from None
    return zarr


def check_store_args(
    store: str | os.PathLike | None, chunk_draws: Any, num_draws: int
) -> tuple[Path, int] | None:
    """Validate ``store``/``chunk_draws`` of :func:`bayes_susc.sample` before any sampling.

    Returns:
        ``None`` for the in-memory path (``store=None``), else (store path, draws per
        chunk or ``None`` for :func:`default_chunk_draws`).

    Raises:
        ValueError: ``chunk_draws`` is not an int >= 1, or is given without ``store``.
        TypeError: ``store`` is not a path.
        FileExistsError: something already exists at ``store`` (finished work is never
            overwritten).
    """
    if store is None:
        if chunk_draws is not None:
            raise ValueError(
                f"chunk_draws={chunk_draws!r} applies only when draws are streamed to disk: "
                "pass store=PATH as well, or leave chunk_draws=None"
            )
        return None
    chunk = None if chunk_draws is None else check_int("chunk_draws", chunk_draws, minimum=1)
    if not isinstance(store, (str, os.PathLike)):
        raise TypeError(f"store must be a path (str or os.PathLike) or None, got {store!r}")
    path = Path(store)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(
            f"store={str(path)!r} already exists; choose a new path (a store is never "
            "overwritten, so finished work is not lost)"
        )
    _zarr()  # fail now, not after sampling, when zarr is missing
    return path, chunk


def default_chunk_draws(num_chains: int, num_probe: int) -> int:
    """Draws per chunk: at most :data:`DEFAULT_CHUNK_DRAWS`, and few enough that
    chains × draws × probe items stays within :data:`BUFFER_VALUES` (at least 1)."""
    return max(1, min(DEFAULT_CHUNK_DRAWS, BUFFER_VALUES // max(1, num_chains * num_probe)))


def posterior_dims(name: str, ndim: int) -> tuple[str, ...]:
    """Dimensions of posterior variable ``name`` with ``ndim`` axes, as the sampler names them."""
    if name == "probe_loss":
        return ("chain", "draw", "probe")
    return ("chain", "draw") + tuple(f"{name}_dim_{i}" for i in range(ndim - 2))


def _attr_value(value: Any) -> Any:
    """An attribute as a JSON value zarr can store (NumPy scalars and arrays unwrapped)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


class DrawWriter:
    """Writes chunks of kept draws into a new zarr store; :meth:`close` marks it finished.

    Args:
        path: the store directory; must not exist (or be an empty directory).
        chain_ids: chain indices of the run (the ``chain`` coordinate), length C.
        num_draws: kept draws per chain, D.
        chunk_draws: kept draws per chain in one :meth:`append` (the last may be shorter);
            also the zarr chunk length along ``draw``. ``None``: :func:`default_chunk_draws`.
        probe_coords: per-probe-item coordinates (each of length ``num_probe``).
        num_probe: probe items, P.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        chain_ids: Sequence[int],
        num_draws: int,
        chunk_draws: int | None,
        probe_coords: Mapping[str, np.ndarray],
        num_probe: int,
    ) -> None:
        zarr = _zarr()
        self.path = Path(path)
        self.chain_ids = [int(k) for k in chain_ids]
        self.num_draws = int(num_draws)
        if chunk_draws is None:
            chunk_draws = default_chunk_draws(len(self.chain_ids), num_probe)
        self.chunk_draws = min(int(chunk_draws), self.num_draws)
        self.num_probe = int(num_probe)
        self._written = [0] * len(self.chain_ids)
        self._probe = {
            "probe": np.arange(num_probe),
            **{k: ("probe", v) for k, v in probe_coords.items()},
        }
        self._root = zarr.open_group(
            self.path,
            mode="w-",
            zarr_format=3,
            attributes={
                "bayes_susc_store": STORE_FORMAT,
                COMPLETE_ATTR: False,
                "num_draws": self.num_draws,
                "chunk_draws": self.chunk_draws,
                "chain": self.chain_ids,
                "draws_written": self._written,
            },
        )
        base = {"chain": np.asarray(self.chain_ids), "draw": np.arange(self.num_draws)}
        # Coordinates go through xarray so that it reads them back exactly as it wrote them.
        self._to_zarr(xr.Dataset(coords={**base, **self._probe}), "posterior")
        self._to_zarr(xr.Dataset(coords=base), "sample_stats")
        self._arrays: dict[tuple[str, str], Any] = {}
        # Variable order as the sampler produced it (zarr lists arrays alphabetically).
        self._order: dict[str, list[str]] = {
            "posterior": [],
            "sample_stats": [],
            "constant_data": ["eval_loss_anchor", "probe_loss_anchor"],
        }

    def _to_zarr(self, ds: xr.Dataset, group: str) -> None:
        with warnings.catch_warnings():
            # Fixed-width unicode coordinates (token text) have no final zarr v3 spec yet;
            # zarr-python reads back what it wrote, which is all this store needs.
            warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification")
            ds.to_zarr(self.path, group=group, mode="a", consolidated=False, zarr_format=3)

    def _array(self, group: str, name: str, dims: tuple[str, ...], values: np.ndarray) -> Any:
        """The zarr array of (group, name), created full-size on first use (fill: NaN/False)."""
        key = (group, name)
        if key not in self._arrays:
            shape = (len(self.chain_ids), self.num_draws, *values.shape[2:])
            chunks = (1, self.chunk_draws) + tuple(
                min(n, STORE_PROBE_CHUNK) if d == "probe" else n
                for d, n in zip(dims[2:], values.shape[2:])
            )
            fill = False if values.dtype == bool else np.nan
            self._arrays[key] = self._root.require_group(group).create_array(
                name,
                shape=shape,
                chunks=tuple(max(1, c) for c in chunks),
                dtype=values.dtype,
                fill_value=fill,
                dimension_names=list(dims),
            )
        return self._arrays[key]

    def append(
        self,
        chains: slice,
        posterior: Mapping[str, np.ndarray],
        sample_stats: Mapping[str, np.ndarray],
    ) -> None:
        """Write the next draws of chains ``chains`` (positions in ``chain_ids``).

        Args:
            chains: contiguous chain positions these draws belong to (c of them).
            posterior: name → (c, k, ...) draws of each posterior variable.
            sample_stats: name → (c, k) step statistics at the same draws.
        """
        positions = range(len(self.chain_ids))[chains]
        start = {self._written[i] for i in positions}
        if len(start) != 1:
            raise RuntimeError(f"chains {list(positions)} have written different numbers of draws")
        d0 = start.pop()
        k = next(iter(posterior.values())).shape[1]
        if d0 + k > self.num_draws:
            raise RuntimeError(f"{d0 + k} draws written, more than num_draws={self.num_draws}")
        for group, values in (("posterior", posterior), ("sample_stats", sample_stats)):
            for name, value in values.items():
                dims = (
                    posterior_dims(name, value.ndim) if group == "posterior" else ("chain", "draw")
                )
                self._array(group, name, dims, value)[chains, d0 : d0 + k] = value
        for group, values in (("posterior", posterior), ("sample_stats", sample_stats)):
            for name in values:
                if name not in self._order[group]:
                    self._order[group].append(name)
        for i in positions:
            self._written[i] = d0 + k
        # Progress after the data: a reader never counts draws that are not on disk yet.
        self._root.attrs["draws_written"] = list(self._written)

    def close(
        self,
        eval_loss_anchor: np.ndarray,
        probe_loss_anchor: np.ndarray,
        attrs: Mapping[str, Any],
    ) -> Path:
        """Write ``constant_data`` and the run attrs, then mark the store finished (last).

        Args:
            eval_loss_anchor: L_E(w*), a scalar.
            probe_loss_anchor: ℓ_i(w*), (P,).
            attrs: the run attributes, set on every group as in memory.
        """
        if any(w != self.num_draws for w in self._written):
            raise RuntimeError(
                f"draws written per chain {self._written}, expected {self.num_draws} each"
            )
        const = xr.Dataset(
            {
                "eval_loss_anchor": ((), np.asarray(eval_loss_anchor)),
                "probe_loss_anchor": (("probe",), np.asarray(probe_loss_anchor)),
            },
            coords=self._probe,
            attrs={k: _attr_value(v) for k, v in attrs.items()},
        )
        self._to_zarr(const, "constant_data")
        for group in ("posterior", "sample_stats"):
            self._root[group].attrs.update({k: _attr_value(v) for k, v in attrs.items()})
        self._root.attrs["variables"] = self._order
        self._root.attrs[COMPLETE_ATTR] = True
        return self.path


def store_status(path: str | os.PathLike) -> dict[str, Any]:
    """The root attrs of a draw store: ``bayes_susc_complete``, ``draws_written``, ...

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: ``path`` is not a draw store written by :class:`DrawWriter`.
    """
    zarr = _zarr()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no draw store at {path}")
    try:
        root = zarr.open_group(path, mode="r")
    except Exception as err:
        raise ValueError(f"{path} is not a zarr draw store ({err})") from None
    attrs = dict(root.attrs)
    if attrs.get("bayes_susc_store") != STORE_FORMAT:
        raise ValueError(
            f"{path} is not a bayes_susc draw store (root attr bayes_susc_store is "
            f"{attrs.get('bayes_susc_store')!r}, expected {STORE_FORMAT!r})"
        )
    return attrs


def open_store(
    path: str | os.PathLike,
    backend: Backend | None = None,
    *,
    allow_incomplete: bool = False,
) -> Any:
    """A draw store as an ArviZ container whose variables are read only when indexed.

    Args:
        path: a store written by ``sample(..., store=path)``.
        backend: ``"inferencedata"`` (ArviZ < 1 only) or ``"datatree"``; default follows
            the installed ArviZ (see :func:`bayes_susc.storage.draws.check_backend`).
        allow_incomplete: open a store whose run did not finish: only the draws every
            chain has written are kept (a prefix), ``constant_data`` may be missing, and
            each group's attrs get ``bayes_susc_complete=False`` and ``draws_written``.

    Returns:
        The same layout as the in-memory result of :func:`bayes_susc.sample`, lazily
        backed by the store (nothing is cached: each read goes to disk; call
        ``.load()`` on a group to hold it in memory).

    Raises:
        IncompleteStoreError: the store has no completion marker and
            ``allow_incomplete`` is False.
    """
    backend = check_backend(backend)
    path = Path(path)
    status = store_status(path)
    complete = bool(status.get(COMPLETE_ATTR))
    if not complete and not allow_incomplete:
        raise IncompleteStoreError(
            f"{path} is an unfinished draw store (no completion marker): its run stopped "
            f"with {status.get('draws_written')} of {status.get('num_draws')} draws written "
            "per chain. Rerun the sampling, or pass allow_incomplete=True to read the draws "
            "written so far"
        )
    zarr = _zarr()
    present = [g for g in _GROUPS if g in zarr.open_group(path, mode="r")]
    groups = {}
    for name in present:
        ds = xr.open_dataset(
            path, engine="zarr", group=name, consolidated=False, chunks=None, cache=False
        )
        if not complete:
            done = min(status.get("draws_written") or [0])
            if "draw" in ds.dims:
                ds = ds.isel(draw=slice(0, done))
            ds.attrs.update({COMPLETE_ATTR: False, "draws_written": status.get("draws_written")})
        order = [v for v in (status.get("variables") or {}).get(name, []) if v in ds.data_vars]
        groups[name] = ds[order + [v for v in ds.data_vars if v not in order]]
    if not complete:
        warnings.warn(
            f"{path} is an unfinished draw store; using the first "
            f"{min(status.get('draws_written') or [0])} draws of every chain",
            UserWarning,
            stacklevel=2,
        )
    return make_inference_data(groups, backend)
