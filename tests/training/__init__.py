"""Tests of batchfinder/training/: precision, sample sizes, state snapshots and the training step."""
