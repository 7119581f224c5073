"""Training: image-folder data, the synthetic leaf set, torchvision backbones, the loop, one run.

* :mod:`plantml.training.data`: scan, split and load an image folder;
* :mod:`plantml.training.synth`: the offline two-class leaf generator;
* :mod:`plantml.training.models`: backbones, heads, weights, freezing;
* :mod:`plantml.training.loop`: ``train_one_epoch``, ``evaluate``, early stopping;
* :mod:`plantml.training.figures`: learning curves and confusion matrix;
* :mod:`plantml.training.config`: ``TrainConfig``, ``TrainResult``, ``Reporter``, ``NullTracker``;
* :mod:`plantml.training.run`: ``prepare`` then ``fit``, the whole tracked run.
"""
