"""The affine stage runs with subnormal floats flushed to zero (issue 25): the products of its
Parzen windows underflow into subnormals, which made three quarters of a step's time; flushed, the stage finds the same
matrix bit for bit, and the flag is this thread's again after it (the deformable fit never sees it)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import nir_lightning.alignment.stage as stage_module
from nir_lightning.alignment import AffineStage
from nir_lightning.alignment.denormals import denormals_flushed, flushing_denormals
from tests.alignment.test_affine_stage import FAST, moving_for, tensor, true_rigid

pytestmark = pytest.mark.skipif(
    not torch.set_flush_denormal(False), reason="the CPU cannot flush subnormals (not x86 with SSE3)"
)


def test_the_flag_is_on_inside_and_restored_after_even_on_an_error():
    assert not flushing_denormals()
    with denormals_flushed():
        assert flushing_denormals()
    assert not flushing_denormals()
    with pytest.raises(RuntimeError), denormals_flushed():
        raise RuntimeError("inside")
    assert not flushing_denormals()


def test_a_flag_set_by_the_caller_is_left_on():
    torch.set_flush_denormal(True)
    try:
        with denormals_flushed():
            pass
        assert flushing_denormals()
    finally:
        torch.set_flush_denormal(False)


def test_the_stage_finds_the_same_matrix_bit_for_bit_flushed_or_not(phantom, monkeypatch):
    image, affine, _ = phantom
    moving, moving_affine = moving_for("header", image, affine, true_rigid())
    seen: list[bool] = []
    original = AffineStage._similarity

    def recording(self, *args):  # type: ignore[no-untyped-def]
        seen.append(flushing_denormals())
        return original(self, *args)

    monkeypatch.setattr(AffineStage, "_similarity", recording)
    stage = AffineStage(kind="rigid", rigid_iterations=(20, 10, 5), **FAST)
    flushed = stage.fit(tensor(image), affine, moving, moving_affine)
    assert seen and all(seen) and not flushing_denormals()
    seen.clear()
    monkeypatch.setattr(stage_module, "denormals_flushed", contextlib.nullcontext)
    plain = stage.fit(tensor(image), affine, moving, moving_affine)
    assert seen and not any(seen)
    assert np.array_equal(flushed.world, plain.world)
    assert [h.loss_end for h in flushed.history] == [h.loss_end for h in plain.history]
