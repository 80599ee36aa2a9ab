"""Injection of a noise into a timm model, from the outside, at a named site.

By concept: ``registry`` (what injection knows of a family of models, and ``family_of``),
``families`` (the families it knows: ViT-like, ResNet, Swin, EfficientNet, any other timm model),
``sites`` (where a noise can go and what reaches it there), ``hook`` (the ``Injection``, the hook
that applies the noise) and ``split`` (running a model in two halves around a site's block).
"""

from noisynn.inject import families  # noqa: F401  (registers the built-in families, as timm's models/__init__ does)
