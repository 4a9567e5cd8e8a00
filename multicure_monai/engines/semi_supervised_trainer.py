"""The two-network semi-supervised trainer of Karimijafarbigloo et al. (MIDL 2024) as a MONAI Ignite engine.

MONAI's :class:`~monai.engines.SupervisedTrainer` trains one network on one stream of labelled batches. The
method needs two networks (a predictive V-Net that teaches and an auxiliary ResNet-VNet with the MultiCURE
block that learns from it) and two data streams (labelled and unlabelled) per iteration, so this module
subclasses :class:`SupervisedTrainer` and replaces only its ``_iteration``; everything else (events, handlers,
AMP scaler, ``prepare_batch``, ``max_epochs``/``epoch_length``, MONAI Label's ``BundleTrainTask`` overrides)
is MONAI's own.

One iteration (``L = L_s + lambda_u * L_u + lambda_c(t) * L_c``, eqs. 1-3 of the paper)::

    x = cat(x_l, x_u)                                    (B_l + B_u, C, H, W, D)
    P = softmax(predictive(x))                           teacher probabilities
    U = max_c P < tau                                    binary uncertainty map, fed to MultiCURE
    A = softmax(auxiliary(x, U))                         student probabilities
    L_s = DiceCE(P_l, y_l) + DiceCE(A_l, y_l)            trains both nets
    L_u = PL(A_u, argmax P_u | conf > 0.7)               trains the auxiliary net only (teacher detached)
          + lambda_reg * L1(A_u, P_u on argmax A_u XOR argmax P_u)
                                                         trains the auxiliary net only by default
                                                         (``detach_predictive_in_reg=True``: eq. 2 compares A_u
                                                         with the pseudo label); False also trains the
                                                         predictive net (MCF's mutual correction)
    L_c = sum over ``contrastive_networks`` and feature levels of the prototype contrastive loss (eqs. 4-5),
          each net on its own projected decoder features; reliable voxels (conf > tau) build the class
          prototypes, uncertain voxels (conf < tau, as in the uncertainty map) are pulled to their class
          prototype; the class of a voxel is the ground truth on labelled images and the predictive net's argmax
          on unlabelled ones;
          conf is always the predictive net's confidence (it is the net that defines uncertainty).

Which net teaches (``teacher``): ``"predictive"`` is the paper (the V-Net's pseudo labels train the auxiliary
net); ``"better"`` is MCF's dynamic competition (each iteration the net with the lower ``L_s`` on the labelled
batch teaches the other, so a worse or collapsing V-Net never teaches); ``"ema"`` is UA-MT/mean-teacher style
(an exponential moving average of the predictive net teaches both nets). The uncertainty map fed to MultiCURE is
always the predictive net's (the architecture's coupling); the reliable/uncertain split and the pseudo labels of
``L_u`` and ``L_c`` come from the teacher.

The engine's output dict carries ``image``, ``label``, ``pred`` (predictive logits of the labelled batch),
``loss`` and every term (``loss_sup``, ``loss_pseudo``, ``loss_reg``, ``loss_unsup``, ``loss_contrastive``,
``lambda_c``, ``uncertain_fraction``, ``pseudo_mask_fraction``), so ``StatsHandler``,
``TensorBoardStatsHandler`` and the progress bar show them without knowing the method, and diagnostics under
``diag_*`` (``L_s`` per net, predicted and true foreground fraction on the labelled
crops, the teacher, the weights, the contrastive loss against its chance value, and every
``diagnostics_interval`` iterations the gradient norm each weighted loss sends into each net).

The module is longer than the project's ~400-line guide (about 530 lines, a third of them argument docs and checks)
on purpose: it has one job, one iteration of the method, and its data flow (which net sees what, which term trains
which net, which net teaches) reads in one place; splitting the loss assembly from the forward passes would put
the two halves of that flow in different files. Everything around the iteration lives elsewhere: the unlabelled
stream (:mod:`.cycling_loader`), the teacher choice (:mod:`.teachers`), diagnostics and the NaN guard
(:mod:`.diagnostics`), BatchNorm recalibration (:mod:`.batchnorm_recalibration`), seeding (:mod:`.determinism`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.engines.workflow import Workflow
from monai.utils.enums import CommonKeys as Keys
from torch.optim.optimizer import Optimizer

from multicure_monai.engines.cycling_loader import CyclingLoader
from multicure_monai.engines.diagnostics import check_finite_losses, loss_gradient_norms
from multicure_monai.engines.teachers import TEACHERS, select_teacher
from multicure_monai.losses.prototype_contrastive import PrototypeContrastiveLoss
from multicure_monai.losses.pseudo_label import PseudoLabelLoss
from multicure_monai.metrics.calibration import boundary_band
from multicure_monai.precision import (
    autocast,
    guard_small_convolutions,
    log_precision,
    needs_grad_scaler,
    resolve_amp_dtype,
)
from multicure_monai.uncertainty import uncertainty_map

__all__ = ["SemiSupervisedTrainer", "LOSS_TERMS", "TEACHERS", "CONTRASTIVE_ANCHORS", "CONTRASTIVE_BAND_WIDTH"]

LOSS_TERMS = ("loss", "loss_sup", "loss_pseudo", "loss_reg", "loss_unsup", "loss_contrastive")
_NETWORK_NAMES = ("predictive", "auxiliary")
CONTRASTIVE_ANCHORS = ("all", "labelled", "band")
#: Half-width in voxels of the ground-truth boundary band that ``contrastive_anchors="band"`` pulls.
CONTRASTIVE_BAND_WIDTH = 2


def _plain(x: Any) -> Any:
    """Drop MONAI's MetaTensor wrapper (its per-op metadata bookkeeping costs time in the hot loop)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else x


class SemiSupervisedTrainer(SupervisedTrainer):
    """Semi-supervised trainer with a predictive and an auxiliary network, a labelled and an unlabelled stream.

    Args:
        device: device to train on.
        max_epochs: number of epochs; with ``epoch_length`` this gives the iteration budget
            (the paper: 6000 iterations).
        train_data_loader: loader of labelled batches (``image`` (B_l, C, H, W, D), ``label`` (B_l, 1, H, W, D)).
        network: the predictive network (teacher), called as ``network(x, return_features=...)``.
        aux_network: the auxiliary network (student), called as ``aux_network(x, uncertainty, return_features=...)``.
        optimizer: one optimizer over the parameters of both networks.
        loss_function: supervised loss on logits and integer labels, e.g. ``DiceCELoss(to_onehot_y=True,
            softmax=True)``; applied to both networks (eq. 1).
        unlabeled_data_loader: loader of unlabelled batches (``image`` only). It is cycled independently of the
            labelled loader (re-iterated when exhausted, calling ``sampler.set_epoch`` when the sampler has one).
        pseudo_label_loss: ``loss(aux_logits, teacher_probs)``, the confidence-masked CE + Dice of eq. 2.
        regularization_loss: ``loss(aux_probs, pred_probs)``, the XOR-masked L1 of eq. 2.
        contrastive_loss: ``loss(features, labels, reliable, uncertain)``, eqs. 4-5.
        lambda_u: weight of the unsupervised loss (paper: a constant 1.0), a float or a callable of the (1-based)
            iteration number, e.g. a :class:`~multicure_monai.schedules.ContrastiveWeightSchedule` ramp-up
            (UA-MT/MCF ramp their unsupervised weight; the paper does not).
        lambda_reg: weight of the XOR regularisation inside ``L_u``.
        contrastive_weight: ``lambda_c``, a float or a callable of the (1-based) iteration number.
        uncertainty_threshold: confidence below which a voxel is uncertain (map for MultiCURE, and the
            reliable/uncertain split of the contrastive loss).
        contrastive_networks: which networks' features the contrastive loss trains (``"predictive"``,
            ``"auxiliary"``).
        teacher: ``"predictive"`` (the paper), ``"better"`` (MCF: the net with the lower labelled ``L_s`` of the
            iteration teaches the other) or ``"ema"`` (``ema_network`` teaches both nets); see the module docstring.
        ema_network: the EMA teacher for ``teacher="ema"``, e.g. ``torch.optim.swa_utils.AveragedModel(
            predictive, multi_avg_fn=get_ema_multi_avg_fn(0.99), use_buffers=True)``; updated from the predictive
            net after every optimizer step.
        contrastive_anchors: which uncertain voxels eq. 5 pulls to their prototype: ``"all"`` (the paper: on
            unlabelled images with the teacher's own argmax as their class) or ``"labelled"`` (only the labelled
            images' uncertain voxels, with their ground truth; unlabelled reliable voxels still build prototypes),
            so no net is trained on labels of voxels its teacher is unsure of), or ``"band"`` (every labelled voxel
            within ``CONTRASTIVE_BAND_WIDTH`` voxels of the ground-truth surface, sure or not, with its ground truth:
            hard voxels whose class the features can learn to separate; the uncertain ones alone were not).
        diagnostics_interval: every this many iterations the output carries the gradient norm each weighted loss
            term sends into each net (``diag_grad_<term>_<net>``; one extra backward pass per term); 0 disables.
        detach_predictive_in_reg: stop the XOR regularisation's gradient into the predictive net (default). With
            False the regulariser also pulls the teacher towards the student; on the half-resolution LA data
            that feedback collapsed both nets to empty predictions once ``lambda_u`` had ramped up.
        predictive_uses_uncertainty: the predictive net holds a MultiCURE block (authors' released code); it
            then gets the uncertainty map of a first, gradient-free pass of itself.
        supervised_only: ablation baseline; trains both nets on labelled data only with ``L_s`` (same
            networks, same budget); the unlabelled loader is ignored.
        empty_unlabeled: what to do when there is no unlabelled data: ``"warn"`` (fall back to
            supervised-only with a warning) or ``"error"``.
        channels_last: feed the networks ``channels_last_3d`` tensors (convert the networks too, e.g.
            ``net.to(memory_format=torch.channels_last_3d)``); on CPU (oneDNN) this makes 3D convolutions
            several times faster, most of all their backward pass (see ``benchmarks/train_step.py``).
        kwargs: passed to :class:`~monai.engines.SupervisedTrainer` (``epoch_length``, ``train_handlers``,
            ``prepare_batch``, ...). ``amp=True`` runs the forward passes under autocast on CUDA and CPU alike, in
            the precision :func:`multicure_monai.precision.resolve_amp_dtype` picks from ``amp_kwargs["dtype"]``
            (``"auto"`` when absent: float16 on CUDA, bfloat16 on a CPU with bf16, else float32); losses and
            metrics stay float32, and a gradient scaler is used for CUDA float16 only. Under CPU bfloat16 the
            nets' ``nn.Conv3d`` modules become :class:`~multicure_monai.precision.SmallMapSafeConv3d` (float32
            on maps smaller than the kernel, where oneDNN's bfloat16 weight gradient is wrong).
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: torch.nn.Module,
        aux_network: torch.nn.Module,
        optimizer: Optimizer,
        loss_function: Callable,
        unlabeled_data_loader: Iterable | None = None,
        pseudo_label_loss: Callable | None = None,
        regularization_loss: Callable | None = None,
        contrastive_loss: Callable | None = None,
        lambda_u: float | Callable[[int], float] = 1.0,
        lambda_reg: float = 1.0,
        contrastive_weight: float | Callable[[int], float] = 0.0,
        uncertainty_threshold: float = 0.7,
        contrastive_networks: Sequence[str] = _NETWORK_NAMES,
        detach_predictive_in_reg: bool = True,
        predictive_uses_uncertainty: bool = False,
        teacher: str = "predictive",
        ema_network: torch.nn.Module | None = None,
        contrastive_anchors: str = "all",
        diagnostics_interval: int = 0,
        supervised_only: bool = False,
        empty_unlabeled: str = "warn",
        channels_last: bool = False,
        **kwargs: Any,
    ) -> None:
        if not 0.0 < uncertainty_threshold < 1.0:
            raise ValueError(f"uncertainty_threshold must be in (0, 1), got {uncertainty_threshold}.")
        if max_epochs < 1:
            raise ValueError(f"max_epochs must be a positive integer, got {max_epochs}.")
        for name, value in (("lambda_u", lambda_u), ("lambda_reg", lambda_reg)):
            if not callable(value) and value < 0:
                raise ValueError(f"{name} must be non-negative, got {value}.")
        if not callable(contrastive_weight) and contrastive_weight < 0:
            raise ValueError(f"contrastive_weight must be non-negative, got {contrastive_weight}.")
        unknown = set(contrastive_networks) - set(_NETWORK_NAMES)
        if unknown:
            raise ValueError(f"contrastive_networks must be among {_NETWORK_NAMES}, got {sorted(unknown)}.")
        if teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {TEACHERS}, got {teacher!r}.")
        if teacher == "ema" and ema_network is None:
            raise ValueError("teacher='ema' needs an ema_network (e.g. torch.optim.swa_utils.AveragedModel).")
        if contrastive_anchors not in CONTRASTIVE_ANCHORS:
            raise ValueError(f"contrastive_anchors must be one of {CONTRASTIVE_ANCHORS}, got {contrastive_anchors!r}.")
        if diagnostics_interval < 0:
            raise ValueError(f"diagnostics_interval must be >= 0, got {diagnostics_interval}.")
        if empty_unlabeled not in ("warn", "error"):
            raise ValueError(f"empty_unlabeled must be 'warn' or 'error', got {empty_unlabeled!r}.")
        amp_kwargs = dict(kwargs.pop("amp_kwargs", None) or {})
        amp_dtype = amp_kwargs.pop("dtype", "auto")  # resolved per device here, not handed to torch as is
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            amp_kwargs=amp_kwargs,
            **kwargs,
        )
        #: the autocast dtype of the forward passes, ``None`` for float32 (``amp`` off or not available here)
        self.amp_dtype = resolve_amp_dtype(device, amp_dtype) if self.amp else None
        if self.amp:
            log_precision(device, self.amp_dtype, amp_dtype, "training")
        if self.amp_dtype == torch.bfloat16 and torch.device(device).type == "cpu":
            guard_small_convolutions(network, aux_network, ema_network)  # see multicure_monai.precision
        self.aux_network = aux_network
        self.pseudo_label_loss = pseudo_label_loss
        self.regularization_loss = regularization_loss
        self.contrastive_loss = contrastive_loss
        self.lambda_u = lambda_u if callable(lambda_u) else float(lambda_u)
        self.lambda_reg = float(lambda_reg)
        self.contrastive_weight = contrastive_weight
        self.uncertainty_threshold = float(uncertainty_threshold)
        self.contrastive_networks = tuple(contrastive_networks)
        self.detach_predictive_in_reg = detach_predictive_in_reg
        self.predictive_uses_uncertainty = predictive_uses_uncertainty
        self.teacher = teacher
        self.ema_network = ema_network
        self.contrastive_anchors = contrastive_anchors
        self.diagnostics_interval = int(diagnostics_interval)
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format

        if not supervised_only:
            if unlabeled_data_loader is None or _is_empty(unlabeled_data_loader):
                message = "no unlabelled data: the semi-supervised losses need an unlabelled stream"
                if empty_unlabeled == "error":
                    raise ValueError(message + " (empty_unlabeled='error').")
                warnings.warn(message + "; training falls back to supervised-only (L_s).", stacklevel=2)
                supervised_only = True
            elif pseudo_label_loss is None and regularization_loss is None and contrastive_loss is None:
                raise ValueError("semi-supervised training needs at least one of the unsupervised losses.")
        self.supervised_only = supervised_only
        self.unlabeled_data_loader = None if supervised_only else unlabeled_data_loader
        self._unlabeled = None if self.unlabeled_data_loader is None else CyclingLoader(self.unlabeled_data_loader)

    def run(self) -> None:  # type: ignore[override]
        """Train. MONAI's ``Trainer.run`` makes a CUDA ``GradScaler`` for any ``amp``; this one makes it for CUDA
        float16 only (:func:`~multicure_monai.precision.needs_grad_scaler`), then runs MONAI's workflow."""
        self.scaler = torch.amp.GradScaler("cuda") if needs_grad_scaler(self.state.device, self.amp_dtype) else None
        Workflow.run(self)

    # ------------------------------------------------------------------ data
    def _next_unlabeled(self) -> torch.Tensor:
        """Next unlabelled image batch (B_u, C, H, W, D) on the engine's device, cycling the loader."""
        assert self._unlabeled is not None
        batch = self._unlabeled.next()
        image = batch[Keys.IMAGE] if isinstance(batch, dict) else batch
        return _plain(image).to(self.state.device, non_blocking=self.non_blocking)

    @property
    def _unlabeled_epoch(self) -> int:
        """Passes over the unlabelled loader so far (its ``sampler.set_epoch`` value)."""
        return 0 if self._unlabeled is None else self._unlabeled.epoch

    def reset_unlabeled_stream(self, sampler_epoch: int | None = None) -> None:
        """Start the unlabelled stream afresh: the next batch comes from a new iterator over the loader.

        Used at epoch starts by :class:`multicure_monai.engines.determinism.EpochSeedHandler`, so that the
        unlabelled batches of an epoch depend on the epoch's seed only (bit-identical resume).

        Args:
            sampler_epoch: value for the loader's ``sampler.set_epoch`` (distributed shuffling) of the new
                iterator; ``None`` keeps counting from the current one.
        """
        if self._unlabeled is not None:
            self._unlabeled.reset(sampler_epoch)

    def lambda_c(self, iteration: int) -> float:
        """The contrastive weight at a 1-based iteration number."""
        return _weight_at(self.contrastive_weight, iteration)

    @property
    def uses_autocast(self) -> bool:
        """Whether the forward passes run under autocast (``amp`` and a reduced precision on this device)."""
        return self.amp_dtype is not None

    def autocast(self) -> torch.autocast:
        """The autocast context of the networks' forward passes (disabled when :attr:`uses_autocast` is False)."""
        return autocast(self.state.device, self.amp_dtype)

    def training_inputs(self, num_batches: int) -> Iterator[torch.Tensor]:
        """``num_batches`` network inputs built like an iteration's ``x``: a labelled batch (a fresh pass over the
        labelled loader, restarted when it runs out) followed by the next unlabelled batch (none when
        supervised-only), on the engine's device, ``(B_l + B_u, C, H, W, D)``."""
        labelled: Iterator | None = None
        for _ in range(int(num_batches)):
            batchdata = next(labelled, None) if labelled is not None else None
            if batchdata is None:
                labelled = iter(self.data_loader)
                batchdata = next(labelled)
            batch = self.prepare_batch(batchdata, self.state.device, self.non_blocking, **self.to_kwargs)
            x = _plain(batch[0])
            if not self.supervised_only:
                x = torch.cat([x, self._next_unlabeled()], dim=0)
            yield x.contiguous(memory_format=self.memory_format)

    def forward_networks(
        self, x: torch.Tensor, with_features_p: bool = False, with_features_a: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor] | None, torch.Tensor, list[torch.Tensor] | None]:
        """Both nets on ``x`` as in training: the predictive net, its uncertainty map, the auxiliary net on it.

        Returns:
            ``(logits_p, probs_p, feats_p, logits_a, feats_a)``: logits ``(B, N, H, W, D)``, the predictive net's
            float32 softmax (the uncertainty map's source), the projected decoder features of a net when asked
            for (this package's nets hand them over deferred, as ``ProjectedFeatures``), else ``None``.
        """
        pred_uncertainty = None
        if self.predictive_uses_uncertainty:
            with torch.no_grad():
                pred_uncertainty = uncertainty_map(
                    torch.softmax(self.network(x).float(), dim=1), self.uncertainty_threshold
                )
        logits_p, feats_p = self._forward(self.network, x, pred_uncertainty, with_features_p)
        probs_p = torch.softmax(logits_p.float(), dim=1)
        unc = uncertainty_map(probs_p, self.uncertainty_threshold)  # detached inside
        logits_a, feats_a = self._forward(self.aux_network, x, unc, with_features_a)
        return logits_p, probs_p, feats_p, logits_a, feats_a

    # ------------------------------------------------------------- iteration
    def _iteration(self, engine: SupervisedTrainer, batchdata: dict[str, torch.Tensor]) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        x_l, y_l = _plain(batch[0]), _plain(batch[1])
        if y_l is None:
            raise ValueError("the labelled loader must provide 'label'.")
        x_u = None if self.supervised_only else self._next_unlabeled()
        n_l = x_l.shape[0]
        x = (x_l if x_u is None else torch.cat([x_l, x_u], dim=0)).contiguous(memory_format=self.memory_format)

        lambda_c = 0.0 if self.supervised_only or self.contrastive_loss is None else self.lambda_c(engine.state.iteration)
        use_contrastive = lambda_c > 0.0
        engine.state.output = {Keys.IMAGE: x_l, Keys.LABEL: y_l}

        self.network.train()
        self.aux_network.train()
        self.optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        terms = self._compute_losses(x, y_l, n_l, lambda_c, use_contrastive)
        weighted = terms.pop("_weighted")
        interval = self.diagnostics_interval
        if interval and engine.state.iteration % interval == 0:
            nets = {"predictive": self.network, "auxiliary": self.aux_network}
            terms.update(loss_gradient_norms(weighted, nets, prefix="diag_grad_"))
        engine.state.output.update(terms)
        engine.state.output[Keys.PRED] = terms.pop("_pred")
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)

        loss = engine.state.output[Keys.LOSS]
        check_finite_losses(engine.state.output, engine.state.iteration, LOSS_TERMS)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            self.optimizer.step()
        if self.teacher == "ema":
            assert self.ema_network is not None
            self.ema_network.update_parameters(_unwrap(self.network))
        engine.state.output.pop("_pred", None)
        for key in LOSS_TERMS:
            if key in engine.state.output:
                engine.state.output[key] = engine.state.output[key].detach()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def _compute_losses(
        self, x: torch.Tensor, y_l: torch.Tensor, n_l: int, lambda_c: float, use_contrastive: bool
    ) -> dict[str, Any]:
        """Forward both nets on ``x`` (labelled first) and compute every loss term; see the module docstring.

        Only the forward passes run under autocast; the losses take float32 logits and probabilities (the
        contrastive loss sums its features in float32 itself)."""
        want_p = use_contrastive and "predictive" in self.contrastive_networks
        want_a = use_contrastive and "auxiliary" in self.contrastive_networks
        with self.autocast():
            logits_p, probs_p, feats_p, logits_a, feats_a = self.forward_networks(x, want_p, want_a)
        probs_a = torch.softmax(logits_a.float(), dim=1)

        labels = y_l.long()
        sup_p = self.loss_function(logits_p[:n_l].float(), labels).mean()
        sup_a = self.loss_function(logits_a[:n_l].float(), labels).mean()
        loss_sup = sup_p + sup_a
        zero = loss_sup.new_zeros(())
        loss_pseudo, loss_reg, loss_contrastive = zero, zero, zero
        pseudo_fraction = zero
        teacher_index = 0  # 0: predictive, 1: auxiliary, 2: EMA
        diag: dict[str, Any] = {}
        if not self.supervised_only:
            with self.autocast():  # the EMA teacher's forward pass
                teacher_index, teacher_probs, students = select_teacher(
                    self.teacher, x, (logits_p, probs_p, sup_p), (logits_a, probs_a, sup_a), self.ema_network
                )
            teacher_u = teacher_probs[n_l:]
            fractions = []
            for s_logits, s_probs in students:
                if self.pseudo_label_loss is not None:
                    term, stats = _with_stats(self.pseudo_label_loss, s_logits[n_l:].float(), teacher_u)
                    loss_pseudo = loss_pseudo + term
                    if "mask_fraction" in stats:
                        fractions.append(float(stats["mask_fraction"]))
                if self.regularization_loss is not None and self.lambda_reg > 0:
                    # detach_predictive_in_reg=False (MCF's mutual correction) is only defined for the paper's teacher
                    target = teacher_u if self.detach_predictive_in_reg or self.teacher != "predictive" else probs_p[n_l:]
                    loss_reg = loss_reg + self.regularization_loss(s_probs[n_l:], target)
            if fractions:
                pseudo_fraction = torch.as_tensor(sum(fractions) / len(fractions))
            if use_contrastive:
                assert self.contrastive_loss is not None
                conf_t, argmax_t = teacher_probs.max(dim=1, keepdim=True)
                contrast_labels = torch.cat([labels.to(argmax_t.dtype), argmax_t[n_l:]], dim=0)
                reliable = conf_t > self.uncertainty_threshold
                uncertain = conf_t < self.uncertainty_threshold  # the uncertainty map's definition
                if self.contrastive_anchors == "labelled":
                    uncertain[n_l:] = False
                elif self.contrastive_anchors == "band":
                    uncertain = torch.zeros_like(uncertain)
                    uncertain[:n_l] = boundary_band(labels, CONTRASTIVE_BAND_WIDTH)
                contrast_terms, chance = zero, 0.0
                for feats in (feats_p, feats_a):
                    if feats is not None:
                        term, stats = _with_stats(self.contrastive_loss, feats, contrast_labels, reliable, uncertain)
                        loss_contrastive = loss_contrastive + term
                        if stats.get("contrast") is not None:
                            contrast_terms = contrast_terms + stats["contrast"]
                            chance += float(stats.get("chance", 0.0))
                diag["diag_contrastive_eq5"] = contrast_terms.detach()
                diag["diag_contrastive_chance"] = torch.as_tensor(chance)
        loss_unsup = loss_pseudo + self.lambda_reg * loss_reg
        lambda_u = _weight_at(self.lambda_u, self.state.iteration)
        loss = loss_sup + lambda_u * loss_unsup + lambda_c * loss_contrastive
        with torch.no_grad():
            fg_label = (labels != 0).float().mean()
            fg_p = (logits_p[:n_l].argmax(dim=1) != 0).float().mean()
            fg_a = (logits_a[:n_l].argmax(dim=1) != 0).float().mean()
        diag.update(
            {
                "diag_loss_sup_predictive": sup_p.detach(),
                "diag_loss_sup_auxiliary": sup_a.detach(),
                "diag_fg_label": fg_label,
                "diag_fg_predictive": fg_p,
                "diag_fg_auxiliary": fg_a,
                "diag_teacher": torch.as_tensor(float(teacher_index)),
                "diag_lambda_u": torch.as_tensor(lambda_u),
                "diag_pseudo_mask_fraction": pseudo_fraction,
            }
        )
        return {
            Keys.LOSS: loss,
            "loss_sup": loss_sup,
            "loss_pseudo": loss_pseudo,
            "loss_reg": loss_reg,
            "loss_unsup": loss_unsup,
            "loss_contrastive": loss_contrastive,
            "lambda_c": torch.as_tensor(lambda_c),
            "uncertain_fraction": (probs_p.detach().amax(dim=1) < self.uncertainty_threshold).float().mean(),
            "pseudo_mask_fraction": pseudo_fraction,
            "_pred": logits_p[:n_l].detach(),
            "_weighted": {
                "sup_predictive": sup_p,
                "sup_auxiliary": sup_a,
                "pseudo": lambda_u * loss_pseudo,
                "reg": lambda_u * self.lambda_reg * loss_reg,
                "contrastive": lambda_c * loss_contrastive,
            },
            **diag,
        }

    @staticmethod
    def _forward(
        net: torch.nn.Module, x: torch.Tensor, uncertainty: torch.Tensor | None, with_features: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        kwargs: dict[str, Any] = {}
        if uncertainty is not None:
            kwargs["uncertainty"] = uncertainty
        if with_features:
            # nets that can (this package's) hand the contrastive loss their projection heads deferred
            deferred = "deferred" if getattr(_unwrap(net), "deferred_features", False) else True
            logits, feats = net(x, return_features=deferred, **kwargs)
            return logits, list(feats)
        return net(x, **kwargs), None


def _unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (the EMA teacher averages plain parameters)."""
    return net.module if isinstance(net, torch.nn.parallel.DistributedDataParallel) else net


def _with_stats(loss_fn: Callable, *args: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(loss, stats)`` from a loss that takes ``return_stats`` (this package's), ``(loss, {})`` from any other."""
    if isinstance(loss_fn, (PseudoLabelLoss, PrototypeContrastiveLoss)):
        return loss_fn(*args, return_stats=True)
    return loss_fn(*args), {}


def _weight_at(weight: float | Callable[[int], float], iteration: int) -> float:
    """A loss weight given as a constant or as a callable of the (1-based) iteration number."""
    return float(weight(iteration)) if callable(weight) else float(weight)


def _is_empty(loader: Iterable) -> bool:
    try:
        return len(loader) == 0  # type: ignore[arg-type]
    except TypeError:
        return False

