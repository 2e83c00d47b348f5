"""Components: which weight entries of a model are free while all others stay frozen.

A :class:`Component` is a name plus, per parameter name, a *selection*:

- ``None`` (or ``True``): the whole parameter;
- a boolean mask of the parameter's shape;
- an index: an ``int``, a ``slice``, or a tuple of ints / slices / ``Ellipsis``
  (e.g. ``(3,)`` picks head 3 of a ``(n_heads, d_model, d_head)`` weight).

Resolved against a model it becomes a :class:`ResolvedComponent`, which maps the free
entries to one flat vector ``v`` of length ``dim`` (the sampler's coordinates) and back.
Frozen entries are never written: the full tensors are rebuilt from the anchor by
``scatter``, so they stay bit-identical.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

Selection = None | bool | torch.Tensor | int | slice | tuple


@dataclass(frozen=True)
class Component:
    """A named set of free weight entries.

    Args:
        name: label used in results (e.g. ``"L0H3"``).
        selections: parameter name (as in ``model.named_parameters()``) → selection.
    """

    name: str
    selections: Mapping[str, Selection] = field(default_factory=dict)

    @classmethod
    def from_parameters(cls, name: str, parameter_names: Iterable[str]) -> Component:
        """Component freeing whole parameters, by exact name."""
        return cls(name, {p: None for p in parameter_names})

    @classmethod
    def from_regex(cls, name: str, model: torch.nn.Module, pattern: str) -> Component:
        """Component freeing every whole parameter whose name matches ``pattern``."""
        regex = re.compile(pattern)
        names = [p for p, _ in model.named_parameters() if regex.search(p)]
        if not names:
            raise ValueError(f"pattern {pattern!r} matches no parameter of the model")
        return cls.from_parameters(name, names)

    def resolve(self, model: torch.nn.Module) -> ResolvedComponent:
        """Check the selections against ``model`` and lay out the free entries."""
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"component name must be a non-empty string, got {self.name!r}")
        if not self.selections:
            raise ValueError(f"component {self.name!r} is empty: it selects no parameter")
        params = dict(model.named_parameters())
        names, indices, descriptions = [], [], {}
        for pname, selection in self.selections.items():
            if pname not in params:
                close = [p for p in params if pname.split(".")[-1] in p][:5]
                raise ValueError(
                    f"component {self.name!r} names unknown parameter {pname!r}; "
                    f"parameters with a similar name: {close or list(params)[:5]}"
                )
            flat = _flat_indices(self.name, pname, params[pname], selection)
            if flat.numel() == 0:
                raise ValueError(
                    f"component {self.name!r}: selection {_describe(selection, 0)} "
                    f"of {pname!r} is empty"
                )
            names.append(pname)
            indices.append(flat)
            descriptions[pname] = _describe(selection, flat.numel())
        return ResolvedComponent(self.name, names, indices, descriptions, params)


def _describe(selection: Selection, count: int) -> str:
    if selection is None or selection is True:
        return f"all ({count})"
    if isinstance(selection, torch.Tensor):
        return f"mask ({count})"
    parts = selection if isinstance(selection, tuple) else (selection,)

    def one(s: Any) -> str:
        if s is Ellipsis:
            return "..."
        if isinstance(s, slice):
            start = "" if s.start is None else s.start
            stop = "" if s.stop is None else s.stop
            step = "" if s.step in (None, 1) else f":{s.step}"
            return f"{start}:{stop}{step}"
        return str(s)

    return "[" + ", ".join(one(s) for s in parts) + f"] ({count})"


def _flat_indices(comp: str, pname: str, param: torch.Tensor, selection: Selection) -> torch.Tensor:
    """Positions (in the flattened parameter) of the selected entries, ascending."""
    numel = param.numel()
    where = f"component {comp!r}, parameter {pname!r} of shape {tuple(param.shape)}"
    if selection is None or selection is True:
        return torch.arange(numel, device=param.device)
    if selection is False:
        raise ValueError(f"{where}: selection False selects nothing")
    if isinstance(selection, torch.Tensor):
        if selection.dtype != torch.bool:
            raise TypeError(
                f"{where}: a tensor selection must be a bool mask, got {selection.dtype}"
            )
        if tuple(selection.shape) != tuple(param.shape):
            raise ValueError(
                f"{where}: mask shape {tuple(selection.shape)} does not match the parameter"
            )
        return selection.to(param.device).reshape(-1).nonzero().reshape(-1)
    parts = selection if isinstance(selection, tuple) else (selection,)
    explicit = [s for s in parts if s is not Ellipsis]
    if sum(s is Ellipsis for s in parts) > 1 or len(explicit) > param.dim():
        raise ValueError(f"{where}: index {selection!r} has too many entries")
    # Expand the ellipsis so every index entry lines up with a dimension.
    full: list[Any] = []
    for s in parts:
        if s is Ellipsis:
            full.extend([slice(None)] * (param.dim() - len(explicit)))
        else:
            full.append(s)
    full.extend([slice(None)] * (param.dim() - len(full)))
    for dim, (s, size) in enumerate(zip(full, param.shape)):
        if isinstance(s, bool) or not isinstance(s, (numbers.Integral, slice)):
            raise TypeError(f"{where}: index entries must be int, slice or ..., got {s!r}")
        if isinstance(s, numbers.Integral):
            s = full[dim] = int(s)
        if isinstance(s, int) and not -size <= s < size:
            raise ValueError(f"{where}: index {s} out of range for dim {dim} of size {size}")
        if isinstance(s, slice):
            if s.step is not None and s.step <= 0:
                raise ValueError(f"{where}: slice step must be positive, got {s.step}")
            for end in (s.start, s.stop):
                if end is not None and not -size <= end <= size:
                    raise ValueError(
                        f"{where}: slice {s.start}:{s.stop} out of range for dim {dim} "
                        f"of size {size}"
                    )
    grid = torch.arange(numel, device=param.device).reshape(param.shape)
    return grid[tuple(full)].reshape(-1).sort().values


class ResolvedComponent:
    """A component laid out against a concrete model.

    The free entries form one flat vector of length :attr:`dim`, parameters in the
    order given, entries in row-major order within each parameter.
    """

    def __init__(
        self,
        name: str,
        param_names: list[str],
        flat_indices: list[torch.Tensor],
        descriptions: dict[str, str],
        params: Mapping[str, torch.Tensor],
    ) -> None:
        self.name = name
        self.param_names = param_names
        self.flat_indices = flat_indices
        self.descriptions = descriptions
        self.shapes = [tuple(params[p].shape) for p in param_names]
        # Whole parameters are rebuilt by a reshape, others by a scatter into the anchor.
        self.is_whole = [
            idx.numel() == params[p].numel() for p, idx in zip(param_names, flat_indices)
        ]
        sizes = [int(idx.numel()) for idx in flat_indices]
        self.offsets = [0]
        for s in sizes:
            self.offsets.append(self.offsets[-1] + s)
        self.dim = self.offsets[-1]

    def gather(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The free entries of ``params`` as a flat vector, shape ``(dim,)``."""
        return torch.cat(
            [
                params[p].detach().reshape(-1)[idx]
                for p, idx in zip(self.param_names, self.flat_indices)
            ]
        )

    def scatter(
        self, v: torch.Tensor, anchors: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Full parameter tensors with the free entries taken from ``v`` (shape ``(dim,)``).

        Frozen entries are copied from ``anchors``; works under ``torch.func.vmap``.
        """
        out = {}
        for k, pname in enumerate(self.param_names):
            part = v[self.offsets[k] : self.offsets[k + 1]]
            if self.is_whole[k]:
                out[pname] = part.reshape(self.shapes[k])
            else:
                flat = anchors[pname].reshape(-1).scatter(0, self.flat_indices[k], part)
                out[pname] = flat.reshape(self.shapes[k])
        return out

    def describe(self) -> dict[str, str]:
        """Human-readable selection per parameter, e.g. ``{"W_Q": "[3] (2048)"}``."""
        return dict(self.descriptions)

    def __repr__(self) -> str:
        return f"ResolvedComponent({self.name!r}, dim={self.dim}, {self.descriptions})"
