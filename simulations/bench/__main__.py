"""``python -m simulations.bench``: the same as ``fedtail bench``."""

from simulations.bench.suite import main

if __name__ == "__main__":
    raise SystemExit(main())
