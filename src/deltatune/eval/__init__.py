"""Evaluation: streamed per-stage metrics (`METRICS`), and base-vs-tuned reports (`deltatune eval`)."""

from deltatune.eval.metrics import METRICS, MetricFn
from deltatune.eval.scores import ConfusionMatrix, EntityCounts, get_entities

__all__ = ["METRICS", "MetricFn", "ConfusionMatrix", "EntityCounts", "get_entities"]
