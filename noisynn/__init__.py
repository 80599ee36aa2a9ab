"""noisynn: NoisyNN's noises injected into timm models, trained and evaluated under every protocol."""

__version__ = "0.1.0"
