"""No adaptation: the supervised baseline every table compares against."""
from __future__ import annotations

from rtda.adapt.base import Strategy
from rtda.adapt.losses import segmentation_loss


class SourceOnly(Strategy):
    """No adaptation: supervised loss on the labelled source batch; target batches are not loaded."""

    keys = ()

    @classmethod
    def label(cls, a) -> str:
        return "Source only"

    def training_step(self, model, source, target, ctx):
        with ctx.autocast():
            output = model(source["image"])
            loss = segmentation_loss(model, output, source["label"])
        ctx.backward(loss)
        return {"seg": loss.detach()}
