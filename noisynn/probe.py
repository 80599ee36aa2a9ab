"""Does a prediction depend on the other images of its batch? A probe in one forward pass pair.

The test: run a batch of ``batch_size`` images, then the same batch with each image replaced in turn, from
the same model state and the same random streams (dropout, the noise's generator). A model that
treats each image alone gives the other images the same logits both times; a batch-mixing noise
(optimal Q over the batch, the shift), BatchNorm in train mode (batch statistics) or anything
else that pools over the batch changes them. Forward hooks on every module record each module's
input and output for the untouched images, so the probe also names the first module, in the order
the forward pass reaches them, where the untouched images' tensors part: that is where the batch
is mixed. A model whose state changes during a forward pass (BatchNorm running statistics in train
mode, test-time adaptation) makes a prediction depend on the batches before it too; the probe
reports the buffers and parameters that changed.

Lightning Bolts' ``BatchGradientVerification`` checks the same independence for training, by
gradients; this one checks the forward pass that the evaluation protocols run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

# logits within this relative distance count as equal: a batched matmul gives each row the same
# result whatever the other rows hold, so what is left is float rounding
_REL_TOL = 1e-5


@dataclass
class ProbeResult:
    batch_size: int
    max_change: float  # largest |Δ logit| of the untouched images, relative to the logits' scale
    first_mixing: str | None  # "<module> (input)" or "<module>", the first place the untouched images part
    state_changed: list[str] = field(default_factory=list)  # buffers/parameters a forward pass changed

    @property
    def batch_independent(self) -> bool:
        return self.max_change <= _REL_TOL and not self.state_changed

    def sentence(self) -> str:
        others = self.batch_size - 1
        if self.batch_independent:
            return (f"batch-independent: replacing any one image of a batch of {self.batch_size} leaves the logits of the "
                    f"other {others} unchanged, and a forward pass changes no state of the model")
        parts = []
        if self.max_change > _REL_TOL:
            where = self.first_mixing or "an unhooked operation"
            parts.append(f"mixes the batch at {where}: replacing one image of a batch of {self.batch_size} changes the "
                         f"logits of the other {others} by up to {self.max_change:.3g} (relative to the largest logit)")
        if self.state_changed:
            shown = ", ".join(self.state_changed[:3]) + (", …" if len(self.state_changed) > 3 else "")
            parts.append(f"adapts to what it sees: a forward pass changes {len(self.state_changed)} buffer(s) or "
                         f"parameter(s) ({shown}), so a prediction depends on the batches before it")
        return "; ".join(parts)


def _rows(t, batch_size: int) -> torch.Tensor | None:
    """The tensor as one row per image (window-partitioned tensors are image-major), or None."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] % batch_size or not t.dtype.is_floating_point:
        return None
    return t.detach().reshape(batch_size, -1).float()


def _first(x):
    if isinstance(x, (tuple, list)):
        return x[0] if x else None
    return x


class _Recorder:
    """Every module's first input and its output, in the order the forward pass reaches them.

    The reference pass keeps them (``reference``); a later pass compares each with the reference as
    it comes, for the images in ``keep``, and remembers only the first that differs (``first``), so
    the probe holds the activations of one pass, not of one per image."""

    def __init__(self, model: nn.Module, batch_size: int):
        self.batch_size = batch_size
        self.reference: list[tuple[str, torch.Tensor | None]] | None = None
        self.keep: list[int] = []
        self.at = 0
        self.first: tuple[int, str] | None = None
        self.handles = []
        for name, m in model.named_modules():
            if not name:
                continue
            # registered after any noise hook, so the recorded input is the noised one
            self.handles.append(m.register_forward_pre_hook(lambda mod, args, n=f"{name} (input)": self._event(n, args)))
            self.handles.append(m.register_forward_hook(lambda mod, args, out, n=name: self._event(n, out)))

    def start(self, keep: list[int] | None) -> None:
        """A reference pass (``keep`` None) or a pass compared with it on the images ``keep``."""
        if keep is None:
            self.reference = []
        self.keep, self.at, self.first = keep or [], 0, None

    def _event(self, name: str, value) -> None:
        rows = _rows(_first(value), self.batch_size)
        if not self.keep:
            # a copy: an in-place operation later in the pass (ReLU(inplace=True)) would change the original
            self.reference.append((name, None if rows is None else rows.clone()))
            return
        if self.first is None and self.at < len(self.reference):
            ref = self.reference[self.at][1]
            if ref is not None and rows is not None and ref.shape == rows.shape and not _close(ref[self.keep], rows[self.keep]):
                self.first = (self.at, name)
        self.at += 1

    def remove(self):
        for h in self.handles:
            h.remove()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-12)
    return float((a - b).abs().max()) <= _REL_TOL * scale


@torch.no_grad()
def probe(model: nn.Module, input_size: tuple[int, int, int], batch_size: int = 4, train_mode: bool = False,
          injections=(), seed: int = 0) -> ProbeResult:
    """Probe ``model`` (in train or eval mode) on random images of ``input_size`` (C, H, W).

    ``injections``: noise handles hooked into the model (``inject.hook.inject``), reseeded before each
    pass so a random noise draws the same values twice. The model's mode and state are restored.
    """
    if batch_size < 2:
        raise ValueError("the probe needs a batch of at least 2 images")
    gen = torch.Generator().manual_seed(seed)
    batch = torch.randn(batch_size, *input_size, generator=gen)
    replacements = torch.randn(batch_size, *input_size, generator=gen) * 2
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    modes = {m: m.training for m in model.modules()}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    recorder = _Recorder(model, batch_size)
    max_change, first, reference = 0.0, None, None
    try:
        model.train(train_mode)
        # the batch as drawn, then with each image replaced in turn: a dependence through one image
        # only (the batch's largest value, as the impulse noise takes it) is found too
        for j in range(-1, batch_size):
            images = batch.clone()
            keep = None
            if j >= 0:
                images[j] = replacements[j]
                keep = [i for i in range(batch_size) if i != j]
            model.load_state_dict(state)
            for h in injections:
                h.reseed(seed)
            recorder.start(keep)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                logits = _first(model(images.to(device))).float().cpu()
            if keep is None:
                reference = logits
                continue
            scale = max(float(reference.abs().max()), 1e-12)
            max_change = max(max_change, float((reference[keep] - logits[keep]).abs().max()) / scale)
            if recorder.first is not None and (first is None or recorder.first[0] < first[0]):
                first = recorder.first
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v.detach().to(state[k].device), state[k])]
    finally:
        recorder.remove()
        model.load_state_dict(state)
        for m, mode in modes.items():
            m.training = mode
    return ProbeResult(batch_size, max_change, first[1] if first else None, changed)
