"""Estimates and predictions against published figures of real GPUs (the table in docs/simulated-gpu.md).

All of it runs on fake tensors (no 224x224 computation happens), a few seconds per model.

* **Calibration** (:data:`batchfinder.memory.cudnn.CUDNN_FORWARD_WORKSPACE_FACTOR` was fitted to these): an RTX 4090,
  torch 2.0.1, cuDNN 8.9, SGD without momentum, batch 128, 224x224, 10 classes, as quoted in issue 20:
  ``max_memory_reserved / max_memory_allocated`` 18752/17232 MiB (1.088) for vgg16_bn, 12982/11738 MiB (1.106) for
  resnet50; allocated peaks of about 17,207 and 10,687 MiB after what earlier notebook cells left alive.
* **Check, not used to fit anything**: the per-GPU batch sizes NVIDIA trains ResNet-50 v1.5 and ResNeXt-101 32x4d
  with (https://github.com/NVIDIA/DeepLearningExamples/blob/master/PyTorch/Classification/ConvNets/configs.yml:
  SGD with momentum 0.875, 1000 classes, 224x224). They are working sizes, not measured maxima, so a prediction of
  the largest size that fits must be at least the published one. They are also powers of two chosen per GPU memory
  and precision (128 for ResNeXt-101 in mixed precision on 16 GB where ResNet-50 takes 256; 64 in FP32), which we
  read as "the next power of two did not fit": the prediction should stay below twice the published size. Where
  the published size is far below the memory limit (256 on an 80 GB A100, the same as on a 16 GB V100 in mixed
  precision), only the lower bound applies. NVIDIA's runs use ``cudnn.benchmark`` and, in mixed precision,
  channels-last tensors; the predictions use the defaults (NCHW, ``cudnn_workspace="auto"``).
"""

from __future__ import annotations

import pytest
import torch

import batchfinder as bf

torchvision = pytest.importorskip("torchvision")

MiB = 2**20

PUBLISHED_RTX4090 = {
    # model: (allocated peak MiB, max_memory_reserved / max_memory_allocated)
    "vgg16_bn": (17_207, 18_752 / 17_232),
    "resnet50": (10_687, 12_982 / 11_738),
}


def _sgd(params):
    return torch.optim.SGD(params, lr=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PUBLISHED_RTX4090))
def test_the_estimate_matches_the_published_rtx4090_measurements(name):
    allocated, ratio = PUBLISHED_RTX4090[name]
    model = getattr(torchvision.models, name)(num_classes=10)
    est = bf.estimate_memory(model, (3, 224, 224), 128, optimizer=_sgd)
    assert abs(est.peak / MiB / allocated - 1) <= 0.05, est.peak / MiB
    assert abs(est.peak_reserved / MiB / (allocated * ratio) - 1) <= 0.10, est.peak_reserved / MiB
    assert abs(est.peak_reserved / est.peak / ratio - 1) <= 0.10, est.peak_reserved / est.peak
    assert any("input + output bytes" in line for line in est.kernels)


@pytest.mark.slow
def test_without_the_workspace_model_vgg16_bn_reserves_far_more_than_published():
    # What the default model corrects: each activation in a segment of its own, two new segments per resolution in
    # the backward pass (docs/simulated-gpu.md).
    model = torchvision.models.vgg16_bn(num_classes=10)
    est = bf.estimate_memory(model, (3, 224, 224), 128, optimizer=_sgd, cudnn_workspace="none")
    assert est.peak_reserved / est.peak > 1.2 * PUBLISHED_RTX4090["vgg16_bn"][1]


def _resnext101_32x4d():
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4)


NVIDIA_CONFIGS = [
    # (model, GPU, precision, NVIDIA's batch size, upper bound applies)
    ("resnet50", "T4", "32-true", 128, True),
    ("resnet50", "V100-32GB", "32-true", 256, True),
    ("resnet50", "T4", "16-mixed", 256, True),
    ("resnet50", "A100-80GB", "32-true", 256, False),
    ("resnext101_32x4d", "V100-16GB", "32-true", 64, True),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, gpu, precision, published, bounded", NVIDIA_CONFIGS)
def test_predictions_bracket_nvidias_published_batch_sizes(name, gpu, precision, published, bounded):
    model = _resnext101_32x4d() if name == "resnext101_32x4d" else torchvision.models.resnet50()
    prediction = bf.predict_max_batch_size(
        model, (3, 224, 224), gpu=gpu, precision=precision,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.875, weight_decay=3.0517578125e-05),
    )
    assert prediction.max_batch_size >= published
    if bounded:
        assert prediction.max_batch_size < 2 * published
