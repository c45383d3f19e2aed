"""NPBG++ (Rakhimov et al., CVPR 2022) and NPBG (Aliev et al., ECCV 2020) networks.

Public names: :class:`NPBGPlusPlus`, :class:`NPBGPlusPlusConfig`, :class:`NPBG`,
:class:`NPBGConfig`, :class:`AggregatedScene`, :class:`Refiner`,
:class:`FeatureExtractor`, :class:`BasisMLP`.
"""

from .aggregator import AggregatedScene, BasisMLP, embed_directions
from .alignment import align_camera, alignment_angle, warp_images
from .config import NPBGConfig, NPBGPlusPlusConfig
from .extractor import FeatureExtractor
from .npbg import NPBG
from .npbgpp import NPBGPlusPlus, SceneAggregation
from .refiner import GatedBlock, Refiner, count_parameters

__all__ = [
    "AggregatedScene",
    "BasisMLP",
    "FeatureExtractor",
    "GatedBlock",
    "NPBG",
    "NPBGConfig",
    "NPBGPlusPlus",
    "NPBGPlusPlusConfig",
    "Refiner",
    "SceneAggregation",
    "align_camera",
    "alignment_angle",
    "count_parameters",
    "embed_directions",
    "warp_images",
]
