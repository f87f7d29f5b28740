"""Checkpointer: what a resume restores, wherever the model lives."""

import random

import numpy as np
import pytest
import torch

from moco.checkpoint import Checkpointer, load_checkpoint


def _tiny_run(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return Checkpointer(str(tmp_path), model, optimizer, scaler, arch="tiny")


@pytest.mark.filterwarnings("ignore:.*meta parameter")
def test_resume_restores_the_random_states_into_a_model_on_another_device(tmp_path):
    # the file's tensors must not follow the model: on a GPU, NumPy's state mapped to
    # the device could not be read back. The meta device stands in for the GPU here,
    # as map_location="meta" moves the nested random states too.
    saver = _tiny_run(tmp_path)
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    saver.save_epoch(0)
    expected = (torch.rand(3), random.random(), np.random.rand())
    mapped = torch.load(
        tmp_path / "checkpoint_0000.pth.tar", map_location="meta", weights_only=True
    )
    assert mapped["rng"]["numpy"][1].device.type == "meta"

    resumer = _tiny_run(tmp_path)
    resumer.model.to("meta")
    resumer.optimizer = torch.optim.SGD(resumer.model.parameters(), lr=0.1)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    assert resumer.resume(str(tmp_path / "checkpoint_0000.pth.tar")) == (1, 0)
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1]
    assert np.random.rand() == expected[2]
    state = load_checkpoint(str(tmp_path / "checkpoint_0000.pth.tar"))
    assert all(v.device.type == "cpu" for v in state["state_dict"].values())
