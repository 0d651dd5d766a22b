"""Tests of batchfinder/engine/: trials, the search run, modes, confirmation, distributed agreement, OOM errors."""
