"""batchfinder's tests, laid out as the package is: one folder per layer, the shared models in ``helpers.py``."""
