"""The memory layer: what a training step holds on a GPU, modelled without one.

Owns PyTorch's caching-allocator model (:mod:`.allocator`, stdlib only), the storage ledger and the dispatch mode that
charges it (:mod:`.accounting`), CUDA's kernels on CPU tensors (:mod:`.kernels`: attention, the optimizers' foreach
step), training steps under fake tensors (:mod:`.tracing`, :mod:`.fake_support`), recorded
and replayed allocation logs (:mod:`.replay`, :mod:`.recording`), the estimator and its breakdown (:mod:`.estimate`,
:mod:`.breakdown`), GPU-free prediction (:mod:`.predict`), the GPU table (:mod:`.gpus`) and inputs built from a shape
(:mod:`.shapes`). May import :mod:`batchfinder.training`, :mod:`batchfinder.search` and the result and foundation
modules; never :mod:`batchfinder.devices` or :mod:`batchfinder.engine`.
"""
