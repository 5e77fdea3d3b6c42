"""The stage-2 per-example LM loss: each example's answer tokens are averaged first."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sepit.config.base import ConfigError
from sepit.models.sepit_lm import causal_lm_loss
from sepit.train.lm_task import example_mean_lm_loss


def test_example_mean_weighs_examples_equally():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 5)
    # row 0: one labelled token (a "Yes"); row 1: four labelled tokens (a description); row 2 none.
    labels = torch.tensor([[-100, -100, -100, -100, 3, -100], [-100, 1, 2, 0, 4, -100]])
    logp = F.log_softmax(logits, -1)
    row0 = -logp[0, 3, 3]
    row1 = -(logp[1, 0, 1] + logp[1, 1, 2] + logp[1, 2, 0] + logp[1, 3, 4]) / 4
    torch.testing.assert_close(example_mean_lm_loss(logits, labels), (row0 + row1) / 2)
    # the token mean instead weighs row 1 four times as much
    torch.testing.assert_close(causal_lm_loss(logits, labels), (row0 + 4 * row1) / 5)
    # a row without labels is left out, not counted as zero loss
    padded = torch.cat([labels, torch.full((1, 6), -100)])
    torch.testing.assert_close(example_mean_lm_loss(torch.cat([logits, logits[:1]]), padded), (row0 + row1) / 2)


def test_stage2_loss_per_is_validated():
    from sepit.train.stage2 import Stage2JobConfig

    assert Stage2JobConfig(init="x", loss_per="example").loss_per == "example"
    with pytest.raises(ConfigError, match="loss_per"):
        Stage2JobConfig(init="x", loss_per="sentence")
