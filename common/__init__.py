"""Mechanisms every package of the repository may use: standard library only, and no import of any other
package here, so ``appliance``, ``appstore_client`` and ``appstore`` can all depend on it and the arrows
still point one way (see docs: "Packages").

- :mod:`common.backoff`: how long to wait after the n-th failure in a row (exponential, capped, jittered).
- :mod:`common.crashpoint`: a process killed at a named step, once, for the crash tests (off on a site).
- :mod:`common.files`: writing a file so that a crash leaves the old or the new, never half.
"""
