"""tta-surgical: online and supervised surgical adaptation of pretrained vision models to distribution shift."""

__version__ = "0.1.0"
