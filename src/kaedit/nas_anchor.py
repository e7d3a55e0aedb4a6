"""``python -m kaedit.nas_anchor [--n N] [--seed S] [overrides]``: NAS's anchor for a run.

Norm-Anchor Scaling (arXiv 2602.02543, ``method.target.nas_anchor``) rescales each solved
value vector v* to the mean ‖v*‖ of the *unedited* model. This computes that mean on the
model, method and dataset the same overrides compose (:func:`kaedit.methods.targets.nas_anchor`:
``N`` requests of the dataset drawn with ``seed``, δ optimised at the method's last edit
layer on bare prompts, the upper 5 % of the norms left out; SasyaTitech/NAS
``util/vstar_stats.py``: 1000 CounterFact rewrites, seed 0) and prints the override to add
to the run, e.g. ``++model.edit.target.nas_anchor=12.34``.

The reference computes the anchor lazily inside its first edit and keeps it in a
module-level dict and a JSON file; here it is a config value, so a run and its resume use
the same number and the fingerprint of the run includes it.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Sequence

from kaedit.errors import ConfigError


def anchor_for(overrides: Sequence[str], n: int = 1000, seed: int = 0,
               upper_quantile: float = 0.95) -> float:
    """The anchor for the run ``overrides`` compose (see the module docstring)."""
    import torch

    from kaedit.methods.targets import TargetConfig, nas_anchor
    from kaedit.setup import build, build_model, build_records, compose

    if n < 1:
        raise ConfigError(f"--n={n} must be >= 1")
    cfg = compose(list(overrides))
    records = build_records(cfg)
    lm = build_model(cfg)
    torch.manual_seed(int(cfg.seed))
    method = build(cfg.method, _convert_="all")
    target = getattr(method, "target", None)
    if not isinstance(target, TargetConfig) or not list(method.layers):
        raise ConfigError(f"method._target_={cfg.method._target_!r} optimises no v* targets: "
                          "NAS applies to MEMIT, PMET, AdaPLE, AlphaEdit and ROME")
    sample = random.Random(seed).sample(records, min(n, len(records)))
    return nas_anchor(lm, sample, int(list(method.layers)[-1]), target, upper_quantile)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kaedit.nas_anchor",
                                     description=__doc__.split("\n\n")[1])
    parser.add_argument("--n", type=int, default=1000, help="requests sampled (1000)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    parser.add_argument("--upper-quantile", type=float, default=0.95,
                        help="norms above this quantile are left out (0.95)")
    args, overrides = parser.parse_known_args(argv)
    try:
        value = anchor_for(overrides, args.n, args.seed, args.upper_quantile)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"++model.edit.target.nas_anchor={value:.6g}")


if __name__ == "__main__":
    main()
