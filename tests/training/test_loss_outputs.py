"""The model's output reaches ``loss_fn`` as the model returns it; the default loss says what it trains on."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import batchfinder as bf
from batchfinder.training.steps import compute_loss, loss_input


class TwoHeads(nn.Module):
    """A backbone with a main and an auxiliary head, returned as a dict, a tuple or a Hugging Face ModelOutput."""

    def __init__(self, returns: str = "dict") -> None:
        super().__init__()
        self.returns = returns
        self.body = nn.Linear(16, 32)
        self.main = nn.Linear(32, 4)
        self.aux = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor):
        h = torch.relu(self.body(x))
        main, aux = self.main(h), self.aux(h)
        if self.returns == "tuple":
            return main, aux
        if self.returns == "output":
            from transformers.modeling_outputs import SequenceClassifierOutput

            return SequenceClassifierOutput(logits=main, hidden_states=(aux,))
        return {"logits": main, "aux": aux}


def _data(n: int = 64) -> TensorDataset:
    return TensorDataset(torch.randn(n, 16), torch.randint(0, 4, (n,)))


def _trial(model: nn.Module, **kwargs):
    return bf.try_batch_size(model, _data(), 8, device="sim:64MiB", **kwargs)


def test_loss_fn_indexes_a_dict_output():
    seen: list[type] = []

    def loss_fn(out, y):
        seen.append(type(out))
        return F.cross_entropy(out["logits"], y) + 0.4 * F.cross_entropy(out["aux"], y)

    trial = _trial(TwoHeads("dict"), loss_fn=loss_fn)
    assert trial.fits
    assert seen and all(kind is dict for kind in seen)


def test_loss_fn_unpacks_a_tuple_output_whole():
    rows: list[tuple[int, int]] = []

    def loss_fn(out, y):
        main, aux = out  # the whole tuple, not the first tensor split along the batch
        rows.append((main.shape[0], aux.shape[0]))
        return F.cross_entropy(main, y) + F.cross_entropy(aux, y)

    assert _trial(TwoHeads("tuple"), loss_fn=loss_fn).fits
    assert (8, 8) in rows and all(main == aux for main, aux in rows)


def test_loss_fn_receives_a_hugging_face_model_output():
    pytest.importorskip("transformers")
    from transformers.utils import ModelOutput

    seen: list[object] = []

    def loss_fn(out, y):
        seen.append(out)
        return F.cross_entropy(out.logits, y)

    assert _trial(TwoHeads("output"), loss_fn=loss_fn).fits
    assert seen and all(isinstance(out, ModelOutput) for out in seen)


def test_default_loss_refuses_several_tensors_and_asks_for_loss_fn():
    with pytest.raises(TypeError, match=r"loss_fn.*step_fn") as caught:
        _trial(TwoHeads("tuple"))
    assert "output[0]" in str(caught.value) and "output[1]" in str(caught.value)


def test_default_loss_on_logits_names_the_head_it_leaves_out_once_per_call():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _trial(TwoHeads("dict")).fits
    notes = [w for w in caught if "leaves out" in str(w.message)]
    assert len(notes) == 1
    assert "output['aux']" in str(notes[0].message) and "loss_fn" in str(notes[0].message)


def test_default_loss_uses_the_outputs_own_loss_as_a_key_or_an_attribute():
    loss = torch.tensor(2.0, requires_grad=True)
    assert compute_loss({"loss": loss, "logits": torch.ones(2, 3)}, None, None) is loss
    pytest.importorskip("transformers")
    from transformers.modeling_outputs import CausalLMOutput

    assert compute_loss(CausalLMOutput(loss=loss, logits=torch.ones(2, 3)), None, None) is loss


def test_loss_input_takes_the_only_tensor_that_carries_gradients():
    out = torch.ones(3, 2, requires_grad=True)
    indices = torch.arange(3)
    chosen, ignored = loss_input((out, indices))
    assert chosen is out and ignored == []
    lstm_like = (out, (torch.ones(1, 2), torch.ones(1, 2)))  # nn.LSTM's (output, (h, c))
    assert loss_input(lstm_like)[0] is out
