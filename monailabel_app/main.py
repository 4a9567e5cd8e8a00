"""A MONAI Label app for the MultiCURE bundle: auto-segmentation, training, and uncertainty-driven active learning.

The ``monaibundle`` sample app serves the bundle as it is (docs/monailabel.md) but offers only the ``random`` and
``first`` strategies, and its strategy list is fixed in its code. This app serves the same bundle the same way
(MONAI Label's own ``BundleInferTask`` and ``BundleTrainTask``) and adds:

* the scoring method ``uncertainty``: runs the deployed model (the bundle's inference.yaml and models/model.pt)
  over every unlabelled study and stores how unsure it is
  (:func:`multicure_monai.metrics.study_uncertainty`) in the datastore as ``multicure_uncertainty``; a study is
  scored again only when model.pt changes. MONAI Label runs it at start-up, after each training and after each
  sample request (its ``auto_update_scoring``).
* the strategy ``uncertainty``: the unlabelled study with the highest score, skipping those served in the last
  ``uncertainty_reserve`` seconds (so two annotators are not given the same study).

Start it with the bundle copied to ``<app>/model/<name>`` (docs/monailabel.md)::

    monailabel start_server --app monailabel_app --studies studies --conf models multicure_segmentation \\
        --conf zoo_source github [--conf uncertainty_measure entropy] [--conf uncertainty_region structure]
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import monailabel
import torch
from monai.bundle import ConfigParser
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.generic import get_bundle_models, strtobool

from multicure_monai.handlers.checkpoint_architecture import check_architecture, read_architecture
from multicure_monai.handlers.checkpoint_loader import safe_load
from multicure_monai.metrics.study_uncertainty import STUDY_MEASURES, STUDY_REGIONS, study_uncertainty

logger = logging.getLogger(__name__)

SCORE_KEY = "multicure_uncertainty"
SCORE_TS_KEY = "multicure_uncertainty_ts"  # model.pt's mtime (ns) when the score was computed


class DeployedModelUncertainty(ScoringMethod):
    """Score every unlabelled study by the deployed model's uncertainty (``SCORE_KEY`` in the image info).

    Args:
        bundle_path: the served bundle (``configs/inference.yaml``, ``models/model.pt``).
        measure: ``entropy`` or ``uncertain_fraction`` (:data:`multicure_monai.metrics.STUDY_MEASURES`).
        region: ``structure`` or ``all`` (:data:`multicure_monai.metrics.STUDY_REGIONS`).
    """

    def __init__(self, bundle_path: str, measure: str = "entropy", region: str = "structure") -> None:
        if measure not in STUDY_MEASURES or region not in STUDY_REGIONS:
            raise ValueError(f"uncertainty_measure must be one of {STUDY_MEASURES} and uncertainty_region one of "
                             f"{STUDY_REGIONS}, got {measure!r}, {region!r}.")  # fmt: skip
        super().__init__(f"Deployed model's {measure} over the {region} region of each unlabelled study")
        self.bundle_path = bundle_path
        self.measure = measure
        self.region = region

    def _model(self, device: str) -> tuple[ConfigParser, torch.nn.Module]:
        parser = ConfigParser()
        parser.read_config(os.path.join(self.bundle_path, "configs", "inference.yaml"))
        parser["bundle_root"] = self.bundle_path
        parser["device"] = device
        network = parser.get_parsed_content("network")
        model_file = os.path.join(self.bundle_path, "models", "model.pt")
        check_architecture(model_file, read_architecture(model_file), parser.get_parsed_content("architecture"))
        state = safe_load(model_file, map_location=device)
        network.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        return parser, network.eval()

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        model_file = os.path.join(self.bundle_path, "models", "model.pt")
        if not os.path.exists(model_file):
            logger.info(f"uncertainty scoring: no {model_file} yet, nothing scored")
            return {"total": 0, "executed": 0}
        model_ts = int(os.stat(model_file).st_mtime_ns)
        images = datastore.get_unlabeled_images()
        todo = [i for i in images if datastore.get_image_info(i).get(SCORE_TS_KEY) != model_ts]
        start, failed = time.time(), []
        if todo:
            device = request.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
            parser, network = self._model(device)
            preprocessing, inferer = parser.get_parsed_content("preprocessing"), parser.get_parsed_content("inferer")
            threshold = float(parser.get_parsed_content("uncertainty_threshold"))
            for image_id in todo:
                try:  # one unreadable study must not stop the others from being ranked
                    image = preprocessing({"image": datastore.get_image_uri(image_id)})["image"]
                    with torch.no_grad():
                        probs = torch.softmax(inferer(image.unsqueeze(0).to(device), network), dim=1)
                    score = float(study_uncertainty(probs, threshold, self.measure, self.region)[0])
                except Exception as e:  # noqa: BLE001
                    failed.append(image_id)
                    logger.warning(f"uncertainty scoring: {image_id} not scored: {type(e).__name__}: {e}")
                    continue
                datastore.update_image_info(image_id, {SCORE_KEY: score, SCORE_TS_KEY: model_ts})
                logger.info(f"uncertainty scoring: {image_id} => {self.measure} {score:.5f}")
        latency = round(time.time() - start, 3)
        summary = {"total": len(images), "executed": len(todo), "failed": failed, "latency": latency}
        logger.info(f"uncertainty scoring: {summary}")
        return summary


class MostUncertain(Strategy):
    """The unlabelled study with the highest ``SCORE_KEY``; studies not scored yet come last.

    MONAI Label's ``Epistemic`` strategy ranks by another key and answers under ``epistemic_entropy``; this one
    answers ``{"id", SCORE_KEY}`` and passes over studies this strategy served less than ``reserve`` seconds ago
    while others remain.
    """

    def __init__(self, reserve: int = 3600) -> None:
        super().__init__("The unlabelled study the deployed model is least sure about")
        self.reserve = int(reserve)

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        now, strategy = int(time.time()), request.get("strategy", "uncertainty")
        ranked = []
        for image_id in images:
            info = datastore.get_image_info(image_id)
            served = info.get("strategy", {}).get(strategy, {}).get("ts", 0)
            score = info.get(SCORE_KEY)
            ranked.append((now - served < self.reserve, score is None, -(score or 0.0), image_id))
        reserved, _, neg_score, image_id = min(ranked)
        logger.info(f"uncertainty strategy: {image_id} (score {-neg_score}, reserved {reserved}) of {len(images)}")
        return {"id": image_id, SCORE_KEY: -neg_score}


class MultiCUREApp(MONAILabelApp):
    """The bundle's inference and training tasks (as in ``monaibundle``) plus uncertainty active learning."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.models = get_bundle_models(app_dir, conf)
        if not self.models:
            raise ValueError(f"no bundle: pass --conf models <name> with the bundle in {app_dir}/model/<name>")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"MONAILabel - MultiCURE bundle ({monailabel.__version__})",
            description="Semi-supervised MultiCURE segmentation with uncertainty-driven active learning",
            version=monailabel.__version__,
        )

    def init_infers(self) -> dict[str, InferTask]:
        return {name: BundleInferTask(path, self.conf) for name, path in self.models.items()}

    def init_trainers(self) -> dict[str, TrainTask]:
        if strtobool(self.conf.get("skip_trainers", "false")):
            return {}
        tasks = {name: BundleTrainTask(path, self.conf) for name, path in self.models.items()}
        return {name: t for name, t in tasks.items() if t and t.is_valid()}

    def init_strategies(self) -> dict[str, Strategy]:
        reserve = int(self.conf.get("uncertainty_reserve", "3600"))
        return {"uncertainty": MostUncertain(reserve), "random": Random(), "first": First()}

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        name = self.conf.get("uncertainty_model") or next(iter(self.models))
        measure = self.conf.get("uncertainty_measure", "entropy")
        region = self.conf.get("uncertainty_region", "structure")
        return {"uncertainty": DeployedModelUncertainty(self.models[name], measure, region)}
