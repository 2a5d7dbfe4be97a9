"""Splitting experts during training (``plan_kwargs={"split_experts_every": n}``).

Once two groups of cells share an expert, the similarity loss rarely separates them again,
even when it calls every pair between them dissimilar: moving cells to an unused expert has no
gradient (its gate probability is about 0), so the gate can only hand them to experts that
already hold other cells. :func:`split_experts` makes that move for the gate. For every expert
it proposes a split of its cells in two (2-means on the gate's hidden layer) and measures,
over the training minibatches, the share of known pairs across the two halves that the
similarity calls similar. When that share is far below the share at which the similarity
loss joins two groups (``w / (1 + w)``, ``w`` the weight of a dissimilar pair relative to a
similar one, see :func:`~scmoesim.module.similarity_bce`), one half moves to an unused expert
that starts as a copy of the old one. Training then goes on; if the split was wrong, the loss
joins the halves again.
"""

import torch

from ..module._losses import dissimilar_weight

#: Split when the similar share across the halves is below this fraction of the joining share.
STRICTNESS = 0.5
#: Experts with fewer cells in the pass are not split.
MIN_CELLS = 20
#: At most this many cells per expert go into the 2-means proposal.
MAX_CELLS = 2000
#: Logit difference between the two halves at the 2-means centres after the split.
MARGIN = 3.0


def two_means(h: torch.Tensor, n_iter: int = 25) -> torch.Tensor:
    """``(2, d)`` centres of a 2-means clustering of the rows of ``h``.

    Started from the two sides of the top principal direction (no random draws), then Lloyd
    iterations; a side left empty keeps its previous centre.
    """
    centred = h - h.mean(0)
    direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    side = centred @ direction > 0
    centres = (
        torch.stack([h[~side].mean(0), h[side].mean(0)])
        if side.any() and (~side).any()
        else h[:2].clone()
    )
    for _ in range(n_iter):
        side = torch.cdist(h, centres).argmin(1)
        for j in range(2):
            if (side == j).any():
                centres[j] = h[side == j].mean(0)
    return centres


def joining_share(similar: float, known: float, resolution: float | None) -> float:
    """Share of similar pairs between two groups above which the similarity loss joins them.

    ``resolution=None`` (the paper's weights): 1/2. A number ``r``: every dissimilar pair
    weighs ``w = r * n_similar / n_dissimilar``, joining pays from a share of ``w / (1 + w)``.
    """
    if resolution is None:
        return 0.5
    if similar >= known > 0:
        return 1.0
    counts = torch.tensor([similar, known], dtype=torch.float64)
    w = float(dissimilar_weight(resolution, counts[0], counts[1]))
    return w / (1.0 + w)


def _passes(module, dataloader):
    """Each minibatch as (inference outputs, S as booleans, mask); stops without a similarity.

    The builders leave the diagonal out of the mask, so ``mask`` holds the pairs the
    similarity loss counts.
    """
    device = module.gate_out.weight.device
    for tensors in dataloader:
        tensors = {k: v.to(device) for k, v in tensors.items()}
        inference = module.inference(**module._get_inference_input(tensors), use_mean=True)
        sim_mask = module.minibatch_similarity(tensors, library=inference["library"])
        if sim_mask is None:
            return
        s, mask = sim_mask
        yield inference, s.bool(), mask.bool()


@torch.no_grad()
def split_experts(module, dataloader) -> list[tuple[int, int]]:
    """Split every expert whose cells the similarity says are two groups; ``(source, target)``.

    Two passes over ``dataloader`` (the training minibatches) with the module in eval mode:
    the first collects each expert's cells (posterior means, the gate's hidden layer) and the
    similarity's overall share of similar pairs, the second counts the known pairs across
    each proposed split. Splits go to unused experts, the most clearly separated first, one
    per unused expert.
    """
    was_training = module.training
    module.eval()
    try:
        return _split(module, dataloader)
    finally:
        module.train(was_training)


def _split(module, dataloader) -> list[tuple[int, int]]:
    n_experts = module.n_experts
    hidden: list[list[torch.Tensor]] = [[] for _ in range(n_experts)]
    counts = torch.zeros(n_experts, dtype=torch.long)
    similar = known = 0.0
    for inference, s, mask in _passes(module, dataloader):
        expert = inference["expert"]
        similar += float((s & mask).sum())
        known += float(mask.sum())
        h = module.gate(inference["qz_m"])
        for k in expert.unique().tolist():
            rows = h[expert == k]
            if counts[k] < MAX_CELLS:  # every part is kept until then, so counts[k] is their size
                hidden[k].append(rows)
            counts[k] += rows.shape[0]
    unused = [k for k in range(n_experts) if counts[k] == 0]
    if not unused or known == 0:
        return []
    planes = {}
    for k in range(n_experts):
        if counts[k] >= MIN_CELLS:
            centres = two_means(torch.cat(hidden[k])[:MAX_CELLS])
            normal = centres[1] - centres[0]
            planes[k] = (normal, normal @ centres.mean(0))
    if not planes:
        return []
    across = torch.zeros(n_experts, 2)  # (similar, known) pairs across each proposed split
    for inference, s, mask in _passes(module, dataloader):
        expert = inference["expert"]
        h = module.gate(inference["qz_m"])
        for k in expert.unique().tolist():
            if k not in planes:
                continue
            rows = expert == k
            normal, offset = planes[k]
            side = h[rows] @ normal > offset
            pairs = mask[rows][:, rows] & (side[:, None] != side[None, :])
            across[k, 0] += float((s[rows][:, rows] & pairs).sum())
            across[k, 1] += float(pairs.sum())
    limit = STRICTNESS * joining_share(similar, known, module.similarity_resolution)
    share = across[:, 0] / across[:, 1].clamp_min(1.0)
    chosen = [k for k in planes if across[k, 1] > 0 and share[k] < limit]
    chosen.sort(key=lambda k: float(share[k]))
    done = []
    for source, target in zip(chosen, unused, strict=False):
        normal, offset = planes[source]
        scale = 2.0 * MARGIN / float(normal @ normal)
        module.split_expert(source, target, scale * normal, scale * offset)
        done.append((source, target))
    return done
