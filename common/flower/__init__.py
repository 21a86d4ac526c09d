"""Flower's internals behind one door: every use of Flower outside its public app API (see README.md here)."""
