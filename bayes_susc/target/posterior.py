"""The tempered local posterior of one component.

With the weights split as w = (u, v), v the component's free entries and u frozen at
u*, the target is

    p(v) ∝ exp( −nβ · L(u*, v) − (γ/2) ‖v − v*‖² )

where L is the *mean* per-item loss. The potential is U(v) = nβ·L + (γ/2)‖v − v*‖²;
on a minibatch B, L is replaced by the minibatch mean L̂_B.

Everything here is vectorized over chains: positions have shape ``(chains, dim)`` and
the model is called through :func:`torch.func.functional_call` under
:func:`torch.func.vmap`, so no copy of the model is made per chain.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch.func import functional_call, vmap

from bayes_susc.kernels.base import GradientResult
from bayes_susc.target.components import Component, ResolvedComponent
from bayes_susc.target.splits import ForwardSplit, find_split
from bayes_susc.validation import check_nonnegative, check_positive

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]
Batch = Any


class BoundFunction(torch.nn.Module):
    """Routes a call through ``fn(model, *args)`` so functional_call can swap weights."""

    def __init__(self, model: torch.nn.Module, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *args: Any) -> torch.Tensor:
        return self.fn(self.model, *args)


def tied_names(model: torch.nn.Module, names: Iterable[str]) -> dict[str, list[str]]:
    """For each of ``names`` (as in ``model.named_parameters()``), the other names under
    which ``model`` holds the same parameter in a *different* slot (module, attribute):
    tied weights, such as GPT-2's token embedding and LM head.

    Call ``functional_call(..., tie_weights=False)`` with a replacement under every one of
    these names. torch's ``tie_weights=True`` finds tied names itself, but it also counts
    names that reach one slot through two module paths (a TransformerLens
    ``TransformerBridge`` registers each wrapped module under its own path and under the
    Hugging Face one): it then swaps that slot twice and, restoring in the same order,
    leaves the replacement in the model. One name per slot avoids that.
    """
    wanted = list(names)
    by_tensor: dict[int, list[str]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(name)
        tensors.setdefault(name, p)

    def slot(name: str) -> tuple[int, str]:
        prefix, _, attr = name.rpartition(".")
        return id(model.get_submodule(prefix) if prefix else model), attr

    out: dict[str, list[str]] = {}
    for name in wanted:
        seen = {slot(name)}
        extra = []
        for other in by_tensor.get(id(tensors[name]), []) if name in tensors else []:
            if other != name and slot(other) not in seen:
                seen.add(slot(other))
                extra.append(other)
        out[name] = extra
    return out


class _SplitMismatch(RuntimeError):
    """The loss function used the model in a way the split cannot reproduce."""


def _same_input(a: Any, b: Any) -> bool:
    """Whether two model call arguments hold the same values (cheap checks first)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a is b:
            return True
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
            return True
        return bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_input(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same_input(a[k], b[k]) for k in a)
    return a == b


class _Captured(Exception):
    """Raised by :class:`_Capture` once the model call is recorded: the rest of
    ``loss_fn`` is not needed, so it is not run."""


class _Capture(torch.nn.Module):
    """Stands in for the model in one ``loss_fn`` call at w*: records the call's
    arguments and the split's prefix for them, then stops ``loss_fn`` (:class:`_Captured`)."""

    def __init__(self, model: torch.nn.Module, split: ForwardSplit) -> None:
        super().__init__()
        self.model = model
        self.split = split
        self.calls: list[tuple[tuple, dict, Any]] = []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs, self.split.prefix(*args, **kwargs)))
        raise _Captured


class _Replay(torch.nn.Module):
    """Stands in for the model inside ``loss_fn`` (under ``vmap``): returns one
    replica's precomputed output, after checking the call is the batch's recorded one."""

    def __init__(self) -> None:
        super().__init__()
        self.call: tuple[tuple, dict] | None = None
        self.output: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.call is None or not _same_input((args, kwargs), self.call):
            raise _SplitMismatch("loss_fn called the model with inputs not of its batch")
        return self.output


def _nbytes(obj: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensors(v)]
    return []


def batch_size_of(batch: Batch) -> int | None:
    """Leading size of a batch (a tensor, or a tuple/list/dict whose first tensor leads)."""
    tensors = _tensors(batch)
    if not tensors or tensors[0].dim() == 0:
        return None
    return int(tensors[0].shape[0])


def as_batch_list(name: str, data: Any, *, allow_empty: bool = False) -> list[Batch]:
    """Normalise a data argument to a list of batches.

    A bare tensor, tuple of tensors or dict is taken as one batch; any other iterable is
    taken as a sequence of batches.
    """
    if data is None:
        raise ValueError(f"{name} must be given (a batch or a list of batches), got None")
    if isinstance(data, (str, bytes)):
        raise TypeError(f"{name} must be a batch or an iterable of batches, got a string")
    if isinstance(data, (torch.Tensor, Mapping)) or (
        isinstance(data, tuple) and data and all(isinstance(t, torch.Tensor) for t in data)
    ):
        batches = [data]
    elif isinstance(data, Iterable):
        batches = list(data)
    else:
        raise TypeError(
            f"{name} must be a batch or an iterable of batches, got {type(data).__name__}"
        )
    if not batches and not allow_empty:
        raise ValueError(f"{name} is empty: it must hold at least one batch")
    return batches


def resolve_free(
    model: torch.nn.Module, component: Component | Sequence[str] | ResolvedComponent
) -> ResolvedComponent:
    """``component`` resolved against ``model``, its free parameters checked: one floating
    point dtype and one device (what :class:`LocalPosterior` needs to sample them).

    ``component``: a :class:`Component`, a list of parameter names, or one already
    resolved. Raises TypeError or ValueError (unknown parameter, empty selection, mixed
    or integer dtypes, mixed devices) naming the component.
    """
    if isinstance(component, ResolvedComponent):
        resolved = component
    else:
        if not isinstance(component, Component):
            if isinstance(component, str) or not isinstance(component, Iterable):
                raise TypeError(
                    f"component must be a Component or a list of parameter names, got {component!r}"
                )
            component = Component.from_parameters("component", list(component))
        resolved = component.resolve(model)
    params = dict(model.named_parameters())
    free = [params[p] for p in resolved.param_names]
    dtypes = {p.dtype for p in free}
    devices = {p.device for p in free}
    if len(dtypes) > 1 or len(devices) > 1:
        raise TypeError(
            f"component {resolved.name!r} mixes dtypes {sorted(map(str, dtypes))} "
            f"or devices {sorted(map(str, devices))}; cast the model to one dtype/device"
        )
    if not free[0].dtype.is_floating_point:
        raise TypeError(f"free parameters must be floating point, got {free[0].dtype}")
    return resolved


class LocalPosterior:
    """Tempered posterior of one component, localized at the trained weights.

    Args:
        model: the trained network; its current parameters are the anchor w*. It is put
            in eval mode (sampling must not see dropout noise).
        loss_fn: ``loss_fn(model, batch) -> Tensor`` of *unreduced* per-item losses
            (shape ``(batch, ...)``; every element is an item, e.g. a token).
        train_data: the training batches, a re-iterable (list, DataLoader) or one batch.
            The sampler cycles through them in order; all chains share each minibatch.
        component: a :class:`Component`, a list of parameter names, or a resolved one.
        nbeta: nβ, multiplies the mean loss (> 0). Literature default 30.
        gamma: γ, localization strength (>= 0). Literature default 300.
        split: how the frozen part of the forward pass is shared across replicas:
            ``"auto"`` (default) uses the registered :class:`~bayes_susc.target.splits.ForwardSplit`
            for this model and component when there is one (a single attention head of
            the package's attention-only model or of a TransformerLens model), ``None``
            always runs the whole forward pass per replica, or a ``ForwardSplit``
            instance. A split is used only if it reproduces the plain per-item losses at
            w* on the first training batch (else a warning, and the plain path). With a
            split, ``loss_fn`` runs on each replica's output under ``vmap``, or once on
            all of them when it has the attribute ``broadcasts_replicas = True``: its
            promise that, given model outputs with a leading replica dimension, it
            returns losses with that leading dimension (the package's
            ``next_token_loss`` and ``causal_lm_loss`` do; it saves vmap's overhead).
        prefix_cache_bytes: memory bound (bytes) of the cached prefixes, one per batch
            (training, evaluation and probe batches), least recently used dropped first.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: LossFn,
        train_data: Any,
        component: Component | Sequence[str] | ResolvedComponent,
        *,
        nbeta: float = 30.0,
        gamma: float = 300.0,
        split: ForwardSplit | Literal["auto"] | None = "auto",
        prefix_cache_bytes: int = 2**30,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {loss_fn!r}")
        self.nbeta = check_positive("nbeta", nbeta)
        self.gamma = check_nonnegative("gamma", gamma)
        if isinstance(train_data, Iterable) and iter(train_data) is train_data:
            raise TypeError(
                "train_data must be re-iterable (a list or DataLoader), not a one-shot "
                "iterator or generator: the sampler cycles through it"
            )
        self.train_batches = as_batch_list("train_data", train_data)
        self.component = resolve_free(model, component)
        self.model = model.eval()
        self.loss_fn = loss_fn
        params = dict(model.named_parameters())
        first = params[self.component.param_names[0]]
        self.dtype, self.device = first.dtype, first.device
        self.anchors = {p: params[p].detach().clone() for p in self.component.param_names}
        self.anchor_vector = self.component.gather(self.anchors)
        self._bound_loss = BoundFunction(model, loss_fn)
        self._tied = tied_names(model, self.component.param_names)
        plain = self.check_batch("train_data", self.train_batches[0])
        self._item_counts: dict[int, int] = {}  # id(batch) -> items, counted lazily
        self._vmapped_losses = vmap(self.item_losses, in_dims=(0, None))
        if not (isinstance(prefix_cache_bytes, int) and prefix_cache_bytes >= 0):
            raise ValueError(f"prefix_cache_bytes must be an int >= 0, got {prefix_cache_bytes!r}")
        self.prefix_cache_bytes = prefix_cache_bytes
        self._prefix_cache: OrderedDict[int, tuple[Batch, Any, int]] = OrderedDict()
        self.split: ForwardSplit | None = None
        self._use_split(split, plain)

    # ------------------------------------------------------------- shared prefix
    def _use_split(self, split: ForwardSplit | str | None, plain: torch.Tensor) -> None:
        """Adopt ``split`` if it reproduces ``plain`` (the first training batch's per-item
        losses at w*) within float tolerance; else warn and keep the plain path."""
        if split == "auto":
            split = find_split(self.model, self.component)
        if split is None:
            return
        if not isinstance(split, ForwardSplit):
            raise TypeError(f"split must be 'auto', None or a ForwardSplit, got {split!r}")
        self.split = split
        self._replay = _Replay()
        self._vmapped_replay = vmap(self._replay_losses, in_dims=(0, None))
        self._vmapped_params = vmap(self.params_from)
        try:
            with torch.no_grad():
                got = self.item_losses(self.anchor_vector, self.train_batches[0])
            scale = float(plain.abs().max()) + 1.0
            tol = 100 * torch.finfo(plain.dtype).eps * scale * max(1.0, plain.numel() ** 0.5)
            error = float((got - plain).abs().max()) if got.shape == plain.shape else math.inf
            if not error <= tol:
                raise _SplitMismatch(f"losses differ by {error:.3g} (tolerance {tol:.3g})")
        except Exception as exc:  # any failure means: run the plain forward instead
            warnings.warn(
                f"split {split.name!r} does not reproduce loss_fn for component "
                f"{self.component.name!r} ({exc}); running the whole forward pass per replica",
                stacklevel=3,
            )
            self.split = None
            self._prefix_cache.clear()

    def _prepare(self, batch: Batch) -> Any:
        """``batch``'s prefix (computed at w* on first use, then cached); records the
        model call that ``loss_fn`` makes for it."""
        key = id(batch)
        hit = self._prefix_cache.get(key)
        if hit is not None and hit[0] is batch:
            self._prefix_cache.move_to_end(key)
            call, cached = hit[1]
        else:
            capture = _Capture(self.model, self.split)
            try:
                with torch.no_grad():
                    self.loss_fn(capture, batch)
            except _Captured:
                pass
            if not capture.calls:
                raise _SplitMismatch("loss_fn did not call the model")
            args, kwargs, cached = capture.calls[0]
            call = (args, kwargs)
            size = _nbytes(cached)
            self._prefix_cache[key] = (batch, (call, cached), size)
            total = sum(entry[2] for entry in self._prefix_cache.values())
            while total > self.prefix_cache_bytes and len(self._prefix_cache) > 1:
                _, (_, _, dropped) = self._prefix_cache.popitem(last=False)
                total -= dropped
        self._replay.call = call
        return cached

    def _replay_losses(self, output: Any, batch: Batch) -> torch.Tensor:
        self._replay.output = output
        return self.loss_fn(self._replay, batch).reshape(-1)

    def _split_losses(self, positions: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Per-item losses ``(chains, items)`` through the split: the prefix is shared,
        the suffix runs all replicas as one batch, ``loss_fn`` runs per replica."""
        cached = self._prepare(batch)
        outputs = self.split.suffix(self._vmapped_params(positions), cached)
        try:
            if getattr(self.loss_fn, "broadcasts_replicas", False):
                self._replay.output = outputs
                return self.loss_fn(self._replay, batch).reshape(positions.shape[0], -1)
            return self._vmapped_replay(outputs, batch)
        finally:
            self._replay.output = None  # drop the transform's wrapper of the outputs

    def _vlosses(self, positions: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Per-item losses at every position, ``(chains, items)``."""
        if self.split is not None:
            return self._split_losses(positions, batch)
        return self._vmapped_losses(positions, batch)

    # ----------------------------------------------------------------- single chain
    @property
    def dim(self) -> int:
        """Number of free entries (length of v)."""
        return self.component.dim

    def params_from(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Full component parameters with free entries from ``v`` (shape ``(dim,)``)."""
        return self.component.scatter(v, self.anchors)

    def item_losses(self, v: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Per-item losses at position ``v`` (``(dim,)``), flattened to ``(items,)``."""
        if self.split is not None:
            return self._split_losses(v.unsqueeze(0), batch)[0]
        params = self.functional_params(v)
        return functional_call(
            self._bound_loss, params, (batch,), strict=False, tie_weights=False
        ).reshape(-1)

    def functional_params(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """The component's parameters at ``v`` for ``torch.func.functional_call`` on a
        :class:`BoundFunction` of the model with ``tie_weights=False``: each under
        ``"model." + name`` and under the names of its tied copies (:func:`tied_names`)."""
        params = {}
        for k, t in self.params_from(v).items():
            params["model." + k] = t
            for alias in self._tied.get(k, ()):
                params["model." + alias] = t
        return params

    def _prior(self, positions: torch.Tensor) -> torch.Tensor:
        delta = positions - self.anchor_vector
        return 0.5 * self.gamma * (delta * delta).sum(-1)

    # ------------------------------------------------------------------ vectorized
    def potential_and_grad(self, positions: torch.Tensor, batch: Batch) -> GradientResult:
        """U, ∇U and the minibatch loss at ``positions`` (``(chains, dim)``) on ``batch``.

        One vmapped forward over all chains and one backward: chains are independent,
        so the gradient of the summed potential is each chain's own gradient.
        """
        with torch.enable_grad():
            positions = positions.detach().requires_grad_(True)
            loss = self._vlosses(positions, batch).mean(-1)
            potential = self.nbeta * loss + self._prior(positions)
            (grad,) = torch.autograd.grad(potential.sum(), positions)
        return GradientResult(potential.detach(), grad, loss.detach())

    def full_potential_and_grad(self, positions: torch.Tensor) -> GradientResult:
        """As :meth:`potential_and_grad` on the whole training set (item-weighted means)."""
        total_items = 0
        loss_sum = torch.zeros(positions.shape[0], dtype=self.dtype, device=self.device)
        grad_sum = torch.zeros_like(positions)
        prior_grad = self.gamma * (positions - self.anchor_vector)
        prior = self._prior(positions)
        for batch in self.train_batches:
            res = self.potential_and_grad(positions, batch)
            items = self._items_in(batch)
            # U_B = nβ·L_B + prior, so nβ·L_B and its gradient are recovered exactly.
            loss_sum += items * res.loss
            grad_sum += items * (res.grad - prior_grad)
            total_items += items
        loss = loss_sum / total_items
        grad = grad_sum / total_items + prior_grad
        return GradientResult(self.nbeta * loss + prior, grad, loss)

    def batch_item_losses(self, positions: torch.Tensor, batches: Sequence[Batch]) -> torch.Tensor:
        """Per-item losses of every item of ``batches``, shape ``(chains, items)``."""
        with torch.no_grad():
            return torch.cat([self._vlosses(positions, b) for b in batches], dim=-1)

    def _items_in(self, batch: Batch) -> int:
        key = id(batch)
        if key not in self._item_counts:
            with torch.no_grad():
                self._item_counts[key] = int(self.item_losses(self.anchor_vector, batch).numel())
        return self._item_counts[key]

    # ------------------------------------------------------------------- for Pyro
    @property
    def initial_params(self) -> dict[str, torch.Tensor]:
        """Start point ``{"v": v*}`` for ``pyro.infer.MCMC(..., initial_params=...)``."""
        return {"v": self.anchor_vector.clone()}

    def potential_fn(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Full-batch potential U(v) for Pyro's HMC/NUTS (differentiable by autograd).

        ``params["v"]`` has shape ``(dim,)``; returns a 0-d tensor.
        """
        v = params["v"]
        total, items_seen = 0.0, 0
        for batch in self.train_batches:
            losses = self.item_losses(v, batch)
            total = total + losses.sum()
            items_seen += losses.numel()
        return self.nbeta * total / items_seen + self._prior(v)

    # ----------------------------------------------------------------- validation
    def check_batch(self, name: str, batch: Batch) -> torch.Tensor:
        """Run ``loss_fn`` once at w* on ``batch``, check its output, return it flattened.

        The returned per-item losses at w* (shape ``(items,)``) are the anchor values of
        the observables, so validation costs no extra forward pass.
        """
        for t in _tensors(batch):
            if t.device != self.device:
                raise ValueError(
                    f"{name}: batch tensor on {t.device} but the model is on {self.device}"
                )
            if t.is_floating_point() and t.dtype != self.dtype:
                raise TypeError(
                    f"{name}: batch tensor has dtype {t.dtype} but the model uses {self.dtype}"
                )
        with torch.no_grad():
            out = self.loss_fn(self.model, batch)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"loss_fn must return a Tensor, got {type(out).__name__}")
        if out.dim() == 0:
            raise ValueError(
                "loss_fn returned a scalar; it must return unreduced per-item losses "
                "(use reduction='none')"
            )
        size = batch_size_of(batch)
        if size is not None and out.shape[0] != size:
            raise ValueError(
                f"loss_fn returned shape {tuple(out.shape)} for a {name} batch of size {size}; "
                "its leading dimension must be the batch dimension (per-item losses)"
            )
        if not out.is_floating_point():
            raise TypeError(f"loss_fn must return floating point losses, got {out.dtype}")
        if out.numel() == 0:
            raise ValueError(f"loss_fn returned no items for a {name} batch")
        if not torch.isfinite(out).all():
            raise ValueError(f"loss_fn returned non-finite losses at w* on a {name} batch")
        return out.reshape(-1)

    def describe(self) -> dict[str, Any]:
        """Hyperparameters and component spec, JSON-serialisable."""
        return {
            "nbeta": self.nbeta,
            "gamma": self.gamma,
            "component": self.component.name,
            "component_spec": self.component.describe(),
            "dim": self.dim,
            "split": self.split.name if self.split is not None else None,
        }
