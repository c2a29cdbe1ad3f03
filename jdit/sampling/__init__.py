"""Samplers compiled into one XLA program, and classifier-free guidance."""

from jdit.sampling.guidance import ClassifierFreeGuidance, PerturbedAttentionGuidance
from jdit.sampling.sample import FLOW_SOLVERS, VP_SOLVERS, sample

__all__ = ["FLOW_SOLVERS", "VP_SOLVERS", "ClassifierFreeGuidance", "PerturbedAttentionGuidance",
           "sample"]
