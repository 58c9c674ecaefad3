"""Mixed Preference Optimization (MPO), the last training stage of InternVL2.5-MPO / 3 / 3.5
(internvl_chat/internvl/train/internvl_chat_mpo.py and trainer_dpo.py, on TRL's DPOTrainer):

    loss = 0.8 * sigmoid + 0.2 * bco_pair + 1.0 * sft          (--sigmoid-loss-weight, --bco-pair-loss-weight, --rpo-alpha)
    sigmoid  = -log sigma(beta * (dc - dr))                     preference: chosen over rejected
    bco_pair = -log sigma(beta*dc - delta) - log sigma(-(beta*dr - delta))   quality: each answer on its own
    sft      = token-mean cross-entropy of the chosen answers    generation
    dc = log pi(chosen) - log ref(chosen), dr likewise; log pi(y) sums the answer's token log-probabilities;
    delta = the running mean of each step's mean of [beta*dc, beta*dr] (TRL's RunningMoments), updated before use.

Data: the original MPO JSONL ({"question", "chosen", "rejected", "image" | "video"}) or ms-swift's
{"messages", "rejected_response", "images"}, preprocessed with the template's supervised rules; chosen and rejected
share the images, and the ViT runs once for both.
"""
import json

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanovl.llm import token_losses
from nanovl.template import IGNORE
from nanovl.train.data import SupervisedDataset, _turns_from_messages
from nanovl.train.lora import adapters_disabled


def mpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             chosen_nll, beta: float = 0.1, weights=(0.8, 0.2, 1.0), delta: float = 0.0):
    """(B,) sequence log-probabilities of the policy and the reference, chosen_nll (the chosen answers' token-mean
    cross-entropy: a scalar, or (B,) per pair) -> (total, {"sigmoid", "bco_pair", "sft"}), each part a batch mean."""
    dc = policy_chosen_logps - reference_chosen_logps  # (B,)
    dr = policy_rejected_logps - reference_rejected_logps
    sigmoid = -F.logsigmoid(beta * (dc - dr))
    bco_pair = -F.logsigmoid(beta * dc - delta) - F.logsigmoid(-(beta * dr - delta))
    parts = {"sigmoid": sigmoid.mean(), "bco_pair": bco_pair.mean(), "sft": torch.as_tensor(chosen_nll).mean()}
    total = weights[0] * parts["sigmoid"] + weights[1] * parts["bco_pair"] + weights[2] * parts["sft"]
    return total, parts


class RunningMean:
    """TRL's RunningMoments: Welford's running mean of the values given to update(), across processes (each gives
    its own, all are counted); starts at mean 0 with a negligible count."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-24

    def update(self, x: torch.Tensor) -> float:
        xs = x.detach().float().reshape(-1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [torch.zeros_like(xs) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, xs)
            xs = torch.cat(gathered)
        var, mean = torch.var_mean(xs, unbiased=False)
        n, d = xs.numel(), float(mean) - self.mean
        total = self.count + n
        self.var = (self.var * self.count + d * d * self.count * n / total + float(var) * n) / total
        self.mean += d * n / total
        self.count = total
        return self.mean

    def state_dict(self) -> dict:
        return dict(mean=self.mean, var=self.var, count=self.count)

    def load_state_dict(self, s: dict) -> None:
        self.mean, self.var, self.count = s["mean"], s["var"], s["count"]


# -----------------------------------------------------------------------------
# data

class PreferenceDataset(SupervisedDataset):
    """The pairs of an MPO meta JSON / JSONL: ds[i] -> {"chosen_input_ids", "chosen_labels", "rejected_input_ids",
    "rejected_labels" (T,), "pixel_values", "image_flags"} (the tiles once, shared by both answers)."""

    @staticmethod
    def frame_prompt(n: int) -> str:
        """internvl_chat_mpo.py writes a video's frames as 'Frame1: <image>' lines, with no newline after the last."""
        return "\n".join(f"Frame{k + 1}: <image>" for k in range(n))

    def item(self, i: int) -> dict:
        d = json.loads(self.index[i][2])
        if not isinstance(d, dict):
            raise ValueError("a sample must be a JSON object")
        if "messages" in d:  # ms-swift: the last assistant message is the chosen answer
            turns, images, videos = _turns_from_messages(d)
            if not turns or turns[-1]["from"] != "gpt" or not isinstance(d.get("rejected_response"), str):
                raise ValueError("an ms-swift pair needs messages ending with the assistant's answer and a "
                                 "'rejected_response'")
            prompt, chosen, rejected = turns[:-1], turns[-1]["value"], d["rejected_response"]
            video, single = (videos[0] if videos else None), len(images) == 1
        else:
            for key in ("question", "chosen", "rejected"):
                if not isinstance(d.get(key), str):
                    raise ValueError(f"an MPO sample needs '{key}' (a string)")
            image = d.get("image")
            images = [] if not image else [image] if isinstance(image, str) else image
            prompt, chosen, rejected = [{"from": "human", "value": d["question"]}], d["chosen"], d["rejected"]
            video, single = (d.get("video") or None) if not images else None, isinstance(image, str)
        pixel_values, counts, flags = self.media(i, prompt, images, video, d.get("clip"), single)
        out = dict(pixel_values=pixel_values, image_flags=torch.full((len(pixel_values),), flags))
        for name, answer in (("chosen", chosen), ("rejected", rejected)):
            ids, labels = self.tokens(prompt + [{"from": "gpt", "value": answer}], counts)
            out[f"{name}_input_ids"], out[f"{name}_labels"] = torch.tensor(ids), torch.tensor(labels)
        return out


def collate_pairs(items: list, pad_token_id: int = 0) -> dict:
    """(2B, T) rows, the B chosen answers first, then the B rejected ones, right-padded to one length; the tiles of
    the B samples once (the model reuses their features for both halves)."""
    bad = {k: v for x in items if "bad" in x for k, v in x["bad"].items()}
    items = [x for x in items if "bad" not in x]
    if not items:
        return {"bad": bad} if bad else {}
    rows = [(x[f"{s}_input_ids"], x[f"{s}_labels"]) for s in ("chosen", "rejected") for x in items]
    T = max(len(ids) for ids, _ in rows)
    pad = lambda t, v: torch.cat([t, t.new_full((T - len(t),), v)])  # noqa: E731
    return dict(input_ids=torch.stack([pad(i, pad_token_id) for i, _ in rows]),
                labels=torch.stack([pad(lab, IGNORE) for _, lab in rows]),
                position_ids=torch.arange(T).expand(len(rows), T).clone(),
                attention_mask=torch.stack([torch.arange(T) < len(i) for i, _ in rows]),
                pixel_values=torch.cat([x["pixel_values"] for x in items]),
                image_flags=torch.cat([x["image_flags"] for x in items]), pairs=len(items),
                **({"bad": bad} if bad else {}))


# -----------------------------------------------------------------------------
# one step's loss

def sequence_logps(model, batch: dict, vit_embeds=None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (log-probability of each row's learned tokens, summed: (2B,), the per-token cross-entropy (2B, T)). The
    images are encoded once and their features used for the chosen and the rejected rows."""
    device = model.device
    if vit_embeds is None:
        vit = model.extract_feature(batch["pixel_values"].to(device))
        vit = vit[batch["image_flags"].to(device) == 1]
        vit_embeds = torch.cat([vit, vit])  # the chosen rows' images, then the rejected rows'
    ce = model(batch["input_ids"].to(device), vit_embeds=vit_embeds, position_ids=batch["position_ids"].to(device),
               labels=batch["labels"].to(device))
    return -ce.sum(1), ce


class MPO:
    """The MPO objective of a model (the policy) and its reference: a frozen copy, or the same model with its LoRA
    adapters disabled (no second copy). Called on a collate_pairs batch -> (loss, learned tokens, metrics)."""

    def __init__(self, model, reference=None, beta=0.1, weights=(0.8, 0.2, 1.0)):
        self.model, self.reference, self.beta, self.weights = model, reference, beta, weights
        self.running = RunningMean()

    @torch.no_grad()
    def reference_logps(self, batch) -> torch.Tensor:
        ref = self.reference if self.reference is not None else self.model
        was_training = ref.training
        ref.eval()  # as the original's reference (no drop path)
        try:
            if self.reference is None:
                with adapters_disabled(self.model):
                    return sequence_logps(ref, batch)[0]
            return sequence_logps(ref, batch)[0]
        finally:
            ref.train(was_training)

    def __call__(self, batch: dict):
        B = batch["pairs"]
        ref = self.reference_logps(batch).float()
        logps, ce = sequence_logps(self.model, batch)
        learned = batch["labels"][:B, 1:] != IGNORE
        nll = ce[:B].sum() / learned.sum().clamp(min=1)  # token mean over the chosen answers (TRL's nll_loss)
        rewards = self.beta * (logps.detach() - ref)  # (2B,): beta * dc, then beta * dr
        delta = self.running.update(rewards.mean())
        loss, parts = mpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], nll, self.beta, self.weights, delta)
        w = self.weights[0] + self.weights[1]  # the logged rewards are the loss-weighted sums, as the original logs
        chosen, rejected = w * rewards[:B], w * rewards[B:]
        metrics = {"rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
                   "rewards/accuracies": (chosen > rejected).float().mean().item(),
                   "rewards/margins": (chosen - rejected).mean().item(), "logps/chosen": logps[:B].mean().item(),
                   "logps/rejected": logps[B:].mean().item(), "delta": delta,
                   **{f"loss/{k}": v.item() for k, v in parts.items()}}
        return loss, int(learned.sum()), metrics
