"""Input pipelines for metric learning: class-balanced (P × M) batches with `tf.data`."""

from keras_dml.data.sampler import m_per_class_dataset

__all__ = ["m_per_class_dataset"]
