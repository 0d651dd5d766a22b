"""Tests of the front ends: find_batch_size/try_batch_size (api.py), the command line, Lightning, Hugging Face, the
examples."""
