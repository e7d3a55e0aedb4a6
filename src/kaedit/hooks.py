"""The only place in kaedit that registers forward hooks.

Everything here is a context manager that removes its hooks in ``finally``, so an
exception inside the ``with`` block never leaves a hook behind (after ROME's
``nethook.TraceDict``). Module outputs may be a tensor or a tuple whose first element is
the hidden state (attention modules, older decoder layers); both are handled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

#: ``fn(hidden) -> hidden``: edits the hidden-state tensor a module outputs.
OutputEdit = Callable[[torch.Tensor], torch.Tensor]


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (see :func:`trace` ``stop``)."""


def get_module(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule`` with an error that names the model's modules."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        children = ", ".join(n for n, _ in list(model.named_children())[:10])
        raise KeyError(
            f"module path {name!r} does not exist in {type(model).__name__} "
            f"(top-level modules: {children}); check the model config's module templates"
        ) from None


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output, new: torch.Tensor):
    return (new, *output[1:]) if isinstance(output, tuple) else new


@dataclass
class Traced:
    """What :func:`trace` captured for one module."""

    input: torch.Tensor | None = None
    output: torch.Tensor | None = None


@dataclass
class TraceResult(Mapping[str, Traced]):
    captured: dict[str, Traced] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Traced:
        return self.captured[key]

    def __iter__(self):
        return iter(self.captured)

    def __len__(self) -> int:
        return len(self.captured)


@contextlib.contextmanager
def trace(
    model: nn.Module,
    names: Iterable[str],
    *,
    inputs: bool = False,
    outputs: bool = True,
    detach: bool = True,
    stop: bool = False,
) -> Iterator[TraceResult]:
    """Record the input and/or output hidden state of each named module.

    With ``stop=True`` the forward pass is aborted right after the *last* named module (in
    execution order) has run; call the model inside ``with contextlib.suppress(StopForward)``
    or use :func:`run_until`. Captured tensors are detached unless ``detach=False``.
    """
    names = list(dict.fromkeys(names))
    result = TraceResult({n: Traced() for n in names})
    pending = set(names)
    handles = []

    def make_hook(name: str):
        def hook(module, args, output):
            rec = result.captured[name]
            if inputs:
                x = args[0]
                rec.input = x.detach() if detach else x
            if outputs:
                h = _hidden(output)
                rec.output = h.detach() if detach else h
            pending.discard(name)
            if stop and not pending:
                raise StopForward

        return hook

    try:
        for n in names:
            handles.append(get_module(model, n).register_forward_hook(make_hook(n)))
        yield result
    finally:
        for h in handles:
            h.remove()


def run_until(
    model: nn.Module,
    names: Iterable[str],
    *,
    inputs: bool = False,
    outputs: bool = True,
    detach: bool = True,
    forward: Callable[[], object] | None = None,
    **model_inputs,
) -> TraceResult:
    """Run the forward pass only as far as the named modules and return what was traced
    there (as :func:`trace`: outputs by default, detached unless ``detach=False``).

    The pass stops after the last of ``names`` (in execution order) has run, so e.g.
    ``run_until(model, [final_norm], input_ids=ids)`` gives the final hidden states without
    running the LM head. ``forward`` replaces ``model(**model_inputs)`` when the model must
    be called otherwise (``torch.func.functional_call`` with substituted weights).
    """
    with (
        trace(model, names, inputs=inputs, outputs=outputs, detach=detach, stop=True) as tr,
        contextlib.suppress(StopForward),
    ):
        if forward is None:
            model(**model_inputs)
        else:
            forward()
    return tr


@contextlib.contextmanager
def edit_outputs(model: nn.Module, edits: Mapping[str, OutputEdit]) -> Iterator[None]:
    """Replace each named module's hidden-state output by ``fn(output)`` while active."""
    handles = []

    def make_hook(fn: OutputEdit):
        def hook(module, args, output):
            return _replace_hidden(output, fn(_hidden(output)))

        return hook

    try:
        for name, fn in edits.items():
            handles.append(get_module(model, name).register_forward_hook(make_hook(fn)))
        yield
    finally:
        for h in handles:
            h.remove()


def count_hooks(model: nn.Module) -> int:
    """Number of forward (pre-)hooks registered anywhere in ``model`` (tests use it)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@contextlib.contextmanager
def start_at(
    model: nn.Module, blocks: str, layer: int, zeroed: Iterable[str] = ()
) -> Iterator[None]:
    """While active, the model's forward runs only decoder blocks ``layer`` onwards: what it
    takes as ``inputs_embeds`` is the input of block ``layer`` (issue 30: target optimisation
    starts at the edit layer instead of re-running the blocks below it).

    ``blocks`` is the path of the blocks' ``nn.ModuleList`` (e.g. ``model.layers``); it is
    replaced by a list of the same module objects from ``layer`` on, so hooks on them stay
    and each attention module keeps its own ``layer_idx`` (a key/value cache passed in must
    hold entries for every block; those below ``layer`` are not read). ``zeroed`` names
    modules whose output is replaced by zeros, for position embeddings the forward adds to
    ``inputs_embeds`` (GPT-2's ``wpe``: already part of the cached input). The original
    list is put back in ``finally``. Resolve module paths inside ``blocks`` (hooks such as
    :func:`edit_outputs`) *before* entering: while active, ``blocks.{i}`` is block
    ``layer + i``.
    """
    parent_path, _, attr = blocks.rpartition(".")
    parent = get_module(model, parent_path) if parent_path else model
    original = getattr(parent, attr)
    if not isinstance(original, nn.ModuleList) or not 0 <= layer < len(original):
        raise ValueError(f"start_at: {blocks!r} is not a list of blocks with index {layer}")
    zero = dict.fromkeys(zeroed, torch.zeros_like)
    try:
        setattr(parent, attr, nn.ModuleList(list(original)[layer:]))
        with edit_outputs(model, zero):
            yield
    finally:
        setattr(parent, attr, original)
