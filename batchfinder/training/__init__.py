"""The training layer: the user's pieces, as a trial uses them.

Owns batches from any dataset and the worst-case batch (:mod:`.batching`, :mod:`.sample_sizes`), the training step
and the default loss (:mod:`.steps`), the ``optimizer`` argument (:mod:`.optimizers`), precision and CUDA's autocast
policies emulated on the CPU (:mod:`.precision`), the snapshot and restore of the user's state (:mod:`.state`),
model checks (:mod:`.validation`), inputs given as a shape (:mod:`.synthetic`) and the marker for host-side work
that no device charges (:mod:`.host`), and undoing what PyTorch's lazy imports leave in the process
(:mod:`.environment`). May import :mod:`batchfinder.search` and the foundation modules
(:mod:`batchfinder.errors`, :mod:`batchfinder.units`), nothing above.
"""
