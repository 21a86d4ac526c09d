"""Small utilities every layer uses: atomic files, processes, progress logging, SVG plots, Flower record values."""
