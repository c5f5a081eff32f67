"""Methods, one module per method (or family); importing the package registers them in METHODS (each module
registers its own with @register_method, as timm registers models)."""
from .base import METHODS, Method, build_method, register_method
# registration order is the order `mimkit pretrain --help` lists them in
from .mae import MAE  # isort: skip
from .simmim import SimMIM  # isort: skip
from .maskfeat import MaskFeat  # isort: skip
from .beit import BEiT, BEiTv2  # isort: skip
from .clustermim import ClusterMIM  # isort: skip
from .eva import EVA, MILAN, MaskDistill  # isort: skip
from .data2vec2 import Data2Vec2  # isort: skip
from .ijepa import IJEPA  # isort: skip
from mimkit.pretrain_config import config_class, pretrain_config, validate  # isort: skip

__all__ = ["METHODS", "Method", "build_method", "register_method", "config_class", "pretrain_config", "validate",
           "MAE", "SimMIM", "MaskFeat", "BEiT", "BEiTv2", "ClusterMIM", "EVA", "MaskDistill", "MILAN",
           "Data2Vec2", "IJEPA"]
