"""arenaseg: few-shot, parameter-efficient adaptation of 3D segmentation foundation models with ARENA."""

__version__ = "0.1.0"
