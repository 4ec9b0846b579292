"""Ray execution of tilefarm plans (GPU actors, object-store scaffold, pull scheduler).

The only package that imports Ray. Not built yet: renders run on the local executor
(`farm render` without --cluster).
"""
