"""Test support that ships with spdy, for spdy's own tests and for third-party backends.

* :mod:`spdy.testing.backends` — the backend conformance suite (``CHECKS``): every
  latency backend, built in or not, must pass it.
* :mod:`spdy.testing.models` — tiny models (a transformer-like MLP block, a small CNN)
  that the checks profile.
* :mod:`spdy.testing.postgres` — a throw-away PostgreSQL server for the tests and
  benchmarks of a search shared through a database.
"""
