"""The builders of a generative model's admission input: seat choice and the wait for a seat."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.policies.token_latency import TokenLatencyModel
from ember.state import Seat, choose_seat, token_request


def _seats(*contexts: int, done: int = 0, max_tokens: int = 100) -> list[Seat]:
    return [Seat(c, done, max_tokens) for c in contexts]


def test_the_seat_is_on_the_instance_running_fewest_then_with_most_kv_room_then_by_id():
    instances = {"b": _seats(10), "a": _seats(50), "c": _seats(5, 5)}
    assert choose_seat(instances, 10, max_num_seqs=4, kv_tokens=100) == "b"  # room 90 beats 50
    assert choose_seat({"b": _seats(10), "a": _seats(10)}, 10, 4, 100) == "a"
    assert choose_seat({"x": _seats(1, 1)}, 10, max_num_seqs=2, kv_tokens=100) is None  # every seat taken
    assert choose_seat({"x": _seats(95)}, 10, max_num_seqs=4, kv_tokens=100) is None  # no KV room
    assert choose_seat({"x": []}, 500, max_num_seqs=4, kv_tokens=100) == "x"  # alone it always starts


@given(
    running=st.dictionaries(st.sampled_from("abcd"), st.lists(st.integers(1, 60), max_size=5), max_size=4),
    tokens=st.integers(1, 80),
    seats=st.integers(1, 5),
)
def test_a_chosen_instance_has_a_free_seat_and_room(running, tokens, seats):
    instances = {k: _seats(*v) for k, v in running.items()}
    chosen = choose_seat(instances, tokens, seats, kv_tokens=100)
    if chosen is not None:
        held = instances[chosen]
        assert len(held) < seats
        assert not held or 100 - sum(s.context for s in held) >= tokens


def test_a_request_joins_the_batch_of_its_seat_or_waits_for_enough_sequences_to_end():
    model = TokenLatencyModel().observe_step(2, 60, 0.1, 0.0)  # 100 ms steps; answers of 100 tokens
    view = token_request(0.0, 2.0, 0.05, 40, model, instances={}, waiting=0, max_num_seqs=2, kv_tokens=0, load_s=1.5)
    assert (view.wait_s, view.batch, view.idle) == (1.5, 0, False)
    seats = {"w": _seats(60)}
    view = token_request(0.0, 2.0, 0.05, 40, model, instances=seats, waiting=0, max_num_seqs=2, kv_tokens=0)
    assert (view.batch, view.context, view.wait_s, view.idle) == (1, 50, 0.0, True)
    full = {"w": [Seat(60, 90, 100), Seat(60, 50, 100)]}  # 10 and 50 tokens left
    view = token_request(0.0, 2.0, 0.05, 40, model, instances=full, waiting=0, max_num_seqs=2, kv_tokens=0)
    assert view.wait_s == pytest.approx(1.0) and view.seat_free_s == pytest.approx(1.0)
    assert view.batch == 1 and not view.idle
    second = token_request(0.0, 2.0, 0.05, 40, model, instances=full, waiting=1, max_num_seqs=2, kv_tokens=0)
    assert second.wait_s == pytest.approx(5.0)  # one waits ahead of it: the second seat to free
