"""`edgetl finetune`: transfer learning in three phases, writing a run directory (docs/formats.md).

1. head: the whole backbone frozen; its pooled features are computed once (plus ``feature_views`` augmented
   views per image) and a dropout+softmax head is trained on the cached features at ``head_lr``.
2. fine_tune (optional): the backbone above the freeze boundary is unfrozen and trained end to end at a 10-100x
   lower ``fine_tune_lr``. BatchNormalization layers stay in inference mode (the base is called with
   ``training=False``), frozen or not.
3. qat (default on): quantization-aware training from the best float weights (edgetl.qat).

Images are never all in memory: every phase streams them from their files (edgetl.stream: tf.data over file
indices, parallel decode + resize with the same decoder as export and verify), the head phase's cached features go to
files in the work folder and are read back a batch at a time, and the BatchNorm, calibration images are drawn by index.
Each phase writes ``logs/PHASE/history.csv`` and TensorBoard scalars.

The run is built in a hidden ``.NAME.partial`` folder beside the target and swapped in when complete; each finished
phase is checkpointed there, so a killed run resumes from its last completed phase when rerun with the same config.

The modules, in the order things happen:

- ``model``: the classifier (backbone + head), the preprocessing in front of the backbone, BatchNorm re-estimation
  for ``weights: none``;
- ``freeze``: the freeze policy (``--freeze auto`` and the rest) and the fine-tune learning rate;
- ``training``: what every phase shares (seeds, augmentation, callbacks and logs, accuracies);
- ``phases``: head, fine-tune, QAT (each over a :class:`PhaseContext`; fine-tune and QAT with their
  :class:`FitSettings`), and :func:`~edgetl.finetune.phases.run_phases` over a :class:`RunContext`;
- ``resume``: progress.json and the per-phase checkpoint;
- ``curves``: curves.png;
- ``run``: :func:`finetune`, the stage: target checks, data split, resume, manifest, the swap.

TensorFlow is imported only inside the functions that train (importing this package does not import it).
"""

from edgetl.finetune.freeze import (
    FROM_SCRATCH_FINE_TUNE_LR,
    PRETRAINED_FINE_TUNE_LR,
    FreezeDecision,
    apply_freeze,
    auto_freeze_point,
    decide_freeze,
    fine_tune_learning_rate,
)
from edgetl.finetune.model import (
    BN_RECALIBRATION_IMAGES,
    base_inputs,
    bgr_mean_preprocess,
    build_classifier,
    get_base,
    recalibrate_batchnorm,
)
from edgetl.finetune.phases import (
    PHASES,
    FitSettings,
    HeadResult,
    PhaseContext,
    RunContext,
    fit_phase,
    head_phase,
    qat_phase,
    run_phases,
)
from edgetl.finetune.run import RunResult, default_run_dir, finetune
from edgetl.finetune.training import (
    evaluate_accuracy,
    make_augmenter,
    predict_stream,
    set_seeds,
    stream_accuracy,
    tflite_accuracy,
)

__all__ = [
    "BN_RECALIBRATION_IMAGES",
    "FROM_SCRATCH_FINE_TUNE_LR",
    "PHASES",
    "PRETRAINED_FINE_TUNE_LR",
    "FitSettings",
    "FreezeDecision",
    "HeadResult",
    "PhaseContext",
    "RunContext",
    "RunResult",
    "apply_freeze",
    "auto_freeze_point",
    "base_inputs",
    "bgr_mean_preprocess",
    "build_classifier",
    "decide_freeze",
    "default_run_dir",
    "evaluate_accuracy",
    "fine_tune_learning_rate",
    "finetune",
    "fit_phase",
    "get_base",
    "head_phase",
    "make_augmenter",
    "predict_stream",
    "qat_phase",
    "recalibrate_batchnorm",
    "run_phases",
    "set_seeds",
    "stream_accuracy",
    "tflite_accuracy",
]
