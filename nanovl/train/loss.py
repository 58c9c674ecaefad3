"""The supervised loss: next-token cross-entropy on fp32 logits, -100 labels ignored, weighted per sample.

    loss = sum_t w_t * CE_t / sum_t w_t,   w_t = f(x) for every learned token t of a sample with x learned tokens
    token: f = 1 (the mean over the batch's learned tokens; the original's non-packed loss)
    sample: f = 1/x (every sample counts the same)      square: f = 1/sqrt(x) (InternVL2.5 / 3 SFT)

The original applies `sample` and `square` only to packed data (--use_packed_ds) and silently ignores them otherwise;
nanovl applies them as named, packed or not. With several processes, all_reduce=True averages the denominator over
the ranks (the original's --loss_reduction_all_gather), so that after gradient averaging the objective is the global
weighted mean; otherwise each rank divides by its own sum, as the original does by default.
"""
import torch
import torch.distributed as dist

from nanovl.template import IGNORE

REDUCTIONS = ("token", "sample", "square")


def token_weights(labels: torch.Tensor, loss_reduction: str = "token", segment_ids=None) -> torch.Tensor:
    """(B, T) labels -> (B, T) float32 weights: f(x) on learned tokens (labels != -100), 0 elsewhere; x counts the
    learned tokens of each sample (a row, or with segment_ids (B, T) each packed sample of a row)."""
    if loss_reduction not in REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {', '.join(REDUCTIONS)}, got {loss_reduction!r}")
    learned = (labels != IGNORE).float()
    if segment_ids is None:
        x = learned.sum(1, keepdim=True).expand_as(learned)  # (B, T): learned tokens of the token's row
    else:  # per packed sample: the count of each segment, gathered back to its tokens
        seg = segment_ids.long()
        x = torch.zeros(labels.shape[0], int(seg.max()) + 1).scatter_add_(1, seg, learned).gather(1, seg)
    power = {"token": 0.0, "sample": 1.0, "square": 0.5}[loss_reduction]
    return learned * x.clamp(min=1) ** -power


def compute_loss(model, batch: dict, loss_reduction: str = "token", all_reduce: bool = False,
                 return_parts: bool = False):
    """The scalar loss of one (micro-)batch from collate() (or the packed collate); loss.backward() fills the
    parameters' .grad. return_parts: (loss, sum of w*CE, sum of w, learned tokens) for logging and accumulation."""
    if not batch:
        raise ValueError("an empty batch (every sample was bad)")
    device = model.device
    ce = model(batch["input_ids"].to(device), pixel_values=batch["pixel_values"].to(device),
               image_flags=batch["image_flags"].to(device), position_ids=batch["position_ids"].to(device),
               labels=batch["labels"].to(device), segment_ids=_to(batch.get("segment_ids"), device))  # (B, T) fp32
    w = token_weights(batch["labels"], loss_reduction, batch.get("segment_ids")).to(device)
    w[:, 0] = 0  # the first token is never predicted
    numerator, denominator = (ce * w).sum(), w.sum()
    if all_reduce and dist.is_initialized() and dist.get_world_size() > 1:
        denominator = denominator.detach().clone()
        dist.all_reduce(denominator, op=dist.ReduceOp.SUM)
        denominator = denominator / dist.get_world_size()
    loss = numerator / denominator.clamp(min=1e-12)
    if return_parts:
        return loss, numerator.detach(), w.sum().detach(), int((batch["labels"][:, 1:] != IGNORE).sum())
    return loss


def _to(t, device):
    return None if t is None else t.to(device)
