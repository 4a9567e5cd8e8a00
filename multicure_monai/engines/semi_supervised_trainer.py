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
    L_u = PL(A_u, argmax P_u | conf > 0.7)               the teacher's students (the paper: the auxiliary net)
          + lambda_reg * L1(A_u, P_u on argmax A_u XOR argmax P_u)
    L_c = prototype contrastive loss (eqs. 4-5) of each of ``contrastive_networks`` on its own decoder features:
          reliable voxels (conf > tau) build the class prototypes, anchors are pulled to theirs; a voxel's class
          is the ground truth on labelled images, the teacher's argmax elsewhere

That is the paper's scheme. By default each net teaches the other (``teacher="mutual"``, :mod:`.teachers`) on BCP's
copy-paste mix of labelled and unlabelled crops (``student_view``, :mod:`.student_views`), the targets from the
teachers' pass on the clean crops. The uncertainty map fed to MultiCURE is always the predictive net's.

The loss is a table of terms (:mod:`.loss_terms`): ``name -> (what it computes, weight schedule, nets it trains,
batch part)``. The total, the gradient diagnostics, the NaN check and what is logged come from that table, so a new
term is one row. The nets are called through one interface (:mod:`multicure_monai.networks.protocol`) and one
two-net forward (:func:`multicure_monai.networks.two_nets.forward_two_nets`), shared with the deployed ensemble.

The engine's output dict carries ``image``, ``label``, ``pred`` (predictive logits of the labelled batch),
``loss``, every row's ``loss_<name>`` and ``diag_weight_<name>``, the rows' stats and the diagnostics under
``diag_*`` (``L_s`` per net, predicted and true foreground fraction on the labelled crops, the teacher, the
uncertain fraction, the contrastive loss against its chance value, and every ``diagnostics_interval`` iterations
the gradient norm each weighted row sends into each net), so ``StatsHandler``, ``TensorBoardStatsHandler`` and the
progress bar show them without knowing the method. Around the iteration: the unlabelled stream
(:mod:`.cycling_loader`), the teacher choice (:mod:`.teachers`), diagnostics and the NaN guard (:mod:`.diagnostics`),
BatchNorm recalibration and seeding (handlers: :mod:`multicure_monai.handlers.batchnorm_recalibration`,
:mod:`multicure_monai.handlers.determinism`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.engines.workflow import Workflow
from monai.utils.enums import CommonKeys as Keys
from torch.optim.optimizer import Optimizer

from multicure_monai.engines.cycling_loader import CyclingLoader
from multicure_monai.engines.diagnostics import check_finite_losses, loss_gradient_norms, prediction_diagnostics
from multicure_monai.engines.loss_terms import IterationContext, LossTerm, check_loss_terms
from multicure_monai.engines.student_views import student_view as build_student_view
from multicure_monai.engines.teachers import TEACHERS, clean_view_probabilities
from multicure_monai.errors import BundleInputError
from multicure_monai.networks.two_nets import TwoNetOutput, forward_two_nets
from multicure_monai.precision import (
    autocast,
    guard_small_convolutions,
    log_precision,
    needs_grad_scaler,
    resolve_amp_dtype,
)

__all__ = ["SemiSupervisedTrainer", "TEACHERS"]


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
        loss_terms: the loss table, ``{name: LossTerm}`` (:mod:`.loss_terms`; e.g.
            :func:`~multicure_monai.engines.loss_terms.method_loss_terms`); the total loss is
            ``sum_i weight_i(t) * L_i``.
        unlabeled_data_loader: loader of unlabelled batches (``image`` only). It is cycled independently of the
            labelled loader (re-iterated when exhausted, calling ``sampler.set_epoch`` when the sampler has one).
        uncertainty_threshold: confidence below which a voxel is uncertain (the map fed to MultiCURE, and the
            reliable/uncertain split of the contrastive loss).
        teacher: ``"mutual"`` (CPS: each net's confident argmax trains the other; the default), ``"predictive"``
            (the paper), ``"better"`` (MCF: the net with the lower labelled ``L_s`` of the iteration teaches the
            other) or ``"ema"`` (``ema_network`` teaches both nets).
        ema_network: the EMA teacher for ``teacher="ema"``, e.g. ``torch.optim.swa_utils.AveragedModel(
            predictive, multi_avg_fn=get_ema_multi_avg_fn(0.99), use_buffers=True)``; updated from the predictive
            net after every optimizer step.
        diagnostics_interval: every this many iterations the output carries the gradient norm each weighted row
            sends into each net (``diag_grad_<name>_<net>``; one extra backward pass per row); 0 disables.
        predictive_uses_uncertainty: the predictive net holds a MultiCURE block (authors' released code); it
            then gets the uncertainty map of a first, gradient-free pass of itself.
        student_view: what the students see of the unlabelled crops: a view (:mod:`.student_views`) or its name
            (default ``"copy_paste"``, :class:`~multicure_monai.engines.student_views.CopyPasteView`). The teachers
            first run on the clean crops without gradient (:func:`~multicure_monai.engines.teachers.
            clean_view_probabilities`), then both nets train on the view against the view's targets. ``None`` or
            ``"none"`` (the paper): the same crop.
        supervised_only: ablation baseline; keeps the table's ``"labelled"`` rows only (same networks, same
            budget); the unlabelled loader is ignored.
        empty_unlabeled: what to do when there is no unlabelled data: ``"warn"`` (fall back to
            supervised-only with a warning) or ``"error"``.
        channels_last: feed the networks ``channels_last_3d`` tensors (convert the networks too, e.g.
            ``net.to(memory_format=torch.channels_last_3d)``); on CPU (oneDNN) this makes 3D convolutions
            several times faster, most of all their backward pass (see ``benchmarks/train_step.py``).
        loss_function: what :class:`~monai.engines.SupervisedTrainer` stores as its ``loss_function`` (unused: the
            loss comes from ``loss_terms``).
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
        loss_terms: Mapping[str, LossTerm],
        unlabeled_data_loader: Iterable | None = None,
        uncertainty_threshold: float = 0.7,
        teacher: str = "mutual",
        ema_network: torch.nn.Module | None = None,
        diagnostics_interval: int = 0,
        predictive_uses_uncertainty: bool = False,
        student_view: str | Callable | None = "copy_paste",
        supervised_only: bool = False,
        empty_unlabeled: str = "warn",
        channels_last: bool = False,
        loss_function: Callable | None = None,
        **kwargs: Any,
    ) -> None:
        if not 0.0 < uncertainty_threshold < 1.0:
            raise ValueError(f"uncertainty_threshold must be in (0, 1), got {uncertainty_threshold}.")
        if teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {TEACHERS}, got {teacher!r}.")
        if teacher == "ema" and ema_network is None:
            raise ValueError("teacher='ema' needs an ema_network (e.g. torch.optim.swa_utils.AveragedModel).")
        if diagnostics_interval < 0:
            raise ValueError(f"diagnostics_interval must be >= 0, got {diagnostics_interval}.")
        if empty_unlabeled not in ("warn", "error"):
            raise ValueError(f"empty_unlabeled must be 'warn' or 'error', got {empty_unlabeled!r}.")
        table = check_loss_terms(loss_terms)
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
        self.uncertainty_threshold = float(uncertainty_threshold)
        self.predictive_uses_uncertainty = predictive_uses_uncertainty
        self.teacher = teacher
        self.ema_network = ema_network
        self.student_view = build_student_view(student_view) if isinstance(student_view, str) else student_view
        self.diagnostics_interval = int(diagnostics_interval)
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format

        if not supervised_only:
            if unlabeled_data_loader is None or _is_empty(unlabeled_data_loader):
                message = "no unlabelled data: the semi-supervised losses need an unlabelled stream"
                if empty_unlabeled == "error":
                    fix = "List unlabelled images in the datalist, or set it to 'warn' (--unlabelled#when_empty warn)."
                    raise BundleInputError(f"{message} (empty_unlabeled='error'). {fix}")
                warnings.warn(message + "; training falls back to supervised-only (L_s).", stacklevel=2)
                supervised_only = True
            elif all(row.part == "labelled" for row in table.values()):
                raise ValueError("semi-supervised training needs at least one loss term on unlabelled data.")
        self.supervised_only = supervised_only
        self.loss_terms = {k: r for k, r in table.items() if r.part == "labelled"} if supervised_only else table
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

        Used at epoch starts by :class:`multicure_monai.handlers.determinism.EpochSeedHandler`, so that the
        unlabelled batches of an epoch depend on the epoch's seed only (bit-identical resume).

        Args:
            sampler_epoch: value for the loader's ``sampler.set_epoch`` (distributed shuffling) of the new
                iterator; ``None`` keeps counting from the current one.
        """
        if self._unlabeled is not None:
            self._unlabeled.reset(sampler_epoch)

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
        supervised-only; the clean crops, not a student view), on the engine's device, ``(B_l + B_u, C, H, W, D)``."""
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
    ) -> TwoNetOutput:
        """Both nets on ``x`` as in training (:func:`~multicure_monai.networks.two_nets.forward_two_nets`)."""
        features = (with_features_p, with_features_a)
        return forward_two_nets(
            self.network, self.aux_network, x, self.uncertainty_threshold, self.predictive_uses_uncertainty, features
        )

    # ------------------------------------------------------------- iteration
    def student_batch(
        self, x_l: torch.Tensor, y_l: torch.Tensor, x_u: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """The students' batch ``cat(x_l, view of x_u)`` and the view's targets (``None`` without a view): the
        teachers label the clean ``x_u`` without gradient, then :attr:`student_view` transforms crops and targets."""
        view_targets = None
        if x_u is not None and self.student_view is not None:
            x_u = x_u.contiguous(memory_format=self.memory_format)
            with self.autocast():
                clean = clean_view_probabilities(self.teacher, self.network, self.aux_network, x_u,
                                                 self.uncertainty_threshold, self.predictive_uses_uncertainty,
                                                 self.ema_network)  # fmt: skip
            x_u, view_targets = self.student_view(x_l, y_l, x_u, clean)
        x = x_l if x_u is None else torch.cat([x_l, x_u], dim=0)
        return x.contiguous(memory_format=self.memory_format), view_targets

    def _iteration(self, engine: SupervisedTrainer, batchdata: dict[str, torch.Tensor]) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        x_l, y_l = _plain(batch[0]), _plain(batch[1])
        if y_l is None:
            raise ValueError("the labelled loader must provide 'label'.")
        self.network.train()
        self.aux_network.train()
        n_l = x_l.shape[0]
        x, view_targets = self.student_batch(x_l, y_l, None if self.supervised_only else self._next_unlabeled())
        weights = {name: row.weight_at(engine.state.iteration) for name, row in self.loss_terms.items()}
        engine.state.output = {Keys.IMAGE: x_l, Keys.LABEL: y_l}
        self.optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        terms, weighted = self._compute_losses(x, y_l, n_l, weights, view_targets)
        interval = self.diagnostics_interval
        if interval and engine.state.iteration % interval == 0:
            nets = {"predictive": self.network, "auxiliary": self.aux_network}
            terms.update(loss_gradient_norms(weighted, nets, prefix="diag_grad_"))
        engine.state.output.update(terms)
        engine.state.output[Keys.PRED] = terms.pop("_pred")
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)

        loss = engine.state.output[Keys.LOSS]
        names = [Keys.LOSS, *(f"loss_{name}" for name in weighted)]
        check_finite_losses(engine.state.output, engine.state.iteration, names)
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
        for key in names:
            engine.state.output[key] = engine.state.output[key].detach()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def _compute_losses(
        self,
        x: torch.Tensor,
        y_l: torch.Tensor,
        n_l: int,
        weights: Mapping[str, float],
        view_targets: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Forward both nets on ``x`` (labelled first) and evaluate every row of non-zero weight, in table order.

        Only the forward passes run under autocast (the EMA teacher's too, through the context); the terms take
        float32 logits and probabilities.

        Returns:
            ``(output terms, {name: weighted term})``.
        """
        want = {net for name, row in self.loss_terms.items() if weights[name] > 0 for net in row.feature_networks}
        with self.autocast():
            out = self.forward_networks(x, "predictive" in want, "auxiliary" in want)
        probs_a = torch.softmax(out.logits_a.float(), dim=1)
        ctx = IterationContext(
            x=x,
            n_l=n_l,
            labels=y_l,
            logits={"predictive": out.logits_p, "auxiliary": out.logits_a},
            probs={"predictive": out.probs_p, "auxiliary": probs_a},
            features={"predictive": out.feats_p, "auxiliary": out.feats_a},
            iteration=self.state.iteration,
            uncertainty_threshold=self.uncertainty_threshold,
            teacher_name=self.teacher,
            ema_network=self.ema_network,
            autocast=self.autocast,
            view_targets=view_targets,
        )
        terms: dict[str, Any] = {}
        weighted: dict[str, torch.Tensor] = {}
        for name, row in self.loss_terms.items():
            terms[f"diag_weight_{name}"] = torch.as_tensor(weights[name])
            if weights[name] == 0.0:
                continue
            result = row.compute(ctx)
            value, stats = result if isinstance(result, tuple) else (result, {})
            terms[f"loss_{name}"] = value
            terms.update({f"diag_{k}": v for k, v in stats.items()})
            weighted[name] = weights[name] * value
        total = None
        for value in weighted.values():
            total = value if total is None else total + value
        terms.update(prediction_diagnostics(out.logits_p, out.logits_a, out.probs_p, y_l, self.uncertainty_threshold))
        terms["diag_teacher"] = torch.as_tensor(float(ctx.teacher_index))
        terms[Keys.LOSS] = total if total is not None else out.logits_p.sum() * 0.0
        terms["_pred"] = out.logits_p[:n_l].detach()
        return terms, weighted


def _unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (the EMA teacher averages plain parameters)."""
    return net.module if isinstance(net, torch.nn.parallel.DistributedDataParallel) else net


def _is_empty(loader: Iterable) -> bool:
    try:
        return len(loader) == 0  # type: ignore[arg-type]
    except TypeError:
        return False

