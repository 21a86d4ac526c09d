"""Small helpers every layer uses: atomic files, processes and executables, progress logging, SVG plots."""
