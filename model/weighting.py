"""Task weighting: how the per-task losses L_i become one gradient step (``train.weighting``).

Each scheme is a ``TaskWeighting`` whose ``backward(losses, z, model, seen)`` fills ``.grad`` of the
model's parameters (and of its own, if it learns any) and returns the scalar objective for logging;
``after_step()`` runs after the optimiser step; ``weights()`` are the current effective per-task
weights (logged per step and epoch). ``z`` is the network's shared representation (see
``model.nets``). Static task weights (``tasks[].weight``) are used by ``static`` only; the other
schemes set the weights themselves.

``seen`` (T,) bool marks the tasks with at least one observed label in the batch (labels may be
missing, e.g. satisfaction only after a click). A task without labels has no loss to weigh: it is
left out of the scheme for that step (its loss, a graph-keeping zero, is not a real 0), so it does
not pull uncertainty's s_i down, take MGDA's whole weight, or drag GradNorm's means.

- static       L = sum_i w_i L_i.
- uncertainty  Kendall, Gal & Cipolla, CVPR 2018. Learned s_i = log sigma_i^2 (trained jointly by
               the main optimiser, initialised at 0):
                   regression (Gaussian likelihood): 0.5 * exp(-s_i) * L_i + 0.5 * s_i
                   binary (Boltzmann likelihood):          exp(-s_i) * L_i + 0.5 * s_i
               i.e. weight c_i exp(-s_i), c_i = 1/2 for regression and 1 for classification, plus
               the log sigma_i = s_i / 2 penalty that keeps sigma from growing without bound.
               At the optimum exp(-s_i) = 1 / (2 c_i L_i): each task ends up weighted
               c_i exp(-s_i) = 1 / (2 L_i).
- mgda         Sener & Koltun, NeurIPS 2018, MGDA-UB: the min-norm point of the convex hull of the
               task gradients g_i = dL_i/dz w.r.t. the shared representation z (one backward to z
               per task); the shared parameters then descend L = sum_i alpha_i L_i and the task-specific ones
               their own task's L_t (the paper's Algorithm 2). Two tasks: the closed form
               alpha = clip(((g2 - g1) . g2) / ||g1 - g2||^2, 0, 1); more: Frank-Wolfe on the Gram
               matrix. A scheme-level rescaling is not applied: sum_i alpha_i = 1. The bound
               needs every shared parameter below z; where the arch has no such z
               (``MultiTaskNet.z_bounds_shared`` False: PLE, Conditioned) the gradients are taken
               w.r.t. the shared parameters themselves (exact MGDA, one backward per task); with
               nothing shared (separate towers) the weights are equal.
- worst_case   Minimax over normalised losses r_i = L_i / R_i: L = tau * log sum_i exp(r_i / tau)
               (a smooth max, >= max_i r_i and at most tau * log T above it; its gradient weights
               task i by softmax(r / tau)_i / R_i), or the hard max_i r_i when
               ``temperature`` tau = 0 (``[train.weighting.worst_case]``). The reference R_i (``reference``):
               "constant" (default), the loss of the best constant predictor on the training
               labels, i.e. the label entropy H(mean y) for a binary head (r_i is then the
               normalised entropy of He et al., ADKDD 2014) and the label variance for a
               regression head (r_i = 1 - R^2), so r_i ~ 1 means "learned nothing yet" for a rare
               and a common label alike; or "initial", L_i(0), the first training batch's losses,
               which at a zero-logit start makes a rare binary label look nearly solved (its loss
               drops from log 2 to its small entropy at once) and starves it.
- gradnorm     Chen et al., ICML 2018 (``[train.weighting.gradnorm]``). Learnable w_i (init
               1, own Adam optimiser with ``lr``); G_i = w_i ||dL_i/dW|| on the last shared
               layer's weight W (or on z when nothing is shared); target
               G_bar * (r_i / mean r)^alpha with r_i = L_i / R_i treated as a constant; the w_i
               descend sum_i |G_i - target_i| while the network descends sum_i w_i L_i; after
               each step w is clipped positive and rescaled to sum to T.
               R_i (``reference``): "constant" (default, as for worst_case: r_i is then
               how far a task is from a constant predictor) or "initial", the paper's L_i(0) (r_i
               the inverse training rate), under which a rare binary label looks trained at once
               (see worst_case) and its weight is driven down.
- pcgrad       Yu et al., NeurIPS 2020. Per-task gradients on the shared parameters; each g_i is
               projected off the normal plane of every g_j (random order) it conflicts with
               (g_i . g_j < 0); the projected gradients are summed. Task-specific parameters get
               their own task's gradient.

``tower_l2_penalty`` (soft parameter sharing, Duong et al. 2015) is a regulariser on the towers,
added by the trainer after the scheme's backward.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from model.config import PlainWeighting, TaskConfig, TrainConfig, WorstCaseConfig
from model.nets import MultiTaskNet

log = logging.getLogger(__name__)


def _stack(losses: Mapping[str, Tensor], tasks: Sequence[TaskConfig]) -> Tensor:
    return torch.stack([losses[t.name] for t in tasks])  # (T,)


def _seen(seen: Tensor | Sequence[bool] | None, n_tasks: int) -> Tensor:
    """(T,) bool: the tasks with observed labels in the batch (all of them when not given)."""
    if seen is None:
        return torch.ones(n_tasks, dtype=torch.bool)
    out = torch.as_tensor(seen, dtype=torch.bool).cpu()
    if out.shape != (n_tasks,):
        raise ValueError(f"seen must have one flag per task ({n_tasks}), got shape {tuple(out.shape)}")
    return out


def _trainable(params: Sequence[Tensor]) -> list[Tensor]:
    return [p for p in params if p.requires_grad]


def _flat_grads(loss: Tensor, params: Sequence[Tensor], retain: bool = True) -> Tensor:
    """d loss / d params flattened into one vector (zeros for parameters the loss does not reach;
    a sparse embedding gradient is densified)."""
    grads = torch.autograd.grad(loss, list(params), retain_graph=retain, allow_unused=True)
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g.to_dense() if g.is_sparse else g).flatten()
            for g, p in zip(grads, params, strict=True)
        ]
    )


class Reducer(Protocol):
    """Sums over the ranks of a data-parallel job (``model.replica.Replica``)."""

    world: int

    def sum(self, t: Tensor) -> Tensor: ...


def _global(t: Tensor, replica: Reducer | None) -> Tensor:
    """The mean over ranks of a per-rank quantity whose global value is that mean (each rank's
    losses are already scaled to their share of the global batch's)."""
    if replica is None or replica.world == 1:
        return t
    return replica.sum(t.detach().clone()) / replica.world


class TaskWeighting(nn.Module):
    """Base class; subclasses override ``objective`` (and ``backward`` if they need gradients)."""

    def __init__(self, tasks: Sequence[TaskConfig]) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.last_weights: Tensor = torch.ones(len(self.tasks))

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def objective(self, losses: Tensor, seen: Tensor | None = None) -> Tensor:
        """losses (T,) -> scalar over the ``seen`` tasks; sets ``last_weights`` (the effective
        d objective / d L_i)."""
        raise NotImplementedError

    def backward(
        self,
        losses: Mapping[str, Tensor],
        z: Tensor,
        model: MultiTaskNet,
        seen: Tensor | None = None,
        replica: Reducer | None = None,
    ) -> Tensor:
        """Fills the gradients of this rank's losses (the trainer averages them over ranks; a
        scheme whose weights depend on the losses or gradients computes them from ``replica``'s
        global values, so every rank weighs alike)."""
        total = self.objective(_stack(losses, self.tasks), _seen(seen, len(self.tasks)))
        total.backward()  # type: ignore[no-untyped-call]
        return total.detach()

    def extra_state(self) -> dict[str, Any]:
        """State outside the module's parameters and buffers (for resuming a run)."""
        return {"last_weights": self.last_weights}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.last_weights = state["last_weights"]

    def after_step(self) -> None:
        """Runs after the optimiser step (GradNorm updates and renormalises its weights here)."""

    def weights(self) -> dict[str, float]:
        return {n: float(w) for n, w in zip(self.names, self.last_weights, strict=True)}

    def stats(self) -> dict[str, float]:
        """Scheme-specific diagnostics for the history (e.g. PCGrad's gradient cosine)."""
        return {}

    def extra_parameters(self) -> list[nn.Parameter]:
        """Parameters the main optimiser should train with the model (uncertainty's s_i)."""
        return []


class StaticWeighting(TaskWeighting):
    w: Tensor

    def __init__(self, tasks: Sequence[TaskConfig]) -> None:
        super().__init__(tasks)
        self.register_buffer("w", torch.tensor([t.weight for t in self.tasks], dtype=torch.float32))
        self.last_weights = self.w.clone()

    def objective(self, losses: Tensor, seen: Tensor | None = None) -> Tensor:
        return (self.w * losses).sum()  # an unseen task's loss is a graph-keeping 0 already


def uncertainty_objective(
    losses: Tensor, log_vars: Tensor, kinds: Sequence[str], seen: Tensor | None = None
) -> Tensor:
    """Kendall et al.: sum_i c_i exp(-s_i) L_i + 0.5 s_i, c_i = 0.5 (regression) or 1 (binary),
    over the ``seen`` tasks (an unseen task's s_i gets no gradient)."""
    c = torch.tensor(
        [0.5 if k == "regression" else 1.0 for k in kinds], dtype=losses.dtype, device=losses.device
    )
    terms = c * torch.exp(-log_vars) * losses + 0.5 * log_vars  # (T,)
    return terms.sum() if seen is None else terms[seen.to(terms.device)].sum()


class UncertaintyWeighting(TaskWeighting):
    def __init__(self, tasks: Sequence[TaskConfig]) -> None:
        super().__init__(tasks)
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks)))  # s_i = log sigma_i^2
        self.kinds = [t.kind for t in self.tasks]

    def objective(self, losses: Tensor, seen: Tensor | None = None) -> Tensor:
        c = torch.tensor([0.5 if k == "regression" else 1.0 for k in self.kinds], device=self.log_vars.device)
        self.last_weights = (c * torch.exp(-self.log_vars)).detach()
        return uncertainty_objective(losses, self.log_vars, self.kinds, seen)

    def extra_parameters(self) -> list[nn.Parameter]:
        return [self.log_vars]

    def stats(self) -> dict[str, float]:
        return {f"log_var/{n}": float(s) for n, s in zip(self.names, self.log_vars.detach(), strict=True)}


def min_norm_2(v11: Tensor, v12: Tensor, v22: Tensor) -> Tensor:
    """argmin_{a in [0,1]} ||a u + (1-a) v||^2 from u.u, u.v, v.v (i.e. ((v-u).v) / ||u-v||^2)."""
    denom = v11 + v22 - 2 * v12
    if float(denom) <= 1e-20:  # u == v: every point of the segment is the same
        return torch.tensor(0.5, dtype=v11.dtype)
    return ((v22 - v12) / denom).clamp(0.0, 1.0)


def min_norm_coefficients(grads: Tensor, iters: int = 100, tol: float = 1e-7) -> Tensor:
    """alpha on the simplex minimising ||sum_i alpha_i g_i||^2; grads (T, P) -> alpha (T,).

    T = 2 exactly (closed form); T > 2 by Frank-Wolfe on the Gram matrix with exact line search,
    started from the best two-task solution (approximate: FW converges sublinearly).
    """
    return min_norm_from_gram(grads @ grads.T, iters, tol)


def min_norm_from_gram(gram: Tensor, iters: int = 100, tol: float = 1e-7) -> Tensor:
    """``min_norm_coefficients`` from the Gram matrix (T, T) of the gradients."""
    T = gram.shape[0]
    grads = gram  # dtype carrier
    if T == 1:
        return torch.ones(1, dtype=grads.dtype)
    if T == 2:
        a = min_norm_2(gram[0, 0], gram[0, 1], gram[1, 1])
        return torch.stack([a, 1 - a])
    # start from the best pairwise solution (as the reference MinNormSolver does), then Frank-Wolfe
    best = math.inf
    alpha = torch.full((T,), 1.0 / T, dtype=grads.dtype)
    for i in range(T):
        for j in range(i + 1, T):
            a = min_norm_2(gram[i, i], gram[i, j], gram[j, j])
            value = float(a * a * gram[i, i] + 2 * a * (1 - a) * gram[i, j] + (1 - a) ** 2 * gram[j, j])
            if value < best:
                best, alpha = value, torch.zeros(T, dtype=grads.dtype)
                alpha[i], alpha[j] = a, 1 - a
    for _ in range(iters):
        m_alpha = gram @ alpha  # (T,) = g_i . (sum_j alpha_j g_j)
        t = int(torch.argmin(m_alpha))  # the vertex the linearisation points to
        # line search between the current point u = sum alpha g and the vertex v = g_t
        gamma = min_norm_2(alpha @ m_alpha, m_alpha[t], gram[t, t])  # weight on u
        new = gamma * alpha
        new[t] += 1 - gamma
        if float((new - alpha).abs().sum()) < tol:
            return new
        alpha = new
    return alpha


class MGDAWeighting(TaskWeighting):
    def objective(self, losses: Tensor, seen: Tensor | None = None) -> Tensor:
        """Equal weights 1/T' over the T' seen tasks (used when nothing shared is trainable)."""
        m = _seen(seen, len(self.tasks)).float()
        self.last_weights = m / m.sum().clamp_min(1.0)
        return (self.last_weights.to(losses.device) * losses).sum()

    def backward(
        self,
        losses: Mapping[str, Tensor],
        z: Tensor,
        model: MultiTaskNet,
        seen: Tensor | None = None,
        replica: Reducer | None = None,
    ) -> Tensor:
        ls = _stack(losses, self.tasks)
        m = _seen(seen, len(self.tasks))
        shared = _trainable(model.shared_parameters())
        # MGDA-UB: gradients of each task loss w.r.t. the shared representation z (batch flattened)
        # when every shared parameter lies below z; otherwise (or if z is constant because
        # everything below it is frozen) w.r.t. the trainable shared parameters themselves
        wrt: list[Tensor] = [z] if z.requires_grad and model.z_bounds_shared else shared
        if not shared or not wrt or int(m.sum()) < 2:
            return super().backward(losses, z, model, m)  # nothing to trade off: equal weights
        idx = m.nonzero().flatten().tolist()
        grads = torch.stack([_flat_grads(ls[i], wrt) for i in idx])  # (T', P)
        alpha = torch.zeros(len(self.tasks))
        if replica is None or replica.world == 1:
            alpha[idx] = min_norm_coefficients(grads.double()).float()
        else:
            # the global batch's Gram matrix: z is per row, so the ranks' partial Grams add up
            # (each rank's loss is its share of the global loss, hence the 1 / W per gradient);
            # gradients of shared parameters are averaged first
            g = grads.double()
            if wrt[0] is z:
                gram = replica.sum(g @ g.T) / replica.world**2
            else:
                g = replica.sum(g) / replica.world
                gram = g @ g.T
            alpha[idx] = min_norm_from_gram(gram).float()
        self.last_weights = alpha
        total = (alpha.to(ls.device) * ls).sum()
        # Algorithm 2: the shared parameters descend sum_i alpha_i L_i, the task-specific ones their
        # own task's plain gradient (a task's tower is reached by its own loss only)
        shared_ids = {id(p) for p in shared}
        own = [p for p in _trainable(list(model.parameters())) if id(p) not in shared_ids]
        total.backward(inputs=shared, retain_graph=bool(own))  # type: ignore[no-untyped-call]
        if own:
            ls.sum().backward(inputs=own)  # type: ignore[no-untyped-call]
        return total.detach()


def constant_predictor_losses(
    labels: npt.NDArray[np.floating[Any]], tasks: Sequence[TaskConfig]
) -> list[float]:
    """Per task, the loss of the best constant prediction on ``labels`` (N, T) (NaN = unobserved):
    the label entropy -(q log q + (1-q) log(1-q)), q = mean label, for binary heads (the log loss of
    predicting q), the label variance for regression heads (the MSE of predicting the mean)."""
    out = []
    for t, task in enumerate(tasks):
        y = labels[:, t].astype(np.float64)
        y = y[~np.isnan(y)]
        if len(y) == 0:
            raise ValueError(f"task {task.name!r} has no observed training labels")
        if task.kind == "binary":
            q = float(np.clip(y.mean(), 1e-12, 1 - 1e-12))
            out.append(-(q * math.log(q) + (1 - q) * math.log(1 - q)))
        else:
            out.append(float(y.var()))
    return out


class _LossReference:
    """R_i, what a task loss is normalised by: given (e.g. ``constant_predictor_losses``), or L_i(0),
    each task's loss on the first batch that has labels for it, when None."""

    def __init__(self, scheme: str, n_tasks: int, reference: Sequence[float] | None) -> None:
        self.value: Tensor | None = None
        if (ref := reference) is not None:
            if len(ref) != n_tasks:
                raise ValueError(f"need one reference loss per task, got {len(ref)}")
            if min(ref) < 1e-6:
                log.warning("%s: a task's constant-predictor loss is ~0 (constant label?): %s", scheme, ref)
            self.value = torch.tensor(ref, dtype=torch.float32).clamp_min(1e-6)

    def __call__(self, losses: Tensor, seen: Tensor) -> Tensor:
        """R (T,) on the losses' device; L_i(0) is taken from ``losses`` the first time task i is
        ``seen`` (a task not seen yet has R_i = NaN: callers use the seen tasks' entries only)."""
        if self.value is None:
            self.value = torch.full_like(losses.detach(), math.nan)
        elif self.value.device != losses.device:  # a given reference starts on the CPU
            self.value = self.value.to(losses.device)
        fill = seen.to(losses.device) & torch.isnan(self.value)
        if bool(fill.any()):
            self.value = torch.where(fill, losses.detach().clamp_min(1e-8), self.value)
        return self.value


class WorstCaseWeighting(TaskWeighting):
    def __init__(
        self, tasks: Sequence[TaskConfig], temperature: float, reference: Sequence[float] | None = None
    ) -> None:
        super().__init__(tasks)
        self.temperature = temperature
        self.reference = _LossReference("worst case", len(self.tasks), reference)

    def objective(self, losses: Tensor, seen: Tensor | None = None) -> Tensor:
        m = _seen(seen, len(self.tasks)).to(losses.device)
        ref = self.reference(losses, m)
        weights = torch.zeros_like(losses)
        if not bool(m.any()):
            self.last_weights = weights.detach().cpu()
            return losses.sum() * 0.0  # no task has labels in this batch
        r = losses[m] / ref[m]  # (T',)
        if self.temperature > 0:
            p = torch.softmax(r.detach() / self.temperature, dim=0)
            total = self.temperature * torch.logsumexp(r / self.temperature, dim=0)
        else:
            p = torch.nn.functional.one_hot(torch.argmax(r.detach()), len(r)).to(r.dtype)
            total = r.max()
        weights[m] = p / ref[m]
        self.last_weights = weights.detach().cpu()
        return total

    def backward(
        self,
        losses: Mapping[str, Tensor],
        z: Tensor,
        model: MultiTaskNet,
        seen: Tensor | None = None,
        replica: Reducer | None = None,
    ) -> Tensor:
        if replica is None or replica.world == 1:
            return super().backward(losses, z, model, seen)
        # the weights are a function of the global losses: take them there, then descend the
        # weighted sum of this rank's losses (whose average over ranks is the global gradient)
        ls = _stack(losses, self.tasks)
        total = self.objective(_global(ls, replica), _seen(seen, len(self.tasks)))
        (self.last_weights.to(ls.device) * ls).sum().backward()  # type: ignore[no-untyped-call]
        return total.detach()

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "reference": self.reference.value}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        super().load_extra_state(state)
        self.reference.value = state["reference"]


class GradNormWeighting(TaskWeighting):
    def __init__(
        self, tasks: Sequence[TaskConfig], alpha: float, lr: float, reference: Sequence[float] | None = None
    ) -> None:
        super().__init__(tasks)
        self.alpha = alpha
        self.w = nn.Parameter(torch.ones(len(self.tasks)))
        self.opt = torch.optim.Adam([self.w], lr=lr)
        self.reference = _LossReference("gradnorm", len(self.tasks), reference)
        self.last_weights = self.w.detach().clone()

    def backward(
        self,
        losses: Mapping[str, Tensor],
        z: Tensor,
        model: MultiTaskNet,
        seen: Tensor | None = None,
        replica: Reducer | None = None,
    ) -> Tensor:
        ls = _stack(losses, self.tasks)  # (T,)
        m = _seen(seen, len(self.tasks))
        ls_global = _global(ls, replica)
        ref = self.reference(ls_global, m)
        # W: the last shared layer's weight; z if nothing is shared; the trainable shared parameters
        # if W is frozen; nothing (then the weights just stay put) if all of those are frozen
        W: list[Tensor] = _trainable(model.last_shared_parameters()) or [z]
        if not W[0].requires_grad:
            W = list(_trainable(model.shared_parameters()))
        self.opt.zero_grad(set_to_none=True)
        idx = m.nonzero().flatten().tolist()  # the balance is struck among the tasks with labels
        if W and idx:
            # ||dL_i/dW||; G_i = w_i * norm_i, so dG_i/dw_i = norm_i (no double backward needed)
            grads = torch.stack([_flat_grads(ls[i], W) for i in idx]).detach()  # (T', P)
            if replica is not None and replica.world > 1 and W[0] is not z:
                grads = replica.sum(grads) / replica.world  # the global batch's gradients
            norms = grads.norm(dim=1)
            G = self.w[idx] * norms  # (T',)
            r = ls_global.detach()[idx] / ref[idx]
            target = (G.mean() * (r / r.mean()) ** self.alpha).detach()
            gn_loss = (G - target).abs().sum()
            gn_loss.backward(inputs=[self.w])
        w = self.w.detach()
        self.last_weights = w.clone()
        total = (w * ls).sum()
        total.backward()  # type: ignore[no-untyped-call]
        return total.detach()

    def after_step(self) -> None:
        self.opt.step()
        with torch.no_grad():
            self.w.clamp_(min=1e-3)
            self.w.mul_(len(self.tasks) / self.w.sum())

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "reference": self.reference.value, "opt": self.opt.state_dict()}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        super().load_extra_state(state)
        self.reference.value = state["reference"]
        self.opt.load_state_dict(state["opt"])


def pcgrad_project(grads: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """PCGrad surgery on per-task gradients (T, P) -> projected (T, P); sum them for the update."""
    T = grads.shape[0]
    out = grads.clone()
    for i in range(T):
        for j in torch.randperm(T, generator=generator).tolist():
            if j == i:
                continue
            dot = out[i] @ grads[j]
            if dot < 0:
                out[i] -= dot / (grads[j] @ grads[j]).clamp_min(1e-20) * grads[j]
    return out


class PCGradWeighting(TaskWeighting):
    def __init__(self, tasks: Sequence[TaskConfig]) -> None:
        super().__init__(tasks)
        self.cosine = math.nan
        # the projection order's generator (None: torch's global one); data-parallel ranks share a
        # seeded one, so they project in the same order
        self.generator: torch.Generator | None = None

    def backward(
        self,
        losses: Mapping[str, Tensor],
        z: Tensor,
        model: MultiTaskNet,
        seen: Tensor | None = None,
        replica: Reducer | None = None,
    ) -> Tensor:
        ls = _stack(losses, self.tasks)
        active = _seen(seen, len(self.tasks)).nonzero().flatten().tolist()  # tasks with labels
        params = _trainable(list(model.parameters()))
        shared_ids = {id(p) for p in model.shared_parameters()}
        shared = [p for p in params if id(p) in shared_ids]
        own = [p for p in params if id(p) not in shared_ids]
        per_task = {
            i: torch.autograd.grad(ls[i], params, retain_graph=i != active[-1], allow_unused=True)
            for i in active
        }
        index = {id(p): k for k, p in enumerate(params)}

        def grad(i: int, p: Tensor) -> Tensor:
            g = per_task[i][index[id(p)]]
            return torch.zeros_like(p) if g is None else g

        if shared and active:
            flat = torch.stack([torch.cat([grad(i, p).flatten() for p in shared]) for i in active])  # (T', P)
            if replica is not None and replica.world > 1:
                flat = replica.sum(flat) / replica.world  # the global batch's per-task gradients
            if len(active) == 2:
                self.cosine = float(flat[0] @ flat[1] / (flat[0].norm() * flat[1].norm()).clamp_min(1e-20))
            # every rank now holds the same projected gradient: averaging leaves it as it is
            combined = pcgrad_project(flat, self.generator).sum(dim=0)  # (P,)
            offset = 0
            for p in shared:
                p.grad = combined[offset : offset + p.numel()].view_as(p).clone()
                offset += p.numel()
        for p in own:  # task-specific: the plain sum (no grad at all if no task reaches it)
            if any(per_task[i][index[id(p)]] is not None for i in active):
                p.grad = sum((grad(i, p) for i in active), start=torch.zeros_like(p))
        return ls.sum().detach()

    def stats(self) -> dict[str, float]:
        return {} if math.isnan(self.cosine) else {"pcgrad/cosine": self.cosine}


def constant_predictor_losses_from_stats(
    stats: Sequence[Mapping[str, float]], tasks: Sequence[TaskConfig]
) -> list[float]:
    """``constant_predictor_losses`` from the labels' statistics (n, mean, var per task), as data
    preparation computes them without holding the labels."""
    out = []
    for s, task in zip(stats, tasks, strict=True):
        if s["n"] == 0:
            raise ValueError(f"task {task.name!r} has no observed training labels")
        if task.kind == "binary":
            q = float(np.clip(s["mean"], 1e-12, 1 - 1e-12))
            out.append(-(q * math.log(q) + (1 - q) * math.log(1 - q)))
        else:
            out.append(float(s["var"]))
    return out


def make_weighting(
    tc: TrainConfig,
    tasks: Sequence[TaskConfig],
    train_labels: npt.NDArray[np.floating[Any]] | Sequence[Mapping[str, float]] | None = None,
) -> TaskWeighting:
    """The scheme ``tc.weighting``; ``train_labels`` (N, T) -- or their statistics per task -- give
    worst_case and gradnorm their "constant" reference."""
    w = tc.weighting
    if isinstance(w, PlainWeighting):
        plain: dict[str, Callable[[Sequence[TaskConfig]], TaskWeighting]] = {
            "static": StaticWeighting,
            "uncertainty": UncertaintyWeighting,
            "mgda": MGDAWeighting,
            "pcgrad": PCGradWeighting,
        }
        return plain[w.kind](tasks)
    reference = None
    if w.reference == "constant":
        if train_labels is None:
            raise ValueError(f'{w.kind}: reference "constant" needs the training labels')
        if isinstance(train_labels, np.ndarray):
            reference = constant_predictor_losses(train_labels, tasks)
        else:
            reference = constant_predictor_losses_from_stats(train_labels, tasks)
    if isinstance(w, WorstCaseConfig):
        return WorstCaseWeighting(tasks, w.temperature, reference)
    return GradNormWeighting(tasks, w.alpha, w.lr, reference)


def tower_l2_penalty(model: MultiTaskNet) -> Tensor:
    """Soft parameter sharing: sum over task pairs and same-named, same-shaped tower parameters of
    ||theta_a - theta_b||^2 (0 when the towers are identical)."""
    towers = model.task_towers()
    params = {t: dict(m.named_parameters()) for t, m in towers.items()}
    names = list(params)
    total = torch.zeros(())
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            pa, pb = params[names[a]], params[names[b]]
            for k, v in pa.items():
                if k in pb and pb[k].shape == v.shape:
                    total = total + (v - pb[k]).pow(2).sum()
    return total
