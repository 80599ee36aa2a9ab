"""Models by timm name and their weights, one concept a module.

``build`` (a model config checked, the timm model built, on the meta device for checks), ``checks``
(what a model must take and run, before any real work), ``weights`` (safetensors files checked where
they enter, and the sidecar beside each), ``pretrained`` (local pretrained weights fitted into a
model, the classifier aside), ``checkpoints`` (a model saved as safetensors plus a JSON sidecar and
rebuilt from them), ``import_weights`` (pretrained weights wrapped as a checkpoint, unchanged),
``transfer`` (a checkpoint's model rebuilt for another dataset).
"""
