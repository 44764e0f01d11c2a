"""The start-up choice of each small-batch matrix product (gpu_worker.device_timing.pick over
gpu_worker.matmul_tuning's candidates): the timings come from the device, the rule that turns
them into a choice is checked here exactly."""

from __future__ import annotations

from gpu_worker.device_timing import MARGIN, pick
from gpu_worker.matmul_tuning import CublasLt, SkinnyConfig, describe

SKINNY = SkinnyConfig(64, 128, 4, 5, 1)
OTHER = SkinnyConfig(32, 128, 4, 3, 1)


def test_the_fastest_alternative_wins_when_it_beats_cublas_by_the_margin() -> None:
    assert pick(100.0, [(96.0, CublasLt()), (90.0, SKINNY), (95.0, OTHER)]) == SKINNY
    assert pick(36.3, [(31.6, CublasLt()), (34.3, SKINNY)]) == CublasLt()  # H200, down at M = 64


def test_cublas_stays_unless_an_alternative_is_clearly_faster() -> None:
    assert pick(100.0, [(100.0 * MARGIN + 0.01, CublasLt()), (99.0, SKINNY)]) is None
    assert pick(100.0, [(100.0 * MARGIN, SKINNY)]) == SKINNY  # exactly at the margin counts
    assert pick(100.0, []) is None  # every alternative failed or disagreed with F.linear


def test_ties_go_to_the_earlier_candidate() -> None:
    assert pick(100.0, [(80.0, CublasLt()), (80.0, SKINNY)]) == CublasLt()


def test_choices_are_described_for_the_start_up_log() -> None:
    assert describe(CublasLt()) == "cublaslt"
    assert describe(SkinnyConfig(64, 128, 4, 5, 2)) == "skinny(n64,k128,w4,s5,split2)"
