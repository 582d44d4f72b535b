"""Benchmarks of aqimodels (``make bench``); never part of ``make test``."""
