"""tilefarm's user side: the `farm` CLI, spec files, the local executor and outputs."""

from pipeline.openmp import prefer_passive_waits

prefer_passive_waits()  # before any module of the CLI imports torch (pipeline/openmp.py)

__version__ = "0.1.0"
