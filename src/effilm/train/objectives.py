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
    extras: dict = field(default_factory=dict)  # further sums over the micro-batch's units (DPO rewards), for the logs


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
        inputs, targets, doc_ids = self.targets(batch, ctx.device)
        with autocast(ctx.device, ctx.amp):
            # the LM head and the loss in one chunked pass: the [tokens, vocab] logits are never held
            out = model(inputs, doc_ids=doc_ids, targets=targets)
        ce_sum = out.ce_sum
        loss = ce_sum * (ctx.world_size / ctx.global_count)
        loss = loss + moe_penalty(model, out.routing, ctx, ctx.world_size / ctx.global_count)
        return MicroLoss(loss, ce_sum.detach(), out.routing)

    def val_sums(self, model, batch, device, amp) -> torch.Tensor:
        """``[loss sum, units]`` of a held-out micro-batch (no gradient)."""
        inputs, targets, doc_ids = self.targets(batch, device)
        with autocast(device, amp):
            ce = model(inputs, doc_ids=doc_ids, targets=targets).ce_sum
        return torch.stack([ce.double(), ce.new_tensor(float((targets != IGNORE).sum()), dtype=torch.float64)])


def moe_penalty(model, routing: list, ctx: StepContext, z_scale: float):
    """The MoE terms of a micro-batch's loss: the load-balancing loss with routing counts summed over
    all ranks, weighted by the micro-batch's share, plus the router z-loss sum times ``z_scale``."""
    from effilm.models.moe import load_balancing_loss

    if not routing:
        return 0.0
    m = model_config(model).moe
    z = torch.stack([s.z_sum for s in routing]).mean()
    if not m.trained_aux_coef:  # loss-free balancing (or no Switch loss): no counts to share
        return m.z_loss_coef * z * z_scale
    counts = torch.stack([s.counts_E for s in routing])  # [L, E]
    if ctx.reduce_counts is not None:
        counts = ctx.reduce_counts(counts)  # routing counts of this micro-batch over all ranks
    n_global_micro = routing[0].n_tokens * ctx.world_size
    # rank r's share of the global micro-batch loss E * sum_e f_e * P_e: P_e's sum over ranks
    # is split across the ranks' gradients, which FSDP/DDP average, hence the world_size factor
    aux = torch.stack([
        load_balancing_loss(c, s.prob_sum_E * ctx.world_size, n_global_micro, s.top_k, m.aux_loss_convention)
        for c, s in zip(counts, routing, strict=True)
    ]).mean()  # fmt: skip
    return m.trained_aux_coef * ctx.share * aux + m.z_loss_coef * z * z_scale


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


def sequence_logps(model, tokens: torch.Tensor, loss_mask: torch.Tensor, device, amp) -> tuple[torch.Tensor, list]:
    """Each row's summed log-probability of its masked-in next tokens (fp32), and the MoE routing
    statistics. Rows are right-padded; the mask is 0 on the padding. Only the masked-in positions'
    logits are formed (``logits_at``): [answer tokens, V], not [rows, T, V]."""
    tokens = tokens.to(device)
    keep = loss_mask.to(device)[:, 1:].bool()
    with autocast(device, amp):
        out = model(tokens[:, :-1], logits_at=keep)
    logits = out.logits.float()
    logp = logits.gather(-1, tokens[:, 1:][keep][:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
    per_token = torch.zeros(keep.shape, device=device, dtype=torch.float32).masked_scatter(keep, logp)
    return per_token.sum(dim=1), out.routing  # a dense sum: deterministic on every device (index_add is not on CUDA)


class DirectPreference:
    """DPO (and IPO, hinge) on preference pairs: each micro-batch holds ``n`` pairs as ``2n`` rows
    (chosen sides, then rejected sides). With log-ratios ``rc = logp_c - ref_c`` and ``rr = logp_r
    - ref_r`` of the answers' summed log-probabilities against the reference model:

    * sigmoid (DPO): ``-log sigmoid(beta * (rc - rr))``;
    * ipo: ``(rc / nc - rr / nr - 1 / (2 beta))^2`` with ``nc``, ``nr`` the answers' token counts;
    * hinge: ``max(0, 1 - beta * (rc - rr))``.

    The step's loss is the mean over the global batch's pairs. Logged beside it: the rewards
    ``beta * rc`` and ``beta * rr``, their margin, and the preference accuracy (the fraction of
    pairs whose chosen reward is the larger), each averaged over the global batch, as TRL does.

    The reference log-probabilities come from ``reference`` (a :class:`ReferenceLogps`, computed
    once before training) or, with a ``reference_model``, from a frozen model in memory.
    """

    name = "dpo"
    METRICS = ("rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy")

    def __init__(self, beta: float = 0.1, loss: str = "sigmoid"):
        self.beta, self.loss = float(beta), loss
        self.reference = None  # ReferenceLogps
        self.reference_model = None

    def targets(self, batch, device):
        raise EffilmError("objective 'dpo' scores preference pairs, not packed targets")

    def global_count(self, batches: list, dist) -> int:
        local = sum(b.tokens.shape[0] // 2 for b in batches)
        return int(dist.all_reduce_sum(torch.tensor(float(local), dtype=torch.float64, device=dist.device)))

    def reference_logps(self, batch, device, amp) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference_model is not None:
            with torch.no_grad():
                logps, _ = sequence_logps(self.reference_model, batch.tokens, batch.loss_mask, device, amp)
            n = batch.tokens.shape[0] // 2
            return logps[:n], logps[n:]
        if self.reference is None:
            raise EffilmError("objective 'dpo': no reference log-probabilities were computed")
        return self.reference.lookup(batch.sources, batch.pairs, device)

    def pair_terms(self, logps, ref_chosen, ref_rejected, loss_mask):
        """Per pair: ``(loss, chosen reward, rejected reward)``."""
        import torch.nn.functional as F

        n = logps.shape[0] // 2
        rc, rr = logps[:n] - ref_chosen, logps[n:] - ref_rejected
        if self.loss == "sigmoid":
            loss = -F.logsigmoid(self.beta * (rc - rr))
        elif self.loss == "hinge":
            loss = torch.relu(1 - self.beta * (rc - rr))
        else:  # ipo: the margin per answer token
            counts = loss_mask.to(logps.device)[:, 1:].sum(dim=1).clamp_min(1).to(logps.dtype)
            loss = (rc / counts[:n] - rr / counts[n:] - 1 / (2 * self.beta)) ** 2
        return loss, self.beta * rc.detach(), self.beta * rr.detach()

    def micro_loss(self, model, batch, ctx: StepContext) -> MicroLoss:
        ref_c, ref_r = self.reference_logps(batch, ctx.device, ctx.amp)
        logps, routing = sequence_logps(model, batch.tokens, batch.loss_mask, ctx.device, ctx.amp)
        loss, chosen, rejected = self.pair_terms(logps, ref_c, ref_r, batch.loss_mask)
        loss_sum = loss.sum()
        total = loss_sum * (ctx.world_size / ctx.global_count)
        if routing:
            tokens = routing[0].n_tokens
            total = total + moe_penalty(model, routing, ctx, ctx.share / max(tokens, 1))
        extras = {"rewards_chosen": chosen.sum(), "rewards_rejected": rejected.sum(),
                  "rewards_margin": (chosen - rejected).sum(), "rewards_accuracy": (chosen > rejected).sum()}  # fmt: skip
        return MicroLoss(total, loss_sum.detach(), routing, {k: v.double() for k, v in extras.items()})

    def val_sums(self, model, batch, device, amp) -> torch.Tensor:
        """``[loss sum, pairs]`` of a held-out micro-batch (no gradient)."""
        ref_c, ref_r = self.reference_logps(batch, device, amp)
        logps, _ = sequence_logps(model, batch.tokens, batch.loss_mask, device, amp)
        loss, chosen, rejected = self.pair_terms(logps, ref_c, ref_r, batch.loss_mask)
        return torch.stack([loss.sum().double(), loss.new_tensor(float(len(loss)), dtype=torch.float64)])


class ReferenceLogps:
    """The reference model's summed answer log-probabilities of every pair of every preference
    source (``{source: float64 [pairs, 2]}``, chosen then rejected), computed once before training."""

    def __init__(self, table: dict):
        self.table = table

    def lookup(self, sources: list[str], pairs, device):
        rows = torch.stack([self.table[s][int(p)] for s, p in zip(sources, pairs, strict=True)])
        rows = rows.to(device=device, dtype=torch.float32)
        return rows[:, 0], rows[:, 1]

    @classmethod
    def compute(cls, model, datasets: dict, micro_batch: int, device, amp, dist, progress: bool = False):
        """Score every pair with ``model`` (no gradient); ranks split the pairs and share the result."""
        from tqdm.auto import tqdm

        from effilm.data.loader import pair_rows

        was_training = model.training
        model.eval()
        table = {}
        with torch.no_grad():
            for name, ds in datasets.items():
                n = ds.num_documents // 2
                out = torch.zeros(n, 2, dtype=torch.float64, device=dist.device)
                # every rank runs the same number of forwards (a sharded model needs all of them)
                rounds = range(0, n, micro_batch * dist.world_size)
                for base in tqdm(rounds, desc=f"reference log-probs ({name})", unit="batch", disable=not progress):
                    start = base + dist.rank * micro_batch
                    pairs = list(range(start, min(start + micro_batch, n))) or [0]
                    tokens, mask = pair_rows([ds] * len(pairs), pairs, ds.eos_id)
                    logps, _ = sequence_logps(model, torch.from_numpy(tokens), torch.from_numpy(mask), device, amp)
                    if start < n:
                        k = len(pairs)
                        out[start : start + k, 0] = logps[:k].double().to(out.device)
                        out[start : start + k, 1] = logps[k:].double().to(out.device)
                table[name] = dist.all_reduce_sum(out).cpu()
        model.train(was_training)
        return cls(table)


IGNORE = -100  # the target index the loss skips
OBJECTIVES: dict[str, type] = {"lm": LanguageModeling, "sft": SupervisedFineTuning, "dpo": DirectPreference}


def make_objective(name: str = "lm", dpo=None) -> Objective:
    if name == "dpo":
        return DirectPreference(dpo.beta, dpo.loss) if dpo is not None else DirectPreference()
    return OBJECTIVES[name]()
