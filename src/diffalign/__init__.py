"""diffalign: align text-to-image and text-to-video diffusion models with human preferences."""

__version__ = "0.1.0"
