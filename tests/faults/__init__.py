"""Fault injection for edgectl: a proxy, a device load and a harness that counts.

Run the long version with ``python -m tests.faults.harness --long``; the short
one runs inside the test suite (``tests/test_faults.py``).
"""
