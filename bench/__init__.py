"""Benchmarks against the reference tools, run by nox (``nox -s bench``, ``bench-real``, ``bench-scale``,
``bench-report``); not part of the installed package."""
