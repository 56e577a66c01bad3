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
from nir_lightning.alignment.cpu import denormals_flushed, flushing_denormals, one_thread
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
        seen.append(flushing_denormals() and torch.get_num_threads() == 1)
        return original(self, *args)

    monkeypatch.setattr(AffineStage, "_similarity", recording)
    stage = AffineStage(kind="rigid", rigid_iterations=(20, 10, 5), **FAST)
    flushed = stage.fit(tensor(image), affine, moving, moving_affine)
    assert seen and all(seen) and not flushing_denormals()
    seen.clear()
    monkeypatch.setattr(stage_module, "stage_arithmetic", lambda device: contextlib.nullcontext())
    with one_thread():
        plain = stage.fit(tensor(image), affine, moving, moving_affine)
    assert seen and not any(seen)  # one thread, not flushed
    assert np.array_equal(flushed.world, plain.world)
    assert [h.loss_end for h in flushed.history] == [h.loss_end for h in plain.history]


def test_the_stage_runs_on_one_thread_and_gives_the_same_matrix_whatever_the_thread_count(phantom):
    image, affine, _ = phantom
    moving, moving_affine = moving_for("header", image, affine, true_rigid())
    stage = AffineStage(kind="rigid", rigid_iterations=(20, 10, 5), **FAST)
    before = torch.get_num_threads()
    try:
        worlds = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            worlds.append(stage.fit(tensor(image), affine, moving, moving_affine).world)
            assert torch.get_num_threads() == threads and not flushing_denormals()
    finally:
        torch.set_num_threads(before)
    assert np.array_equal(worlds[0], worlds[1])


def test_one_thread_restores_the_count_even_on_an_error():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError), one_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
