"""The same edits on a CUDA device as on the CPU (marked ``gpu``; skipped without CUDA).

Every method and the runner are written device-agnostically (tensors follow the model);
these tests check that on a real GPU: each method's deltas computed on CUDA equal the CPU
ones to float32 tolerance and stay on the model's device, the context templates are the
same, and a whole sequential run on CUDA saves the same summed deltas as on the CPU,
drop-and-rescale's masks included.

History: on an H200 (2026-11-26) the per-method tests passed and the whole-run tests
failed (relative errors 0.07-0.44) because the templates were sampled with the device's
RNG; they are now drawn from a seeded CPU generator (``methods.templates.context_templates``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file

from conftest import Compose
from kaedit import experiment
from kaedit.methods.base import EditContext
from kaedit.methods.templates import context_templates
from kaedit.models import load_model
from kaedit.records import EditRequest

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]

REQUESTS = [
    EditRequest("a", "Paris", "A song about {}", "Rome"),
    EditRequest("b", "Toyota", "I bought a {}", "car"),
    EditRequest("c", "Leonhard Euler", "Number theory by {}", "Gauss"),
]
TEMPLATES = ["{}", "Hello. {}"]
#: ||a - b|| / ||b|| allowed between CUDA and CPU float32 results (different kernels and
#: summation orders; the iterative target optimisation amplifies them a little).
RTOL = 2e-3


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def deltas_on(compose: Compose, device: str, method: str, tiny_corpus: Path,
              cache: Path) -> dict[str, torch.Tensor]:
    cfg = compose(["model=tiny_llama", f"model.device={device}", f"method={method}",
                   f"stats.corpus=['{tiny_corpus}']", "stats.n_tokens=2000",
                   f"stats.cache_dir={cache / device}"])
    lm = load_model(cfg.model, lambda: instantiate(cfg.model.load))
    assert lm.device.type == device
    ctx = EditContext(lm=lm, stats=instantiate(cfg.stats), templates=list(TEMPLATES))
    m = instantiate(cfg.method, _convert_="all")
    m.prepare(ctx)
    torch.manual_seed(0)
    deltas = m.compute_deltas(ctx, REQUESTS)
    assert all(d.device.type == device for d in deltas.values())
    return {k: v.cpu() for k, v in deltas.items()}


@pytest.mark.parametrize("method", ["ft", "rome", "memit", "pmet", "adaple", "alphaedit"])
def test_method_deltas_on_cuda_equal_cpu(compose: Compose, tiny_corpus: Path,
                                         tmp_path: Path, method: str) -> None:
    cpu = deltas_on(compose, "cpu", method, tiny_corpus, tmp_path)
    cuda = deltas_on(compose, "cuda", method, tiny_corpus, tmp_path)
    assert cpu.keys() == cuda.keys()
    for name in cpu:
        assert relative_error(cuda[name], cpu[name]) < RTOL, name


def test_context_templates_same_on_cuda_and_cpu(compose: Compose) -> None:
    got = {}
    for device in ("cpu", "cuda"):
        cfg = compose(["model=tiny_llama", f"model.device={device}"])
        lm = load_model(cfg.model, lambda cfg=cfg: instantiate(cfg.model.load))
        got[device] = context_templates(lm, [(10, 5), (5, 10)], seed=0)
    assert got["cuda"] == got["cpu"]


def run_on(compose: Compose, overrides: Sequence[str], device: str, run_dir: Path) -> dict:
    cfg = compose([*overrides, f"model.device={device}", "save_deltas=true"])
    return experiment.run(cfg, run_dir=str(run_dir))


@pytest.mark.parametrize(("method", "fusion"),
                         [("memit", "add"), ("memit", "drop_rescale"), ("alphaedit", "add")])
def test_sequential_run_on_cuda_equals_cpu(compose: Compose, tiny_run_overrides: list[str],
                                           tmp_path: Path, method: str, fusion: str) -> None:
    """Drop-and-rescale's masks come from a seeded CPU generator, so they are the same
    masks on both devices; AlphaEdit carries its projector and past keys across steps."""
    overrides = [*tiny_run_overrides, f"method={method}", f"fusion={fusion}"]
    cpu = run_on(compose, overrides, "cpu", tmp_path / "cpu")
    cuda = run_on(compose, overrides, "cuda", tmp_path / "cuda")
    assert cuda["edits_done"] == cpu["edits_done"] == 6
    a, b = (load_file(str(tmp_path / d / "deltas.safetensors")) for d in ("cuda", "cpu"))
    assert a.keys() == b.keys()
    for name in a:
        assert relative_error(a[name], b[name]) < RTOL, name
