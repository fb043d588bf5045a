"""c2al: cohort-contrastive auxiliary learning for TorchRec recommendation models."""
from c2al.errors import C2ALError
from c2al.plugin import AuxOutput, attach, detach

__version__ = "0.1.0"
__all__ = ["C2ALError", "__version__", "AuxOutput", "attach", "detach"]
