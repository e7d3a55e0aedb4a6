"""``python -m kaedit.trace [overrides]``: causal tracing (see :mod:`kaedit.trace`)."""

from kaedit.trace.cli import main

if __name__ == "__main__":
    main()
