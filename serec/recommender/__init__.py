"""The recommender: which enhancer to run on a noisy file, learnt from step 2's labels.

Model kinds live in a registry (`kinds`), each with weights_only checkpoints
(`checkpoint`); the gatekeeper / expert rule is `stages`; training is `training` (over
`folds`, `inputs`, `loop`), cross-validation `crossval`, inference `inference`. Importing
the package registers the built-in kinds.
"""

from serec.recommender import ast_model, logistic  # noqa: F401  (register the built-in kinds)
