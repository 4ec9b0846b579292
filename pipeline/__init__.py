"""Image math and models for tilefarm: scaffold noise, chess tiles, feathering, sampling, loading.

Nothing here imports Ray; the local render path runs with this package alone.
"""
