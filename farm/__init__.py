"""tilefarm's user side: the `farm` CLI, spec files, the local executor and outputs."""

__version__ = "0.1.0"
