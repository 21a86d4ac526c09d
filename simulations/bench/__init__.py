"""fedtail's benchmarks: DP step speed and memory, federation overhead, privacy-utility frontier, serving latency.

``fedtail bench [NAME ...] [--full] [--out DIR]`` or ``python -m simulations.bench``
runs them (all by default); each prints a table and saves ``NAME.json`` (and
``NAME.svg`` where a picture says more), and ``benchmarks.md`` is assembled from
all JSON results in the folder.

One module per benchmark (``dp_step``, ``pieces``, ``sites``, ``frontier``,
``serving``, ``deployment``, ``rounds``, ...) declares a ``core.Benchmark``: its name, help, own
options, how to run it, print its table and plot it. ``registry`` lists them,
``suite`` runs them and builds the command line and the page from the registry,
``core`` holds what they share (timing, memory sampling, the machine).
"""
