"""Where the repository's configs are: imports nothing, so an entry point can name its
config dir before anything heavy is imported. Hydra is given the absolute path, which
holds however the entry point is started (``python -m``, or ``main`` imported and called:
Hydra would resolve a relative path against the importing package)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"
