"""Benchmarks comparing batchfinder with Lightning's and Accelerate's batch-size finders.

Run ``python -m benchmarks.compare --help`` from the repository root. Nothing in the ``batchfinder`` package imports
this package.
"""
