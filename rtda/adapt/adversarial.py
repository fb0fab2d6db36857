"""AdaptSegNet: output-space adversarial adaptation with one discriminator per output level."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rtda.adapt.base import Strategy, check_multi_level
from rtda.adapt.losses import keep_unused_in_graph, segmentation_loss, upsampled_softmaxes
from rtda.config import Config, ConfigError


class Adversarial(Strategy):
    """AdaptSegNet: output-space discriminators on the softmax of the upsampled logits (one per level).

    Per iteration: supervised loss on the source; adversarial loss pushing the target's softmax to look like
    the source's (source label), with the discriminators frozen; then one discriminator step on the detached
    source (source label) and target (target label) softmaxes, each loss halved. The discriminators and their
    Adam state are part of the strategy's state_dict; their learning rate follows the model's schedule.
    """

    needs_target = True
    keys = ("multi_level", "lambda_adv", "lambda_adv_aux", "gan", "discriminator", "d_lr", "d_betas",
            "source_label", "target_label")

    @classmethod
    def label(cls, a) -> str:
        return f"Adversarial ({'multi' if a.multi_level else 'single'}-level, λ={a.lambda_adv:g})"

    def __init__(self, cfg: Config, model: nn.Module):
        super().__init__(cfg, model)
        from rtda.models.discriminator import build_discriminator

        a = cfg.adapt
        check_multi_level(cfg)
        if len(a.d_betas) != 2:
            raise ConfigError(f"adapt.d_betas = {a.d_betas!r}: expected two numbers, e.g. [0.9, 0.99]")
        levels = ["main", "aux"] if a.multi_level else ["main"]
        self.discriminators = nn.ModuleDict(
            {level: build_discriminator(a.discriminator, cfg.model.num_classes) for level in levels})
        self.lambdas = {"main": a.lambda_adv, "aux": a.lambda_adv_aux}
        self.d_optimizer = torch.optim.Adam(self.discriminators.parameters(), lr=a.d_lr, betas=tuple(a.d_betas))
        self.gan_loss = F.binary_cross_entropy_with_logits if a.gan == "bce" else F.mse_loss

    def training_step(self, model, source, target, ctx):
        with ctx.autocast():
            out_s = model(source["image"])
            loss_seg = segmentation_loss(model, out_s, source["label"])
        ctx.backward(loss_seg)
        with torch.no_grad(), ctx.autocast():  # what the discriminators see of the source: no graph needed
            probs_s = self._softmaxes(out_s, source["image"].shape[-2:])
        del out_s
        adv, probs_t = self._generator_step(model, target, ctx)
        loss_d = self._discriminator_step(probs_s, probs_t, ctx)
        losses = {"seg": loss_seg.detach(), "disc": loss_d.detach()}
        losses.update({f"adv_{k}": v.detach() for k, v in adv.items()})
        return losses

    def _generator_step(self, model, target, ctx):
        """Fool the discriminators on the target. They are frozen so this loss reaches the model only.
        Returns the per-level adversarial losses and the target's (graph-holding) discriminator inputs."""
        a, discriminators = self.cfg.adapt, self.discriminators
        discriminators.requires_grad_(False)
        with ctx.autocast():
            out_t = model(target["image"])
            probs_t = self._softmaxes(out_t, target["image"].shape[-2:])
            adv = {k: self._gan(discriminators[k](p), a.source_label) for k, p in probs_t.items()}
            loss_adv = sum(self.lambdas[k] * v for k, v in adv.items())
            loss_adv = loss_adv + keep_unused_in_graph(list(out_t.aux.values())[len(adv) - 1:])
        ctx.backward(loss_adv)
        discriminators.requires_grad_(True)
        return adv, probs_t

    def _discriminator_step(self, probs_s, probs_t, ctx) -> torch.Tensor:
        """One discriminator step on detached inputs, so it never reaches the segmentation network."""
        a, discriminators = self.cfg.adapt, self.discriminators
        ctx.zero_grad(self.d_optimizer)
        for group in self.d_optimizer.param_groups:
            group["lr"] = a.d_lr * ctx.lr_factor  # the model's poly schedule
        with ctx.autocast():
            loss_d = sum(0.5 * self._gan(discriminators[k](p), a.source_label) for k, p in probs_s.items())
            loss_d = loss_d + sum(0.5 * self._gan(discriminators[k](p.detach()), a.target_label)
                                  for k, p in probs_t.items())
        ctx.backward(loss_d)
        if ctx.last_micro_step:
            average_across_processes(self.discriminators)
        ctx.step(self.d_optimizer)
        return loss_d

    def _softmaxes(self, output, size) -> dict[str, torch.Tensor]:
        """What the discriminators see: the softmax of the upsampled main (and first auxiliary) logits, in the
        autocast dtype, as AdaptSegNet feeds its discriminators."""
        return upsampled_softmaxes(output, size, "aux" in self.discriminators, float32=False)

    def _gan(self, d_out: torch.Tensor, label: float) -> torch.Tensor:
        d_out = d_out.float()
        return self.gan_loss(d_out, torch.full_like(d_out, label))

    def get_extra_state(self):
        return {"d_optimizer": self.d_optimizer.state_dict()}

    def set_extra_state(self, state):
        self.d_optimizer.load_state_dict(state["d_optimizer"])


def average_across_processes(module: nn.Module) -> None:
    """Average a strategy-owned module's gradients over DDP processes (it is not wrapped in DDP itself).
    A no-op without an initialised process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    for p in module.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(world)
