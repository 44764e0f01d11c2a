"""StopStringMatcher: exact outputs for matches across pieces, overlaps and holdback."""

from __future__ import annotations

import random

import pytest

from tokenizer_svc.stop_strings import StopStringMatcher


def run(stop: list[str], pieces: list[str], include: bool = False) -> tuple[list[str], str | None]:
    """Emitted text per piece (the last one fed with final=True) and the stop string matched."""
    matcher = StopStringMatcher(stop, include)
    emitted, matched = [], None
    for i, piece in enumerate(pieces):
        text, stop_str = matcher.feed(piece, final=i == len(pieces) - 1)
        emitted.append(text)
        if stop_str is not None:
            assert matched is None, "a match is reported once"
            matched = stop_str
    return emitted, matched


def test_no_stop_strings_is_a_passthrough() -> None:
    matcher = StopStringMatcher([], include_stop_str_in_output=False)
    assert matcher.feed("Hello ", final=False) == ("Hello ", None)
    assert matcher.feed("world", final=False) == ("world", None)
    assert matcher.held_back == ""
    assert matcher.feed("", final=True) == ("", None)


def test_match_inside_one_piece() -> None:
    assert run(["STOP"], ["abc STOP def"]) == (["abc "], "STOP")
    assert run(["STOP"], ["abc STOP def"], include=True) == (["abc STOP"], "STOP")


def test_match_spanning_pieces_holds_back_only_a_possible_start() -> None:
    matcher = StopStringMatcher(["</answer>"], include_stop_str_in_output=False)
    assert matcher.feed("the result </an", final=False) == ("the result ", None)
    assert matcher.held_back == "</an"
    assert matcher.feed("s", final=False) == ("", None)
    assert matcher.held_back == "</ans"
    assert matcher.feed("wer> trailing", final=False) == ("", "</answer>")
    assert matcher.matched_stop == "</answer>"
    assert matcher.feed("more", final=False) == ("", None)  # nothing after a match
    assert matcher.feed("", final=True) == ("", None)


def test_spanning_match_included_in_output() -> None:
    assert run(["\n\n"], ["one\n", "\ntwo"], include=True) == (["one", "\n\n"], "\n\n")


def test_false_start_is_released() -> None:
    matcher = StopStringMatcher(["abc"], include_stop_str_in_output=False)
    assert matcher.feed("xab", final=False) == ("x", None)
    assert matcher.feed("d", final=False) == ("abd", None)
    assert matcher.held_back == ""


def test_holdback_is_the_longest_possible_start() -> None:
    # "aab" may be the start of "aabx" (hold 3), not just "ab" or "b"
    matcher = StopStringMatcher(["aabx", "b!"], include_stop_str_in_output=False)
    assert matcher.feed("zaab", final=False) == ("z", None)
    assert matcher.held_back == "aab"
    assert matcher.feed("!", final=False) == ("aa", "b!")


def test_overlapping_candidates_restart_inside_a_false_start() -> None:
    # "aaab": the first "aa" fails at the third "a", but a match starting one later succeeds
    assert run(["aab"], ["a", "a", "a", "b", "c"]) == (["", "", "a", "", ""], "aab")
    assert run(["abab"], ["aba", "a", "bab"]) == (["", "aba", ""], "abab")


def test_stop_at_the_very_start() -> None:
    assert run(["Hi"], ["Hi there"]) == ([""], "Hi")
    assert run(["Hi"], ["H", "i there"]) == (["", ""], "Hi")
    assert run(["Hi"], ["Hi there"], include=True) == (["Hi"], "Hi")


def test_earliest_match_wins_among_several() -> None:
    assert run(["world", "lo"], ["hello world"]) == (["hel"], "lo")
    assert run(["lo", "world"], ["hello world"]) == (["hel"], "lo")  # list order does not matter
    # the first one completed wins, even if a longer one started earlier
    assert run(["bc", "abcd"], ["abcd"]) == (["a"], "bc")
    assert run(["bc", "abcd"], ["ab", "cd"]) == (["", "a"], "bc")
    # both end at the same character: the longer (earlier-starting) one
    assert run(["c", "abc"], ["xabc"]) == (["x"], "abc")
    assert run(["c", "abc"], ["xabc"], include=True) == (["xabc"], "abc")


def test_final_releases_what_was_held_back() -> None:
    assert run(["STOP"], ["go ST", "O"]) == (["go ", "STO"], None)
    matcher = StopStringMatcher(["STOP"], include_stop_str_in_output=False)
    assert matcher.feed("xST", final=False) == ("x", None)
    assert matcher.feed("", final=True) == ("ST", None)
    assert matcher.held_back == ""


def test_final_piece_can_still_match() -> None:
    assert run(["STOP"], ["a ST", "OP b"]) == (["a ", ""], "STOP")


def test_empty_and_duplicate_stop_strings_are_ignored() -> None:
    assert run(["", "x", "x"], ["abxcd"]) == (["ab"], "x")
    assert run([""], ["abc"]) == (["abc"], None)


def _reference(stop: list[str], text: str, include: bool) -> tuple[str, str | None]:
    """Scan every prefix of the text: the first one containing a stop string decides."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stop if text[:end].endswith(s)]
        if hits:
            s = max(hits, key=len)
            return text[: end if include else end - len(s)], s
    return text, None


@pytest.mark.parametrize("include", [False, True])
def test_random_splits_agree_with_a_character_scan(include: bool) -> None:
    rng = random.Random(5)
    for _ in range(2000):
        stop = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 16)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(1, 5))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        emitted, matched = run(stop, pieces, include)
        assert ("".join(emitted), matched) == _reference(stop, text, include), (stop, pieces)
        held_max = max(len(s) for s in stop) - 1
        assert all(len("".join(emitted[: i + 1])) >= len("".join(pieces[: i + 1])) - held_max
                   for i in range(len(pieces)) if matched is None)
