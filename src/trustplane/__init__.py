"""trustplane: confidential, trustworthy container images and cloud volumes."""

__version__ = "0.1.0"
