"""Portcullis benchmarks: `python -m bench [NAME ...]` runs them against real programs
(iperf3, stunnel, a real `portcullis up`) on loopback and prints ratios to a baseline.

Nothing here is imported by the package or the tests; results go to bench/results/.
"""
