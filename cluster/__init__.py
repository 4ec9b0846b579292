"""Ray execution of tilefarm plans: GPU actors, the object-store scaffold, the pull scheduler, the farm.

The only package that imports Ray.
"""

from pipeline.openmp import prefer_passive_waits

prefer_passive_waits()  # a Ray job's driver (`python -m cluster.job`) starts here, before torch loads
