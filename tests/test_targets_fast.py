"""Target optimisation's fast path (issue 15) against the full recomputation, chunking by
memory budget, and the reference's KL position and early stopping (issue 14, items 4-5),
on the three tiny architectures (Llama, GPT-J, GPT-NeoX)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from conftest import FORWARD_REL, Compose, assert_close_to_scale
from kaedit.errors import ConfigError
from kaedit.hooks import count_hooks, edit_outputs
from kaedit.methods.base import EditContext
from kaedit.methods.keys import (
    BlockStart,
    compute_keys,
    first_block,
    hidden_at_subject,
    key_encodings,
    plain_encodings,
)
from kaedit.methods.solve import spread_residual
from kaedit.methods.targets import (
    TargetConfig,
    _chunk_cost,
    _Prefix,
    _request_rows,
    length_groups,
    optimize_targets,
    request_chunks,
)
from kaedit.models import LoadedModel
from kaedit.records import EditRequest
from kaedit.stats import CovarianceStore
from kaedit.tokens import TeacherForced, block_inputs, encode, final_hidden, pad
from kaedit.weights import applied

# Subjects at the start, in the middle and at the end of prompts of different lengths;
# "X" at the start of "{} is a" leaves that KL row an empty prefix.
REQUESTS = [
    EditRequest("a", "Paris", "A song about {}", "Rome"),
    EditRequest("b", "Toyota", "{} cars are built in", "Germany"),
    EditRequest("c", "Leonhard Euler", "Number theory by {} and his friends", "Carl Gauss"),
    EditRequest("d", "X", "{} marks the", "spot"),
]
TEMPLATES = ["{}", "Hello. {}", "Once upon a time, there. {}"]


def test_prefix_cache_gives_the_full_forward(lm: LoadedModel) -> None:
    """Final hidden states of the run columns, with a delta at the subject token: cached
    prefix + suffix vs the whole rows in one forward, rows of different lengths (prefix
    lengths 0..~30), right padding, masks and position ids."""
    tok = lm.tokenizer
    rows = [r for i, q in enumerate(REQUESTS) for r in _request_rows(
        tok, i, q, TEMPLATES, TargetConfig(kl_position="last"))]
    assert min(r.subject for r in rows) == 0 and max(r.subject for r in rows) > 20
    module = lm.spec.module("layer", 1)
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(len(rows), lm.model.config.hidden_size, generator=gen)
    dev = lm.device
    every = torch.arange(len(rows), device=dev)

    def add_at(cols: list[int]):
        def fn(h: torch.Tensor) -> torch.Tensor:
            h = h.clone()
            h[every, torch.tensor(cols)] += delta.to(h.dtype)
            return h
        return fn

    ids, mask = pad([r.ids for r in rows], tok.pad_token_id, dev)
    with torch.no_grad(), edit_outputs(lm.model, {module: add_at([r.subject for r in rows])}):
        full = final_hidden(lm.model, lm.spec, ids, mask)
    prefix = _Prefix.build(lm, [r.ids[: r.subject] for r in rows])
    sids, smask = pad([r.ids[r.subject:] for r in rows], tok.pad_token_id, dev)
    with torch.no_grad(), edit_outputs(lm.model, {module: add_at([0] * len(rows))}):
        fast = prefix.hidden(lm, every, sids, smask)
    for j, r in enumerate(rows):
        # Same maths, different matmul shapes (FORWARD_REL); far below a wrong position id,
        # mask or padding slot (errors of the scale itself).
        assert_close_to_scale(fast[j, : len(r.ids) - r.subject], full[j, r.subject: len(r.ids)],
                              rel=FORWARD_REL, msg=f"row {j}")
    assert count_hooks(lm.model) == 0


@pytest.mark.parametrize("kl_position", ["subject_last", "last"])
def test_fast_and_full_paths_give_the_same_targets(lm: LoadedModel, kl_position: str) -> None:
    cfg = TargetConfig(lr=0.5, steps=8, kl_position=kl_position, early_stop_loss=2.0)
    for modules in ([lm.spec.module("layer", 2)],
                    [lm.spec.module("attn_out", 2), lm.spec.module("mlp_out", 2)]):
        full = optimize_targets(lm, REQUESTS, TEMPLATES, modules, replace(cfg, fast=False))
        fast = optimize_targets(lm, REQUESTS, TEMPLATES, modules, cfg)
        for m in modules:
            torch.testing.assert_close(fast[m][0], full[m][0])  # init: the same forward
            # The targets init + δ. The gradients of both paths agree to FORWARD_REL of
            # their scale, but Adam divides each entry by its own running RMS, so entries
            # with near-zero gradients turn that rounding into visible steps: ~d·ε of the
            # delta's scale (d = 32 entries, ε ≤ FORWARD_REL; the derivation in
            # test_optimize_targets_batched_equals_separate, which allows 1e-2), less
            # relative to init + δ; 5e-3 leaves 15×, and a wrong row is off by ~1.
            assert_close_to_scale(fast[m][0] + fast[m][1], full[m][0] + full[m][1],
                                  rel=5e-3, msg=m)


@pytest.fixture
def ctx(lm: LoadedModel, cache_dir: Path, tiny_corpus: Path) -> EditContext:
    stats = CovarianceStore([str(tiny_corpus)], str(cache_dir / "stats"), n_tokens=2000)
    return EditContext(lm=lm, stats=stats, templates=TEMPLATES)


@pytest.mark.parametrize("method", ["memit", "pmet", "adaple", "alphaedit", "rome"])
def test_every_method_gets_the_same_deltas_on_both_paths(
    compose: Compose, lm: LoadedModel, ctx: EditContext, method: str
) -> None:
    cfg = compose([f"model={lm.spec.name}", f"method={method}"])
    deltas = {}
    for fast in (True, False):
        m = instantiate(cfg.method, _convert_="all")
        assert m.target.fast  # the fast path is every method's default
        m.target = replace(m.target, fast=fast)
        m.prepare(ctx)
        deltas[fast] = m.compute_deltas(ctx, REQUESTS[:3])
    assert deltas[True].keys() == deltas[False].keys()
    for name in deltas[True]:
        # The targets agree to ~d·ε of their change (test above); the closed-form solves
        # map the residuals linearly onto the deltas: 5e-3 as for the targets.
        assert_close_to_scale(deltas[True][name], deltas[False][name], rel=5e-3, msg=name)


@pytest.mark.parametrize("fast", [True, False])
def test_chunks_under_the_memory_budget_give_the_same_targets(lm: LoadedModel,
                                                              fast: bool) -> None:
    cfg = TargetConfig(lr=0.5, steps=8, early_stop_loss=2.0, fast=fast)
    rows = [_request_rows(lm.tokenizer, i, r, TEMPLATES, cfg) for i, r in enumerate(REQUESTS)]
    one = request_chunks(rows, cfg)
    assert one == [slice(0, len(REQUESTS))]  # the default budget holds these four
    small = replace(cfg, chunk_tokens=_chunk_cost([*rows[0], *rows[1]], fast))
    several = request_chunks(rows, small)
    assert several[0] == slice(0, 2) and len(several) > 1  # exactly the first two fit
    alone = replace(cfg, chunk_tokens=1)
    assert request_chunks(rows, alone) == [slice(i, i + 1) for i in range(len(REQUESTS))]
    modules = [lm.spec.module("attn_out", 2), lm.spec.module("mlp_out", 2)]
    ref = optimize_targets(lm, REQUESTS, TEMPLATES, modules, cfg)
    for c in (small, alone):
        out = optimize_targets(lm, REQUESTS, TEMPLATES, modules, c)
        for m in modules:
            torch.testing.assert_close(out[m][0], ref[m][0])
            # Requests are independent; only the matmul batching differs. Adam's amplified
            # rounding as in test_optimize_targets_batched_equals_separate (~d·ε, its 1e-2).
            assert_close_to_scale(out[m][1], ref[m][1], rel=1e-2, msg=m)


def test_nll_rows_are_the_teacher_forced_rows(lm: LoadedModel) -> None:
    """The NLL rows target optimisation runs and reads are TeacherForced's: the same
    token sequences, and the read columns are those predicting each target token."""
    tok = lm.tokenizer
    rows = [r for i, q in enumerate(REQUESTS)
            for r in _request_rows(tok, i, q, TEMPLATES, TargetConfig()) if not r.is_kl]
    forced = TeacherForced.from_ids([(r.prompt, r.target) for r in rows], tok.pad_token_id,
                                    lm.device)
    for k, r in enumerate(rows):
        assert forced.ids[k, : len(r.ids)].tolist() == list(r.ids)
        assert int(forced.mask[k].sum()) == len(r.ids)
        mine = forced.owner == k
        assert forced.col[mine].tolist() == list(r.reads)
        assert forced.tok[mine].tolist() == list(r.target)
        assert r.reads[-1] == len(r.ids) - 1  # nothing after the last read column is run


def test_kl_row_reads_the_subject_token_by_default(lm: LoadedModel) -> None:
    tok, req = lm.tokenizer, REQUESTS[2]
    assert TargetConfig().kl_position == "subject_last"  # kmeng01/memit compute_z.py
    for position in ("subject_last", "last"):
        cfg = TargetConfig(kl_position=position)
        *nll, kl = _request_rows(tok, 0, req, TEMPLATES, cfg)
        assert kl.is_kl and not any(r.is_kl for r in nll)
        e = encode(tok, cfg.kl_prompt, req.subject)
        col = e.subject_last if position == "subject_last" else len(e.ids) - 1
        assert kl.reads == (col,) and kl.subject == e.subject_last
        assert kl.ids == e.ids[: col + 1]  # nothing after the read column is run
    with pytest.raises(ConfigError, match=r"kl_position='first'.*subject_last"):
        TargetConfig(kl_position="first")
    with pytest.raises(ConfigError, match=r"early_stop_on='loss'.*total"):
        TargetConfig(early_stop_on="loss")
    with pytest.raises(ConfigError, match="chunk_tokens=0"):
        TargetConfig(chunk_tokens=0)
    with pytest.raises(ConfigError, match="length_groups=0"):
        TargetConfig(length_groups=0)


@pytest.mark.parametrize("fast", [True, False])
def test_early_stop_reads_the_total_loss(lm: LoadedModel, fast: bool) -> None:
    """A probe: with a (nonsensical) negative weight decay, the total loss drops far below
    the threshold as soon as δ ≠ 0, while the NLL stays far above it (random model: NLL ≈
    log 257). Stopping on the total loss ends every request after one step, so 10 steps
    give exactly the 2-step result; stopping on the NLL alone would not."""
    modules = [lm.spec.module("layer", 2)]
    probe = TargetConfig(lr=0.5, weight_decay=-1e3, early_stop_loss=0.05, fast=fast)
    two = optimize_targets(lm, REQUESTS, TEMPLATES, modules, replace(probe, steps=2))
    ten = optimize_targets(lm, REQUESTS, TEMPLATES, modules, replace(probe, steps=10))
    three = optimize_targets(lm, REQUESTS, TEMPLATES, modules,
                             replace(probe, steps=3, weight_decay=0.0))
    d2, d10, d3 = (x[modules[0]][1] for x in (two, ten, three))
    assert d2.abs().min() > 0  # one step was taken by every request
    assert torch.equal(d10, d2)
    assert not torch.allclose(d3, d2)  # without the probe the same requests keep going
    # early_stop_on=nll ignores the probe's total: every request keeps optimising
    nll_ten = optimize_targets(lm, REQUESTS, TEMPLATES, modules,
                               replace(probe, steps=10, early_stop_on="nll"))
    assert not torch.allclose(nll_ten[modules[0]][1], d2)


@pytest.mark.parametrize("method", ["memit", "pmet", "adaple", "alphaedit", "rome"])
def test_one_override_switches_every_method_to_the_full_path(compose: Compose,
                                                             method: str) -> None:
    for overrides, want in (([], (True, "subject_last", "total")),
                            (["++model.edit.target.fast=false",
                              "++model.edit.target.kl_position=last",
                              "++model.edit.target.early_stop_on=nll"],
                             (False, "last", "nll"))):
        cfg = compose(["model=tiny_llama", f"method={method}", *overrides])
        target = instantiate(cfg.method, _convert_="all").target
        assert (target.fast, target.kl_position, target.early_stop_on) == want
    # SmolLM2 keeps the NLL stop its settings were measured with, for every method
    smol = instantiate(compose(["model=smollm2", f"method={method}"]).method,
                       _convert_="all").target
    assert smol.early_stop_on == "nll"


def test_length_groups_minimise_padding() -> None:
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.choice([1, 2, 4, 5, 7, 8, 11, 15]) for _ in range(rng.randint(1, 30))]
        k = rng.randint(1, 4)
        groups = length_groups(lengths, k)
        assert sorted(j for g in groups for j in g) == list(range(len(lengths)))
        assert len(groups) <= k

        def cost(parts, lengths=lengths):
            return sum(len(p) * max(lengths[j] for j in p) for p in parts)

        # brute force: every way to cut the sorted distinct lengths into <= k runs
        values = sorted(set(lengths))
        best = min(
            cost([[j for j, x in enumerate(lengths) if lo <= x <= hi]
                  for lo, hi in zip([values[0], *[values[c] for c in cuts]],
                                    [*[values[c - 1] for c in cuts], values[-1]], strict=True)])
            for r in range(min(k, len(values)))
            for cuts in itertools.combinations(range(1, len(values)), r)
        )
        assert cost(groups) == best


@pytest.mark.parametrize("start", [1, 2, 3])
def test_starting_at_a_block_gives_the_full_forward(lm: LoadedModel, start: int) -> None:
    """Issue 30: the input of block ``start`` computed once, then blocks ``start`` onwards,
    equals running every block, with and without a cached prefix, a delta added inside the
    upper blocks; the model's block list and hooks are as they were afterwards."""
    tok = lm.tokenizer
    rows = [r for i, q in enumerate(REQUESTS) for r in _request_rows(
        tok, i, q, TEMPLATES, TargetConfig(kl_position="last"))]
    dev = lm.device
    every = torch.arange(len(rows), device=dev)
    module = lm.spec.module("mlp_out", start)
    delta = torch.randn(len(rows), lm.model.config.hidden_size,
                        generator=torch.Generator().manual_seed(0))
    container = lm.model.get_submodule(lm.spec.layers_path)

    def add_at(h: torch.Tensor) -> torch.Tensor:
        h = h.clone()
        h[every, 0] += delta.to(h.dtype)
        return h

    prefix = _Prefix.build(lm, [r.ids[: r.subject] for r in rows])
    sids, smask = pad([r.ids[r.subject:] for r in rows], tok.pad_token_id, dev)
    ids, mask = pad([r.ids for r in rows], tok.pad_token_id, dev)
    with torch.no_grad(), edit_outputs(lm.model, {module: add_at}):
        cached = prefix.hidden(lm, every, sids, smask)
        cached_from = prefix.hidden(lm, every, sids, smask, start,
                                    prefix.block_input(lm, start, sids, smask))
        full = final_hidden(lm.model, lm.spec, ids, mask)
        full_from = final_hidden(lm.model, lm.spec, ids, mask, start=start,
                                 block_input=block_inputs(lm.model, lm.spec, start, ids, mask))
    # The blocks below `start` see the same inputs in the same shapes either way; only the
    # float rounding of differently batched products may differ: a few float32 ulps of the
    # hidden states' scale, far below a wrong position, mask or missing block (errors of
    # the scale itself).
    assert_close_to_scale(cached_from, cached, rel=1e-5, msg="prefix")
    assert_close_to_scale(full_from, full, rel=1e-5, msg="full")
    assert lm.model.get_submodule(lm.spec.layers_path) is container
    assert count_hooks(lm.model) == 0
    # a wrong start input must show: the input of the block below changes the result
    with torch.no_grad():
        wrong = final_hidden(lm.model, lm.spec, ids, mask, start=start,
                             block_input=block_inputs(lm.model, lm.spec, start - 1, ids, mask))
    assert not torch.allclose(wrong, full_from, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="block_input"):
        final_hidden(lm.model, lm.spec, ids, mask, start=start)


@pytest.mark.parametrize("fast", [True, False])
def test_targets_from_the_edit_block_equal_every_block_run(lm: LoadedModel, fast: bool) -> None:
    """``from_edit_layer`` (the default) skips the blocks below the lowest edited module's
    block in every step; the targets are those of running every block."""
    assert TargetConfig().from_edit_layer
    cfg = TargetConfig(lr=0.5, steps=8, early_stop_loss=2.0, fast=fast)
    modules = [lm.spec.module("attn_out", 2), lm.spec.module("mlp_out", 3)]
    assert first_block(lm, modules) == 2
    assert first_block(lm, [lm.spec.module("layer", 1), *modules]) == 1
    assert first_block(lm, [lm.spec.module("ln_f")]) == 0  # outside the blocks: run all
    ref = optimize_targets(lm, REQUESTS, TEMPLATES, modules, replace(cfg, from_edit_layer=False))
    out = optimize_targets(lm, REQUESTS, TEMPLATES, modules, cfg)
    for m in modules:
        torch.testing.assert_close(out[m][0], ref[m][0])
        # Adam's amplified rounding as in test_optimize_targets_batched_equals_separate
        assert_close_to_scale(out[m][1], ref[m][1], rel=1e-2, msg=m)


def test_most_probable_early_stopping_waits_for_the_argmax(lm: LoadedModel) -> None:
    """MPES (issue 30) stops a request only once its new object is the argmax at every
    target token: a tiny random model never gets there for these multi-token targets, so
    MPES with the loss rule off runs exactly as long as the NLL rule with it off. That
    it stops where it should on a real model: tests/test_smollm2.py."""
    modules = [lm.spec.module("layer", 2)]
    never = TargetConfig(lr=0.5, steps=6, early_stop_loss=-1.0, early_stop_on="nll")
    ref = optimize_targets(lm, REQUESTS, TEMPLATES, modules, never)
    out = optimize_targets(lm, REQUESTS, TEMPLATES, modules,
                           replace(never, early_stop_on="most_probable"))
    assert torch.equal(out[modules[0]][1], ref[modules[0]][1])
    with pytest.raises(ConfigError, match="most_probable_steps=0"):
        TargetConfig(most_probable_steps=0)


def test_pmet_argmax_rule_waits_for_the_argmax(lm: LoadedModel) -> None:
    """PMET's down-weighting and KL stop (issue 28) act only once the new object is the
    argmax at every target token: on a tiny random model, which never gets there for these
    multi-token targets, they change nothing. Where they act: tests/test_smollm2.py."""
    modules = [lm.spec.module("layer", 2)]
    never = TargetConfig(lr=0.5, steps=6, early_stop_loss=-1.0, early_stop_on="nll")
    ref = optimize_targets(lm, REQUESTS, TEMPLATES, modules, never)
    out = optimize_targets(lm, REQUESTS, TEMPLATES, modules,
                           replace(never, argmax_nll_factor=0.1, argmax_kl_stop=1e9))
    assert torch.equal(out[modules[0]][1], ref[modules[0]][1])
    for bad, match in (({"argmax_nll_factor": 2.0}, r"argmax_nll_factor=2\.0 must be in \[0, 1\]"),
                       ({"argmax_nll_factor": -0.1}, "argmax_nll_factor=-0.1"),
                       ({"argmax_kl_stop": -1.0}, r"argmax_kl_stop=-1\.0 must be a number >= 0")):
        with pytest.raises(ConfigError, match=match):
            TargetConfig(**bad)


@pytest.mark.parametrize("start", [1, 2])
def test_keys_from_a_cached_block_input_equal_the_full_forward(lm: LoadedModel,
                                                               start: int) -> None:
    """Issue 30: MEMIT's layer loop reads keys and hidden states at blocks ``start`` and
    up with the earlier layers' updates in place; the input of block ``start``, which those
    updates cannot change, is computed once (:class:`BlockStart`). The keys and outputs
    are those of running every block, with an update in place above ``start``."""
    dev = lm.device
    key_in = BlockStart.build(lm, key_encodings(lm, REQUESTS, TEMPLATES), start)
    plain_in = BlockStart.build(lm, plain_encodings(lm, REQUESTS), start)
    name = lm.spec.weight("mlp_out", start)
    weight = lm.model.get_parameter(name)
    update = {name: 0.1 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))
              .to(dev, weight.dtype)}
    top = lm.spec.module("layer", lm.spec.n_layers - 1)
    for in_place in ({}, update):
        with applied(lm.model, in_place):
            for layer in range(start, lm.spec.n_layers):
                full = compute_keys(lm, layer, REQUESTS, TEMPLATES)
                cached = compute_keys(lm, layer, REQUESTS, TEMPLATES, prepared=key_in)
                # the same blocks on the same inputs; only differently shaped products
                # may round differently: FORWARD_REL of the keys' scale
                assert_close_to_scale(cached, full, rel=FORWARD_REL, msg=f"keys {layer}")
            assert_close_to_scale(hidden_at_subject(lm, top, REQUESTS, prepared=plain_in),
                                  hidden_at_subject(lm, top, REQUESTS), rel=FORWARD_REL,
                                  msg="hidden")
    assert count_hooks(lm.model) == 0
    # the update in place changes the keys above it: the cache did not freeze them
    with applied(lm.model, update):
        moved = compute_keys(lm, start + 1, REQUESTS, TEMPLATES, prepared=key_in)
    assert not torch.allclose(moved, compute_keys(lm, start + 1, REQUESTS, TEMPLATES,
                                                  prepared=key_in), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="below the cached block"):
        key_in.at(lm, lm.spec.module("mlp_out", start - 1), want_input=True)


def test_spread_residual_reads_keys_from_the_lowest_edited_block(lm: LoadedModel,
                                                                 ctx: EditContext) -> None:
    """The layer loop with the cached block input gives the deltas of the plain one."""
    layers = [1, 2]
    z_module = lm.spec.module("layer", layers[-1])
    z = hidden_at_subject(lm, z_module, REQUESTS) + 0.5
    covs = ctx.stats.get(lm, layers)

    def solve(layer, resid, keys, weight):
        from kaedit.methods.solve import solve_update
        return solve_update(resid, keys, covs[layer], 10.0)

    got = spread_residual(lm, REQUESTS, TEMPLATES, layers, z, z_module, solve)
    # the same loop with every key and hidden state computed from the embeddings
    want, in_place, kappa = {}, {}, {}
    for i, layer in enumerate(layers):
        name = lm.spec.weight("mlp_out", layer)
        with applied(lm.model, in_place):
            keys = compute_keys(lm, layer, REQUESTS, TEMPLATES)
            cur = hidden_at_subject(lm, z_module, REQUESTS)
        resid = (z - cur).T / (len(layers) - i)
        want[name] = lm.spec.to_param("mlp_out", solve(layer, resid, keys, None).float())
        in_place[name] = want[name]
        k = keys.double()
        kappa[name] = float(torch.linalg.cond(10.0 * covs[layer].double() + k @ k.T))
    for name in want:
        # Keys and residuals agree to FORWARD_REL of their scale (test above); Δ = R Kᵀ A⁻¹
        # with A = λC + KKᵀ moves by at most ~(2 + 2κ(A)) times that (R and K once each,
        # K twice more inside A); the second layer also inherits the first's: twice again.
        rel = 4 * (2 + 2 * max(kappa.values())) * FORWARD_REL
        assert_close_to_scale(got[name], want[name], rel=rel, msg=name)
