"""Miners: objects that select the informative pairs or triplets of a batch, for any loss.

A miner is called as `miner(labels, embeddings)` and returns a `Mined`:
positive and negative pair masks `(B, R)` (pair miners) or a triplet mask
`(B, R, R)` (triplet miners), static shapes that work under `jit` on every
backend. Losses take one as `miner=` (`TripletLoss`, `ContrastiveLoss`,
`MultiSimilarityLoss`, `CircleLoss`, `LiftedStructLoss`,
`GeneralizedLiftedStructureLoss`, `TupletMarginLoss`, `IntraPairVarianceLoss`,
`SignalToNoiseRatioContrastiveLoss`, `AngularLoss`, `MarginLoss`,
`DynamicSoftMarginLoss`, `NCALoss`); pair losses read its pairs (`mined_pairs`),
triplet losses its triplets, `NCALoss` how often it picks each query
(`mined_query_weights`). The string options of `keras_dml.mining`
(`negative_mining="hard"`, ...) remain as shortcuts for the common cases.

Example:

>>> import numpy as np
>>> import keras_dml
>>> from keras_dml.miners import TripletMarginMiner
>>> loss = keras_dml.TripletLoss(margin=0.2, miner=TripletMarginMiner(0.2, "semihard"))
>>> labels = np.array([0, 0, 1, 1])
>>> emb = np.array([[0.0], [1.0], [1.9], [3.7]], "float32")
>>> round(float(loss(labels, emb)), 4)
0.1
"""

from keras_dml.miners.base import (
    DistanceMiner,
    Mined,
    Miner,
    RandomMiner,
    get,
    mined_or_all,
    mined_pairs,
    mined_query_weights,
    mined_triplet_counts,
    mined_triplets,
)
from keras_dml.miners.pairs import (
    BatchEasyHardMiner,
    BatchHardMiner,
    HDCMiner,
    MultiSimilarityMiner,
    PairMarginMiner,
    UniformHistogramMiner,
)
from keras_dml.miners.triplets import AngularMiner, DistanceWeightedMiner, TripletMarginMiner

__all__ = [
    "AngularMiner",
    "BatchEasyHardMiner",
    "BatchHardMiner",
    "DistanceMiner",
    "DistanceWeightedMiner",
    "HDCMiner",
    "Mined",
    "Miner",
    "MultiSimilarityMiner",
    "PairMarginMiner",
    "RandomMiner",
    "TripletMarginMiner",
    "UniformHistogramMiner",
    "get",
    "mined_or_all",
    "mined_pairs",
    "mined_query_weights",
    "mined_triplet_counts",
    "mined_triplets",
]
