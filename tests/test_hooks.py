"""Hooks capture and edit the right tensors, stop early, and never outlive their block."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from kaedit.hooks import StopForward, count_hooks, edit_outputs, get_module, trace
from kaedit.models import LoadedModel, ModelLoadError

D_FF = 64  # intermediate size of every conf/model/tiny_*.yaml


def batch(lm: LoadedModel) -> torch.Tensor:
    """Two prompts of equal token length: ``[2, seq]``."""
    ids = [
        lm.tokenizer(t)["input_ids"] for t in ("The Eiffel Tower is in", "Paris is the capital!!")
    ]
    assert len(ids[0]) == len(ids[1])
    return torch.tensor(ids)


def test_config_module_templates_resolve(lm: LoadedModel) -> None:
    # Every template of the model config names a real module, at every layer.
    lm.spec.check(lm.model, list(range(lm.spec.n_layers)))
    assert lm.spec.n_layers == 4


def test_trace_captures_mlp_out_io(lm: LoadedModel) -> None:
    ids = batch(lm)
    name = lm.spec.module("mlp_out", 1)
    with trace(lm.model, [name], inputs=True, outputs=True) as tr:
        lm.model(ids)
    rec = tr[name]
    d_model = lm.model.config.hidden_size
    assert rec.input.shape == (2, ids.shape[1], D_FF)
    assert rec.output.shape == (2, ids.shape[1], d_model)
    # They really are this projection's input and output.
    proj = get_module(lm.model, name)
    torch.testing.assert_close(rec.output, F.linear(rec.input, proj.weight, proj.bias))
    assert not rec.output.requires_grad
    assert count_hooks(lm.model) == 0


def test_trace_of_decoder_layer_returns_hidden_state(lm: LoadedModel) -> None:
    ids = batch(lm)
    last = lm.spec.module("layer", lm.spec.n_layers - 1)
    with trace(lm.model, [last, lm.spec.module("ln_f")]) as tr:
        out = lm.model(ids, output_hidden_states=True)
    # The last decoder block's output, before the final norm, and the norm of it.
    assert tr[last].output.shape == (2, ids.shape[1], lm.model.config.hidden_size)
    ln_f = get_module(lm.model, lm.spec.module("ln_f"))
    torch.testing.assert_close(tr[lm.spec.module("ln_f")].output, ln_f(tr[last].output))
    torch.testing.assert_close(out.hidden_states[-1], tr[lm.spec.module("ln_f")].output)


def test_stop_ends_forward_after_last_traced_module(lm: LoadedModel) -> None:
    ids = batch(lm)
    early = [lm.spec.module("mlp_out", 0), lm.spec.module("mlp_out", 2)]
    later = lm.spec.module("mlp_out", 3)
    with (
        trace(lm.model, [later]) as watch,
        trace(lm.model, early, stop=True) as tr,
        pytest.raises(StopForward),
    ):
        lm.model(ids)
    assert all(tr[n].output is not None for n in early)  # waits for the last of them
    assert watch[later].output is None  # never ran
    assert count_hooks(lm.model) == 0


def test_edit_outputs_changes_output_only_inside_block(lm: LoadedModel) -> None:
    ids = batch(lm)
    with torch.no_grad():
        before = lm.model(ids).logits
        # Not a constant: a LayerNorm downstream would cancel a uniform shift.
        ramp = torch.linspace(0.0, 1.0, lm.model.config.hidden_size)
        with edit_outputs(lm.model, {lm.spec.module("layer", 1): lambda h: h + ramp}):
            edited = lm.model(ids).logits
        after = lm.model(ids).logits
    assert (edited - before).abs().max() > 1e-3
    assert torch.equal(after, before)
    assert count_hooks(lm.model) == 0


def test_edit_outputs_sees_and_replaces_hidden(lm: LoadedModel) -> None:
    ids = batch(lm)
    name = lm.spec.module("mlp_out", 2)
    with edit_outputs(lm.model, {name: torch.zeros_like}), trace(lm.model, [name]) as tr:
        lm.model(ids)
    # The trace hook was registered after the edit, so it sees the replaced output.
    assert torch.equal(tr[name].output, torch.zeros_like(tr[name].output))


@pytest.mark.parametrize("kind", ["trace", "edit"])
def test_no_hooks_left_after_exception(lm: LoadedModel, kind: str) -> None:
    names = [lm.spec.module("mlp_out", 1), lm.spec.module("layer", 2)]
    ctx = (
        trace(lm.model, names, inputs=True)
        if kind == "trace"
        else edit_outputs(lm.model, {n: lambda h: h for n in names})
    )
    with pytest.raises(RuntimeError, match="boom"), ctx:
        assert count_hooks(lm.model) == 2
        raise RuntimeError("boom")
    assert count_hooks(lm.model) == 0


def test_no_hooks_left_when_exception_is_raised_inside_forward(lm: LoadedModel) -> None:
    def explode(h: torch.Tensor) -> torch.Tensor:
        raise ValueError("inside the hook")

    with (
        pytest.raises(ValueError, match="inside the hook"),
        trace(lm.model, [lm.spec.module("mlp_out", 0)]),
        edit_outputs(lm.model, {lm.spec.module("layer", 1): explode}),
    ):
        lm.model(batch(lm))
    assert count_hooks(lm.model) == 0


def test_bad_path_raises_key_error_and_leaves_no_hook(lm: LoadedModel) -> None:
    bad = "model.layers.99.nothing"
    with pytest.raises(KeyError, match=r"model\.layers\.99\.nothing"):
        get_module(lm.model, bad)
    # A bad name after a good one: the good one's hook must be removed too.
    with (
        pytest.raises(KeyError, match="nothing"),
        trace(lm.model, [lm.spec.module("mlp_out", 0), bad]),
    ):
        pass
    edits = {lm.spec.module("layer", 0): lambda h: h, bad: lambda h: h}
    with pytest.raises(KeyError, match="nothing"), edit_outputs(lm.model, edits):
        pass
    assert count_hooks(lm.model) == 0


@pytest.mark.parametrize("layer", [4, 10, -1])
def test_check_rejects_out_of_range_layer(lm: LoadedModel, layer: int) -> None:
    with pytest.raises(ModelLoadError, match=f"edit layer {layer} is out of range.*4 layers"):
        lm.spec.check(lm.model, [1, layer])


def test_check_rejects_bad_template(lm: LoadedModel) -> None:
    bad = dataclasses.replace(lm.spec, mlp_out=lm.spec.mlp_out + ".nonexistent")
    with pytest.raises(ModelLoadError, match=r"\.nonexistent.*model\.modules\.mlp_out"):
        bad.check(lm.model, [1])
    bad = dataclasses.replace(lm.spec, ln_f="final_norm_typo")
    with pytest.raises(ModelLoadError, match="final_norm_typo"):
        bad.check(lm.model, [1])


def test_trace_inside_suppress_returns_partial_forward(lm: LoadedModel) -> None:
    name = lm.spec.module("mlp_out", 1)
    with (
        trace(lm.model, [name], inputs=True, outputs=False, stop=True) as tr,
        contextlib.suppress(StopForward),
    ):
        out = lm.model(batch(lm))
        pytest.fail(f"forward pass was not stopped: {type(out)}")
    assert tr[name].input is not None and tr[name].output is None


def test_run_until_stops_after_the_named_module(lm: LoadedModel) -> None:
    from kaedit.hooks import run_until

    ids = batch(lm)
    ln_f, later = lm.spec.module("ln_f"), lm.spec.lm_head
    with trace(lm.model, [later]) as watch:
        tr = run_until(lm.model, [ln_f], detach=False, input_ids=ids)
    assert watch[later].output is None  # the LM head never ran
    assert count_hooks(lm.model) == 0
    with torch.no_grad():
        full = lm.model(ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(tr[ln_f].output.detach(), full)  # same code path, same values


def test_run_until_calls_a_given_forward(lm: LoadedModel) -> None:
    from torch.func import functional_call

    from kaedit.hooks import run_until

    ids = batch(lm)
    name = lm.spec.weight("mlp_out", 1)
    module = lm.spec.module("mlp_out", 1)
    zero = {name: torch.zeros_like(lm.model.get_parameter(name), requires_grad=True)}
    tr = run_until(lm.model, [module], detach=False,
                   forward=lambda: functional_call(lm.model, zero, (), {"input_ids": ids}))
    assert torch.count_nonzero(tr[module].output) == 0  # the substituted weight was used
    assert tr[module].output.requires_grad  # detach=False keeps the graph to the weight
    assert count_hooks(lm.model) == 0
