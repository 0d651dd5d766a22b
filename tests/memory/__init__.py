"""Tests of batchfinder/memory/: the allocator model, tracing, estimates, replays, recordings and predictions."""
