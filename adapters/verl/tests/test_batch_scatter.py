"""ntl_verl.batch.scatter_to_last_token (moved from ntl.rewards with its test; needs no verl)."""

import pytest
import torch
from ntl_verl.batch import scatter_to_last_token


def test_scatter_to_last_token():
    m = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    out = scatter_to_last_token(torch.tensor([1.0, 2.0, 3.0]), m)
    assert out.tolist() == [[0, 1, 0], [0, 0, 0], [0, 0, 3]]
    with pytest.raises(ValueError):
        scatter_to_last_token(torch.tensor([1.0]), m)
