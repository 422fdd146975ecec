r"""lightly's counterpart of each method, built from our resolved recipe (quality_vs_lightly.py).

One builder per method, named as the method in our registry: (recipe, encoder, feature_dim,
total_steps, joint) -> a Counterpart (below); the shared
loop, optimiser and evaluation are benchmarks/lightly_side.py's. Each uses lightly's own
components for the method (its heads, loss, memory banks, momentum update and schedule, view
transforms) configured with our recipe's values; where a lightly component cannot be
configured to do what ours does, docs/quality_vs_lightly.md ("Other methods") says so.

The loss each returns is scaled to the value our objective optimises (the same gradient up to
the components' differences), because LARS weighs the gradient against the weight decay; the
loop reports it divided by `loss_scale`, the method's own loss, as our side reports it.
"""

import copy
import dataclasses
from collections.abc import Callable

from lightly_side import encode, view_options


@dataclasses.dataclass
class Counterpart:
    """What the shared loop needs from one method's lightly counterpart."""

    transform: Callable
    modules: list  # trainable online modules besides the encoder
    all_modules: list  # every module, for train() / eval() and the device
    loss: Callable  # (view1, view2) -> (optimised loss, h [2n, feature_dim])
    before_step: Callable = lambda step: None
    loss_scale: float = 1.0  # optimised loss / reported loss


def _views_transform(recipe: dict):
    """lightly's BYOLTransform with each view's transform configured from our recipe."""
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform

    size = recipe["augment"]["image_size"]
    view1, view2 = recipe["views"]
    return BYOLTransform(
        view_1_transform=BYOLView1Transform(
            **view_options(view1, size), solarization_prob=view1["solarize_prob"]
        ),
        view_2_transform=BYOLView2Transform(
            **view_options(view2, size), solarization_prob=view2["solarize_prob"]
        ),
    )


def _heads(head, a, b, joint: bool):
    """A head over both views' rows: one pass (BN over 2n) or one pass per view."""
    if joint:
        import torch

        return head(torch.cat([a, b])).chunk(2)
    return head(a), head(b)


def _frozen_copy(module):
    from lightly.models.utils import deactivate_requires_grad

    twin = copy.deepcopy(module)
    deactivate_requires_grad(twin)
    return twin


def simclr(recipe, encoder, feature_dim, total_steps, joint) -> Counterpart:
    """SimCLRTransform, SimCLRProjectionHead, NTXentLoss x our loss_scale."""
    import torch
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform

    view = recipe["views"][0]
    transform = SimCLRTransform(**view_options(view, recipe["augment"]["image_size"]))
    model = recipe["model"]
    head = SimCLRProjectionHead(
        feature_dim, feature_dim, model["head_dim"], num_layers=model["head_layers"]
    )
    criterion = NTXentLoss(temperature=recipe["loss"]["temperature"])
    scale = recipe["loss"]["loss_scale"]

    def loss(view1, view2):
        h1, h2 = encode(encoder, view1, view2, joint)
        z1, z2 = _heads(head, h1, h2, joint)
        return scale * criterion(z1, z2), torch.cat([h1, h2])

    return Counterpart(transform, [head], [encoder, head], loss, loss_scale=scale)


def byol(recipe, encoder, feature_dim, total_steps, joint) -> Counterpart:
    """BYOLProjectionHead, BYOLPredictionHead, NegativeCosineSimilarity, update_momentum with
    cosine_schedule(tau_base -> 1) at the start of each step (lightly's BYOL example)."""
    import torch
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import update_momentum
    from lightly.utils.scheduler import cosine_schedule

    method = recipe["method"]
    dim = method["projector_dim"]
    projector = BYOLProjectionHead(feature_dim, method["projector_hidden_dim"], dim)
    predictor = BYOLPredictionHead(dim, method["predictor_hidden_dim"], dim)
    target_encoder, target_projector = _frozen_copy(encoder), _frozen_copy(projector)
    criterion = NegativeCosineSimilarity()

    def before_step(step):
        tau = cosine_schedule(step, total_steps, method["tau_base"], 1.0)
        update_momentum(encoder, target_encoder, m=tau)
        update_momentum(projector, target_projector, m=tau)

    def loss(view1, view2):
        h1, h2 = encode(encoder, view1, view2, joint)
        p1, p2 = _heads(predictor, *_heads(projector, h1, h2, joint), joint)
        with torch.no_grad():
            t1, t2 = _heads(target_projector, *encode(target_encoder, view1, view2, joint), joint)
        # Ours: sum over both directions of mean(2 - 2 cos) (BYOL eq. 2, symmetrised).
        value = 4 + 2 * (criterion(p1, t2) + criterion(p2, t1))
        return value, torch.cat([h1, h2])

    modules = [encoder, projector, predictor, target_encoder, target_projector]
    return Counterpart(_views_transform(recipe), [projector, predictor], modules, loss, before_step)


def mocov2(recipe, encoder, feature_dim, total_steps, joint) -> Counterpart:
    """MoCoProjectionHead (2 layers, no BN), NTXentLoss with a memory bank of queue_size keys
    (the queue: positive + the bank's keys, view 2's keys enqueued), update_momentum at a
    constant momentum (lightly's MoCo example)."""
    import torch
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import update_momentum

    method = recipe["method"]
    dim = method["projector_dim"]
    head = MoCoProjectionHead(feature_dim, method["projector_hidden_dim"], dim)
    key_encoder, key_head = _frozen_copy(encoder), _frozen_copy(head)
    criterion = NTXentLoss(
        temperature=method["temperature"], memory_bank_size=(method["queue_size"], dim)
    )

    def before_step(step):
        update_momentum(encoder, key_encoder, m=method["momentum"])
        update_momentum(head, key_head, m=method["momentum"])

    def loss(view1, view2):
        h1, h2 = encode(encoder, view1, view2, joint)  # both: the probe trains on both views
        query = head(h1)
        with torch.no_grad():
            key = key_head(key_encoder(view2))
        return criterion(query, key), torch.cat([h1, h2])

    modules = [encoder, head, key_encoder, key_head, criterion]
    return Counterpart(_views_transform(recipe), [head], modules, loss, before_step)


def barlow_twins(recipe, encoder, feature_dim, total_steps, joint) -> Counterpart:
    """BarlowTwinsProjectionHead, BarlowTwinsLoss(lambda) x our loss_scale."""
    import torch
    from lightly.loss import BarlowTwinsLoss
    from lightly.models.modules import BarlowTwinsProjectionHead

    method = recipe["method"]
    scale = method["loss_scale"]
    head = BarlowTwinsProjectionHead(
        feature_dim, method["projector_hidden_dim"], method["projector_dim"]
    )
    criterion = BarlowTwinsLoss(lambda_param=method["lambd"])

    def loss(view1, view2):
        h1, h2 = encode(encoder, view1, view2, joint)
        return scale * criterion(*_heads(head, h1, h2, joint)), torch.cat([h1, h2])

    return Counterpart(_views_transform(recipe), [head], [encoder, head], loss, loss_scale=scale)


def vicreg(recipe, encoder, feature_dim, total_steps, joint) -> Counterpart:
    """VICRegProjectionHead (3 layers), VICRegLoss(sim, std, cov coefficients)."""
    import torch
    from lightly.loss import VICRegLoss
    from lightly.models.modules.heads import VICRegProjectionHead

    method = recipe["method"]
    head = VICRegProjectionHead(
        feature_dim, method["projector_hidden_dim"], method["projector_dim"], num_layers=3
    )
    criterion = VICRegLoss(
        lambda_param=method["sim_coeff"], mu_param=method["std_coeff"], nu_param=method["cov_coeff"]
    )

    def loss(view1, view2):
        h1, h2 = encode(encoder, view1, view2, joint)
        return criterion(*_heads(head, h1, h2, joint)), torch.cat([h1, h2])

    return Counterpart(_views_transform(recipe), [head], [encoder, head], loss)


def nnclr(recipe, encoder, feature_dim, total_steps, joint) -> Counterpart:
    """NNCLRProjectionHead, NNCLRPredictionHead, NNMemoryBankModule (the support set), and
    0.5 (NTXentLoss(nn1, p2) + NTXentLoss(nn2, p1)) (lightly's NNCLR example)."""
    import torch
    from lightly.loss import NTXentLoss
    from lightly.models.modules import (
        NNCLRPredictionHead,
        NNCLRProjectionHead,
        NNMemoryBankModule,
    )

    method = recipe["method"]
    dim = method["projector_dim"]
    projector = NNCLRProjectionHead(feature_dim, method["projector_hidden_dim"], dim)
    predictor = NNCLRPredictionHead(dim, method["predictor_hidden_dim"], dim)
    support = NNMemoryBankModule(size=(method["queue_size"], dim))
    criterion = NTXentLoss(temperature=method["temperature"])

    def loss(view1, view2):
        h1, h2 = encode(encoder, view1, view2, joint)
        z1, z2 = _heads(projector, h1, h2, joint)
        p1, p2 = _heads(predictor, z1, z2, joint)
        # lightly's example order: both look up the bank as it was before this step; view 2's
        # projections are enqueued (ours enqueues view 1's).
        nn1 = support(z1.detach(), update=False)
        nn2 = support(z2.detach(), update=True)
        return 0.5 * (criterion(nn1, p2) + criterion(nn2, p1)), torch.cat([h1, h2])

    modules = [encoder, projector, predictor, support]
    return Counterpart(_views_transform(recipe), [projector, predictor], modules, loss)
