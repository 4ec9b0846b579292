"""Where tiles, crops and noise lie: the chess grid, cells, feathering, image tiling, sizes, the scaffold."""
