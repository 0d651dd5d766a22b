"""Tests of batchfinder/search/: the pure search strategies, the guided search and accumulation plans."""
