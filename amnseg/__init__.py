"""amnseg: weakly-supervised semantic segmentation with the Activation Manipulation Network."""

__version__ = "0.1.0"
