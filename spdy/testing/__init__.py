"""Test support that ships with spdy, for spdy's own tests and for third-party backends.

* :mod:`spdy.testing.backends` — the backend conformance suite (``CHECKS``): every
  latency backend, built in or not, must pass it.
* :mod:`spdy.testing.models` — tiny models (a transformer-like MLP block, a small CNN)
  that the checks profile.
"""
