"""Tests of batchfinder/devices/: the simulated GPU, the CUDA backend, NVML and device resolution."""
