"""Denoising tiles: samplers, schedules, conditioning, the chess and blended passes, the tiled VAE."""
