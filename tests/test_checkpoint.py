"""Checkpointer: what a resume restores, wherever the model lives."""

import random

import numpy as np
import pytest
import torch

from moco.checkpoint import Checkpointer, load_checkpoint
from moco.distributed import local_gpu
from moco.utils import UsageError


def _tiny_run(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return Checkpointer(str(tmp_path), model, optimizer, scaler, arch="tiny")


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


@pytest.mark.parametrize(
    "local_rank, visible, expected", [(0, 8, 0), (3, 8, 3), (3, 1, 0), (0, 1, 0)]
)
def test_each_process_takes_its_own_gpu_or_the_only_one_it_sees(
    local_rank, visible, expected
):
    assert local_gpu(local_rank, visible) == expected


def test_a_process_that_sees_neither_its_gpu_nor_one_gpu_is_refused():
    with pytest.raises(UsageError, match="sees 2 GPUs"):
        local_gpu(3, 2)
