"""An artifact as the diffusers pipeline that renders it: built through the view, it draws
what the original model draws, pixel for pixel."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from convkit import tiny
from convkit.errors import UsageError
from convkit.render import pipeline_for


def _draw(pipe, seed=7):
    out = pipe("a red circle on a blue background", num_inference_steps=2, guidance_scale=2.0,
               height=32, width=32, generator=torch.Generator().manual_seed(seed),
               output_type="np")
    return np.asarray(out.images[0])


@pytest.fixture(scope="module")
def reference(sdxl):
    return _draw(tiny.pipeline(sdxl[0]))


def test_folder_renders_like_the_original(sdxl, reference):
    _, _, folder, _ = sdxl
    img = _draw(pipeline_for(folder))
    assert img.shape == (32, 32, 3) and np.isfinite(img).all()
    assert np.array_equal(img, reference)


def test_single_file_with_config_folder_renders_like_the_original(sdxl, reference):
    _, single, folder, _ = sdxl
    assert np.array_equal(_draw(pipeline_for(single, config_from=folder)), reference)


def test_unet_only_file_takes_the_rest_from_base(sdxl, reference, tmp_path):
    from convkit.convert import convert

    _, single, folder, _ = sdxl
    unet = tmp_path / "unet.safetensors"
    convert(single, unet, "fp32", components="unet")
    with pytest.raises(UsageError, match="--base"):
        pipeline_for(unet, config_from=folder)
    assert np.array_equal(_draw(pipeline_for(unet, base=single, config_from=folder)), reference)
