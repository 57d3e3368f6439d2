"""Training objectives: the loss of one micro-batch, normalised over the global batch.

One optimizer step covers ``global_batch`` sequences, split over ranks and micro-batches. An
objective first says how many units the whole step's loss is averaged over (:meth:`global_count`:
target tokens for language modelling), then gives each micro-batch's loss as a *sum* divided by
that global count, so the summed gradients equal the gradient of the global-batch mean however
the batch is split. The trainer (:mod:`effilm.train.loop`) runs every objective the same way;
post-training objectives (SFT, DPO) are classes beside :class:`LanguageModeling`.

Language modelling (per micro-batch, ``share`` its fraction of the global batch):

* cross-entropy: sum over the micro-batch's targets / global target count;
* router z-loss: sum of logsumexp(logits)^2 over the micro-batch's tokens / global token count;
* load-balancing loss: E * sum_e f_e * P_e with the routing counts f summed over all ranks (one
  small all-reduce), weighted by ``share``. Its *reported* value uses counts and probabilities
  summed over every micro-batch and rank, so it is the global batch's loss whatever the split;
  the gradient of the split version is the mean of the micro-batches' gradients
  (docs/ARCHITECTURE.md explains why).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from effilm.errors import EffilmError


@dataclass
class StepContext:
    """What a micro-batch's loss needs to know about the step it belongs to."""

    device: torch.device
    amp: torch.dtype | None = None  # autocast dtype (bf16 on CUDA) or None
    world_size: int = 1
    global_count: int = 1  # the units the step's loss is averaged over, on all ranks together
    share: float = 1.0  # this micro-batch's fraction of the global batch
    reduce_counts: Callable[[torch.Tensor], torch.Tensor] | None = None  # sum over ranks (None: one process)


@dataclass
class MicroLoss:
    loss: torch.Tensor  # what to backpropagate
    loss_sum: torch.Tensor  # the objective's summed loss over this micro-batch (detached), for the logs
    routing: list = field(default_factory=list)  # MoE routing statistics per layer


class Objective(Protocol):
    name: str

    def global_count(self, batches: list, dist) -> int: ...

    def micro_loss(self, model, batch: Any, ctx: StepContext) -> MicroLoss: ...

    def targets(self, batch: Any, device): ...


def autocast(device: torch.device, amp: torch.dtype | None):
    """bf16 autocast when ``amp`` is set, else nothing."""
    return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()


def model_config(model):
    return getattr(model, "_orig_mod", model).cfg


def lm_targets(batch, device):
    """``(inputs, targets, doc_ids)`` of a packed batch: targets are the inputs shifted by one."""
    tokens = batch.tokens.to(device, non_blocking=True)
    doc_ids = batch.doc_ids.to(device)[:, :-1] if batch.doc_ids is not None else None
    return tokens[:, :-1], tokens[:, 1:], doc_ids


class LanguageModeling:
    """Next-token cross-entropy over every target token, plus the MoE auxiliary losses."""

    name = "lm"

    def targets(self, batch, device):
        """``(inputs, targets, doc_ids)``; a target of -100 counts for nothing."""
        return lm_targets(batch, device)

    def global_count(self, batches: list, dist) -> int:
        # every rank holds micro-batches of the same shape, so no collective is needed
        return sum(b.tokens[:, 1:].numel() for b in batches) * dist.world_size

    def micro_loss(self, model, batch, ctx: StepContext) -> MicroLoss:
        from effilm.models.moe import load_balancing_loss

        inputs, targets, doc_ids = self.targets(batch, ctx.device)
        with autocast(ctx.device, ctx.amp):
            # the LM head and the loss in one chunked pass: the [tokens, vocab] logits are never held
            out = model(inputs, doc_ids=doc_ids, targets=targets)
        ce_sum = out.ce_sum
        loss = ce_sum * (ctx.world_size / ctx.global_count)
        if out.routing:
            m = model_config(model).moe
            counts = torch.stack([s.counts_E for s in out.routing])  # [L, E]
            if ctx.reduce_counts is not None:
                counts = ctx.reduce_counts(counts)  # routing counts of this micro-batch over all ranks
            n_global_micro = out.routing[0].n_tokens * ctx.world_size
            # rank r's share of the global micro-batch loss E * sum_e f_e * P_e: P_e's sum over ranks
            # is split across the ranks' gradients, which FSDP/DDP average, hence the world_size factor
            aux = torch.stack([
                load_balancing_loss(c, s.prob_sum_E * ctx.world_size, n_global_micro, s.top_k, m.aux_loss_convention)
                for c, s in zip(counts, out.routing, strict=True)
            ]).mean()  # fmt: skip
            z = torch.stack([s.z_sum for s in out.routing]).mean()
            loss = loss + m.aux_loss_coef * ctx.share * aux + m.z_loss_coef * z * (ctx.world_size / ctx.global_count)
        return MicroLoss(loss, ce_sum.detach(), out.routing)


class SupervisedFineTuning(LanguageModeling):
    """SFT: cross-entropy over the masked-in targets only (chat data: the assistant turns and their
    end-of-turn tokens), divided by the count of those targets in the *global* batch (summed over
    micro-batches and ranks), so any split of the batch gives the same gradient."""

    name = "sft"

    def targets(self, batch, device):
        inputs, targets, doc_ids = lm_targets(batch, device)
        if batch.loss_mask is None:
            raise EffilmError("objective 'sft' needs loss masks: tokenize chat data with `effilm data tokenize --chat`")
        keep = batch.loss_mask.to(device)[:, 1:].bool()
        return inputs, targets.masked_fill(~keep, IGNORE), doc_ids

    def global_count(self, batches: list, dist) -> int:
        local = sum(int(b.loss_mask[:, 1:].sum()) if b.loss_mask is not None else 0 for b in batches)
        total = int(dist.all_reduce_sum(torch.tensor(float(local), dtype=torch.float64, device=dist.device)))
        if total == 0:
            raise EffilmError("objective 'sft': a global batch holds no assistant tokens to learn from")
        return total


IGNORE = -100  # the target index the loss skips
OBJECTIVES: dict[str, type] = {"lm": LanguageModeling, "sft": SupervisedFineTuning}


def make_objective(name: str = "lm") -> Objective:
    return OBJECTIVES[name]()
