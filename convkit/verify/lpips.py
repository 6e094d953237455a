"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric", v0.1, AlexNet trunk) from weights the user has on disk — never downloaded.

``--lpips-weights`` takes one file or two: a whole ``lpips.LPIPS(net="alex").state_dict()``
(keys ``net.slice{1-5}.N.*``, ``lin{0-4}.model.1.weight``), or torchvision's AlexNet weights
(``alexnet-owt-7be5be79.pth``: ``features.N.*``) plus the lpips package's linear layers
(``lpips/weights/v0.1/alex.pth``: ``lin{0-4}.model.1.weight``). ``.pth`` files are read with
``torch.load(weights_only=True)``; ``.safetensors`` too. The network is the lpips package's:
inputs scaled to [-1, 1] then by its fixed shift/scale, AlexNet's five ReLU outputs (torchvision
``alexnet().features`` layers 0-11), each unit-normalised over channels, squared differences
weighted by the 1x1 linear layers, averaged over space and summed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputFormatError, UsageError

# torchvision alexnet().features: index -> (in, out, kernel, stride, padding); ReLU after each,
# max-pool (3, stride 2) before 3 and 6. lpips slices: [0,2) [2,5) [5,8) [8,10) [10,12).
CONVS = {0: (3, 64, 11, 4, 2), 3: (64, 192, 5, 1, 2), 6: (192, 384, 3, 1, 1),
         8: (384, 256, 3, 1, 1), 10: (256, 256, 3, 1, 1)}
SLICE_OF = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}
POOL_BEFORE = (3, 6)
CHANNELS = (64, 192, 384, 256, 256)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def _read(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UsageError(f"no such LPIPS weights file: {path}")
    try:
        if path.suffix == ".safetensors":
            import safetensors.torch as st
            return st.load_file(str(path))
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one user-facing line
        raise InputFormatError(f"cannot read LPIPS weights ({type(e).__name__}: {e})",
                               path=path) from None
    if not isinstance(sd, dict):
        raise InputFormatError("not a state dict", path=path)
    return sd


class LPIPS:
    def __init__(self, weights: dict[str, torch.Tensor]):
        self.w = weights

    @classmethod
    def from_files(cls, paths) -> LPIPS:
        merged: dict[str, torch.Tensor] = {}
        for p in paths:
            for k, v in _read(Path(p)).items():
                if not isinstance(v, torch.Tensor):
                    continue
                if k.startswith("features."):           # torchvision AlexNet
                    i = int(k.split(".")[1])
                    if i in SLICE_OF:
                        merged[f"net.slice{SLICE_OF[i]}.{k[len('features.'):]}"] = v
                else:
                    merged[k] = v
        want = {}
        for i, (cin, cout, k, _, _) in CONVS.items():
            want[f"net.slice{SLICE_OF[i]}.{i}.weight"] = (cout, cin, k, k)
            want[f"net.slice{SLICE_OF[i]}.{i}.bias"] = (cout,)
        for j, c in enumerate(CHANNELS):
            want[f"lin{j}.model.1.weight"] = (1, c, 1, 1)
        missing = [k for k in want if k not in merged]
        bad = [f"{k} {tuple(merged[k].shape)} (want {want[k]})" for k in want
               if k in merged and tuple(merged[k].shape) != want[k]]
        if missing or bad:
            names = ", ".join(str(p) for p in paths)
            raise InputFormatError(
                f"{names}: not LPIPS AlexNet weights: " +
                (f"missing {len(missing)} tensors, e.g. {missing[0]}" if missing else
                 f"wrong shapes: {bad[0]}"),
                hint="give lpips.LPIPS(net='alex').state_dict() saved to a file, or "
                     "torchvision's alexnet weights and lpips' weights/v0.1/alex.pth")
        return cls({k: merged[k].float() for k in want})

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i, (_, _, _, stride, pad) in CONVS.items():
            if i in POOL_BEFORE:
                x = F.max_pool2d(x, 3, 2)
            s = SLICE_OF[i]
            x = F.relu(F.conv2d(x, self.w[f"net.slice{s}.{i}.weight"],
                                self.w[f"net.slice{s}.{i}.bias"], stride=stride, padding=pad))
            outs.append(x)
        return outs

    @torch.no_grad()
    def __call__(self, a: np.ndarray, b: np.ndarray) -> float:
        """LPIPS between two 8-bit RGB images (H, W, 3)."""
        shift = torch.tensor(SHIFT).view(1, 3, 1, 1)
        scale = torch.tensor(SCALE).view(1, 3, 1, 1)

        def prep(img):
            t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
            return ((t / 127.5 - 1.0) - shift) / scale

        total = 0.0
        for j, (fa, fb) in enumerate(zip(self._features(prep(a)), self._features(prep(b)))):
            na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            d = F.conv2d((na - nb) ** 2, self.w[f"lin{j}.model.1.weight"])
            total += float(d.mean())
        return total
