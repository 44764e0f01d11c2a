"""Exact-expectation tests of the token sampler (CPU; the code is device-agnostic)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import pytest
import torch

from gpu_worker.sampler import SamplerOutput, process_logits, sample
from gpu_worker.sampling_noise import hash32, noise_key, uniform_noise
from gpu_worker.sampling_batch import SamplingBatch, SamplingRow

CPU = torch.device("cpu")


def make_row(**overrides: object) -> SamplingRow:
    fields: dict[str, object] = dict(
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        min_p=0.0,
        repetition_penalty=1.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        seed=0,
        output_index=0,
        prompt_token_ids=[],
        output_token_ids=[],
        banned_token_ids=[],
        num_logprobs=None,
    )
    fields.update(overrides)
    return SamplingRow(**fields)  # type: ignore[arg-type]


def run(logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
    return sample(logits, SamplingBatch.build(rows, logits.shape[1], CPU))


def draws(logits_row: torch.Tensor, base: SamplingRow, seeds: range) -> list[int]:
    """One row per seed, same logits, one batched call."""
    rows = [replace(base, seed=s) for s in seeds]
    logits = logits_row.unsqueeze(0).expand(len(rows), -1).contiguous()
    return run(logits, rows).token_ids.tolist()


def random_logits(n: int, v: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * 3.0


# ---- greedy ----


def test_greedy_is_argmax() -> None:
    logits = random_logits(8, 1000)
    out = run(logits, [make_row(temperature=0.0, seed=i) for i in range(8)])
    assert out.token_ids.dtype == torch.int64
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert out.logprobs is None


def test_top_k_one_equals_greedy() -> None:
    logits = random_logits(32, 500, seed=1)
    rows = [make_row(top_k=1, temperature=1.5, seed=1000 + i) for i in range(32)]
    assert torch.equal(run(logits, rows).token_ids, logits.argmax(dim=-1))


def test_mixed_greedy_and_random_rows() -> None:
    logits = random_logits(6, 300, seed=2)
    rows = [make_row(temperature=0.0 if i % 2 == 0 else 0.8, seed=i) for i in range(6)]
    tokens = run(logits, rows).token_ids
    assert tokens[0::2].tolist() == logits[0::2].argmax(dim=-1).tolist()
    for i in (1, 3, 5):  # each random row draws what it draws alone
        assert tokens[i].item() == run(logits[i : i + 1], [rows[i]]).token_ids.item()


def test_input_logits_are_not_modified() -> None:
    logits = random_logits(2, 50, seed=3)
    before = logits.clone()
    rows = [
        make_row(temperature=0.0, banned_token_ids=[1, 2], repetition_penalty=1.3,
                 prompt_token_ids=[3], output_token_ids=[4, 4], frequency_penalty=0.2),
        make_row(top_p=0.5, top_k=7, min_p=0.1, presence_penalty=0.4, output_token_ids=[5]),
    ]
    run(logits, rows)
    assert torch.equal(logits, before)


# ---- banned tokens ----


def test_banned_tokens_never_chosen() -> None:
    logits = torch.tensor([[5.0, 4.9, 4.8, 0.0, -1.0]])
    banned = [0, 1]
    greedy = run(logits, [make_row(temperature=0.0, banned_token_ids=banned)])
    assert greedy.token_ids.tolist() == [2]
    seen = set(draws(logits[0], make_row(temperature=2.0, banned_token_ids=banned), range(3000)))
    assert seen == {2, 3, 4}


# ---- penalties (exact processed logits) ----


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0, 1.0]])
    row = make_row(repetition_penalty=2.0, prompt_token_ids=[0, 1], output_token_ids=[1, 3])
    processed = process_logits(logits, SamplingBatch.build([row], 5, CPU))
    assert processed.tolist() == [[1.0, -4.0, 3.0, -2.0, 1.0]]


def test_presence_and_frequency_penalties_use_output_tokens_only() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]])
    row = make_row(
        presence_penalty=0.5,
        frequency_penalty=0.25,
        prompt_token_ids=[4, 4, 4],
        output_token_ids=[0, 2, 2, 2],
    )
    processed = process_logits(logits, SamplingBatch.build([row], 5, CPU))
    # token 0: 1 - 0.25*1 - 0.5 ; token 2: 1 - 0.25*3 - 0.5 ; prompt-only token 4 untouched
    assert processed.tolist() == [[0.25, 1.0, -0.25, 1.0, 1.0]]


def test_penalties_are_per_row_and_combine_with_banned() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0], [2.0, -2.0, 1.0], [2.0, -2.0, 1.0]])
    rows = [
        make_row(repetition_penalty=2.0, presence_penalty=1.0, output_token_ids=[0]),
        make_row(output_token_ids=[0, 1], banned_token_ids=[2]),  # no penalty, one ban
        make_row(frequency_penalty=1.0, output_token_ids=[1, 1]),
    ]
    processed = process_logits(logits, SamplingBatch.build(rows, 3, CPU))
    inf = float("inf")
    assert processed.tolist() == [[0.0, -2.0, 1.0], [2.0, -2.0, -inf], [2.0, -4.0, 1.0]]


def test_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    row = make_row(temperature=0.0, repetition_penalty=2.0, output_token_ids=[0])
    assert run(logits, [row]).token_ids.tolist() == [1]


# ---- filtering: exactly the allowed set ever appears ----

FILTER_LOGITS = torch.log(torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04]))


@pytest.mark.parametrize(
    ("settings", "allowed"),
    [
        (dict(top_k=3), {0, 1, 2}),
        (dict(top_p=0.6), {0, 1}),  # 0.40 + 0.25 >= 0.6
        (dict(top_p=0.85), {0, 1, 2, 3}),  # needs 0.40 + 0.25 + 0.15 + 0.10
        (dict(min_p=0.3), {0, 1, 2}),  # p >= 0.12
        (dict(top_k=4, top_p=0.75), {0, 1, 2}),  # renormalised over 4: .444 + .278 < .75
        (dict(min_p=0.3, top_p=0.55), {0, 1}),  # renormalised over 3: .5 + .3125 >= .55
        (dict(), {0, 1, 2, 3, 4, 5}),
    ],
)
def test_filters_keep_exactly_the_allowed_tokens(settings: dict, allowed: set[int]) -> None:
    seen = Counter(draws(FILTER_LOGITS, make_row(**settings), range(4000)))
    assert set(seen) == allowed


def test_filters_apply_after_temperature() -> None:
    # At T=0.25 the probabilities sharpen to ~[.85, .13, .02, ...]: min_p 0.1 keeps two.
    seen = set(draws(FILTER_LOGITS, make_row(temperature=0.25, min_p=0.1), range(4000)))
    assert seen == {0, 1}


# ---- seeded determinism ----


def test_seeded_row_is_independent_of_batch_and_position() -> None:
    v = 2000
    target_logits = random_logits(1, v, seed=4)[0] * 0.2  # flat-ish: many plausible tokens
    target = make_row(seed=123456789, output_index=7, top_p=0.95, temperature=1.1)
    alone = run(target_logits.unsqueeze(0), [target]).token_ids.item()
    for size, position in [(5, 3), (17, 0), (17, 16), (40, 21)]:
        others = random_logits(size, v, seed=size)
        others[position] = target_logits
        rows = [make_row(seed=size * 100 + i, temperature=0.0 if i % 3 == 0 else 0.7,
                         top_k=50 if i % 2 else 0) for i in range(size)]
        rows[position] = target
        assert run(others, rows).token_ids[position].item() == alone


def test_output_index_and_seed_change_the_draw() -> None:
    flat = torch.zeros(1000)
    base = [run(flat.unsqueeze(0), [make_row(seed=s)]).token_ids.item() for s in range(20)]
    next_index = [
        run(flat.unsqueeze(0), [make_row(seed=s, output_index=1)]).token_ids.item()
        for s in range(20)
    ]
    assert sum(a != b for a, b in zip(base, next_index)) >= 18
    assert len(set(base)) >= 18  # neighbouring seeds do not repeat each other
    assert noise_key(5, 0) != noise_key(5, 1) != noise_key(6, 1)


def _reference_hash32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


def test_hash_matches_32bit_reference_on_ints_and_tensors() -> None:
    values = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 123456789]
    expected = [_reference_hash32(x) for x in values]
    assert hash32(torch.tensor(values, dtype=torch.int64)).tolist() == expected
    assert [hash32(x) for x in values] == expected


def test_noise_keys_agree_between_ints_and_tensors_for_any_int64_seed() -> None:
    seeds = [-(2**63), -1, 0, 1, 2**32, 2**63 - 1]
    indices = [0, 2**40, 3, 7, 7, 2**62]
    keys = noise_key(torch.tensor(seeds), torch.tensor(indices)).tolist()
    assert keys == [noise_key(s, i) for s, i in zip(seeds, indices)]
    assert all(0 <= k < 2**32 for k in keys) and len(set(keys)) == len(keys)


def test_uniform_noise_is_in_open_unit_interval() -> None:
    noise = uniform_noise(torch.tensor([0, 0xFFFFFFFF, 12345]), 4096)
    assert noise.dtype == torch.float64 and noise.shape == (3, 4096)
    assert bool((noise > 0).all()) and bool((noise < 1).all())
    assert abs(noise.mean().item() - 0.5) < 0.01
    assert len({tuple(r) for r in noise.tolist()}) == 3


def test_seeds_beyond_int64_wrap_instead_of_failing() -> None:
    logits = random_logits(1, 100, seed=5)
    wrapped = run(logits, [make_row(seed=2**64 + 42)]).token_ids.item()
    assert wrapped == run(logits, [make_row(seed=42)]).token_ids.item()


# ---- statistics (deterministic: the seeds are fixed) ----


def test_frequencies_over_seeds_match_softmax() -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.5, 2.0])
    temperature = 0.7
    n = 6000
    counts = Counter(draws(logits, make_row(temperature=temperature), range(n)))
    expected = torch.softmax(logits / temperature, dim=0).tolist()
    for token, p in enumerate(expected):
        assert abs(counts[token] / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3


def test_frequencies_over_output_indices_match_softmax() -> None:
    """One request's successive steps (same seed, output_index 0..n-1) are unbiased too."""
    logits = torch.tensor([0.0, 1.0, 2.0, 0.5])
    n = 6000
    rows = [make_row(seed=99, output_index=i) for i in range(n)]
    tokens = run(logits.unsqueeze(0).expand(n, -1).contiguous(), rows).token_ids.tolist()
    counts = Counter(tokens)
    for token, p in enumerate(torch.softmax(logits, dim=0).tolist()):
        assert abs(counts[token] / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3


# ---- logprobs ----


def test_logprobs_use_raw_logits_and_report_top_k_and_rank() -> None:
    logits = random_logits(4, 200, seed=6)
    rows = [
        make_row(temperature=0.0, num_logprobs=5),
        make_row(temperature=0.9, top_k=20, num_logprobs=2, seed=7,
                 repetition_penalty=1.5, output_token_ids=[3, 4]),
        make_row(temperature=1.3, num_logprobs=None, seed=8),
        make_row(temperature=0.0, banned_token_ids=[int(logits[3].argmax())], num_logprobs=0),
    ]
    out = run(logits, rows)
    assert out.logprobs is not None
    raw = torch.log_softmax(logits, dim=-1)
    lp = out.logprobs
    assert lp.token_ids.shape == (4, 6) and lp.logprobs.shape == (4, 6)
    assert lp.token_ids.dtype == torch.int64 and lp.logprobs.dtype == torch.float32
    assert torch.equal(lp.token_ids[:, 0], out.token_ids)
    assert torch.equal(lp.logprobs[:, 0], raw.gather(1, out.token_ids.unsqueeze(1))[:, 0])
    top = raw.topk(5, dim=-1)
    assert torch.equal(lp.token_ids[:, 1:], top.indices)
    assert torch.equal(lp.logprobs[:, 1:], top.values)
    sorted_desc = raw.argsort(dim=-1, descending=True)
    expected_ranks = [
        int((sorted_desc[i] == out.token_ids[i]).nonzero()) + 1 for i in range(4)
    ]
    assert lp.ranks.tolist() == expected_ranks
    assert lp.ranks[0].item() == 1  # greedy, no processing: the raw argmax
    assert lp.ranks[3].item() == 2  # greedy after banning the raw argmax


def test_logprobs_zero_k_gives_only_the_sampled_column() -> None:
    logits = random_logits(3, 40, seed=9)
    out = run(logits, [make_row(temperature=0.0, num_logprobs=0)] * 3)
    assert out.logprobs is not None
    assert out.logprobs.token_ids.shape == (3, 1)
    assert out.logprobs.ranks.tolist() == [1, 1, 1]


# ---- batch construction ----


def test_build_flags_and_tensors_for_mixed_rows() -> None:
    rows = [
        make_row(temperature=0.0, num_logprobs=3, prompt_token_ids=[1, 2]),
        make_row(temperature=0.8, top_k=5, repetition_penalty=1.2, prompt_token_ids=[1],
                 output_token_ids=[2], seed=-3, output_index=4),
        make_row(temperature=1.0, top_p=0.9, min_p=0.05, frequency_penalty=0.5,
                 output_token_ids=[7, 7], banned_token_ids=[0]),
        make_row(temperature=1.0, top_k=-1, num_logprobs=1),
    ]
    b = SamplingBatch.build(rows, 10, CPU)
    assert (b.num_rows, b.vocab_size, b.num_random) == (4, 10, 3)
    assert b.random_rows.tolist() == [1, 2, 3]
    assert b.top_k.tolist() == [5, 10, 10]
    assert b.seeds.tolist() == [-3, 0, 0] and b.output_index.tolist() == [4, 0, 0]
    assert b.temperature.tolist() == pytest.approx([0.8, 1.0, 1.0])
    assert b.repetition_penalty.tolist() == pytest.approx([1.0, 1.2, 1.0, 1.0])
    assert b.banned_index is not None and b.banned_index.tolist() == [20]
    assert b.repetition_index is not None and b.repetition_index.tolist() == [11, 12]
    assert b.output_count_index is not None and b.output_count_index.tolist() == [27, 27]
    assert (b.all_greedy, b.all_random, b.any_penalty) == (False, False, True)
    assert (b.any_top_k, b.any_top_p, b.any_min_p, b.any_top_k_or_p) == (True, True, True, True)
    assert (b.max_top_k, b.max_num_logprobs) == (5, 3)
    out = sample(random_logits(4, 10, seed=10), b)
    assert out.token_ids.shape == (4,) and out.logprobs is not None
    assert out.logprobs.token_ids.shape == (4, 4)


def test_build_plain_rows_needs_no_token_tensors() -> None:
    rows = [make_row(temperature=0.0, prompt_token_ids=[1, 2, 3], output_token_ids=[4])] * 3
    b = SamplingBatch.build(rows, 10, CPU)
    assert b.banned_index is None and b.repetition_index is None
    assert b.output_count_index is None
    assert (b.all_greedy, b.any_penalty, b.any_top_k_or_p, b.max_num_logprobs) == (
        True, False, False, None)


def test_build_rejects_out_of_vocab_history_but_drops_unproducible_bans() -> None:
    with pytest.raises(ValueError):
        SamplingBatch.build([make_row(output_token_ids=[10], repetition_penalty=1.1)], 10, CPU)
    with pytest.raises(ValueError):
        SamplingBatch.build([make_row(prompt_token_ids=[-1], repetition_penalty=1.1)], 10, CPU)
    b = SamplingBatch.build([make_row(banned_token_ids=[10, 3, 99])], 10, CPU)
    assert b.banned_index is not None and b.banned_index.tolist() == [3]


def test_non_contiguous_logits_are_handled() -> None:
    base = random_logits(40, 3, seed=11)
    logits = base.t()  # [3, 40] view with transposed strides
    rows = [make_row(temperature=0.0, banned_token_ids=[int(logits[i].argmax())]) for i in range(3)]
    expected = logits.clone().contiguous()
    for i in range(3):
        expected[i, int(logits[i].argmax())] = float("-inf")
    assert torch.equal(run(logits, rows).token_ids, expected.argmax(dim=-1))


def test_empty_batch_returns_empty_tensors() -> None:
    out = run(torch.zeros(0, 32), [])
    assert out.token_ids.shape == (0,) and out.token_ids.dtype == torch.int64
    assert out.logprobs is None


def test_wrong_logits_shape_is_rejected() -> None:
    with pytest.raises(ValueError):
        run(torch.zeros(2, 32), [make_row()])
