"""``bench.attack``'s bookkeeping (the attack run itself is a benchmark, not a test): the attack
list covers each group of issue 21 once per name, and closed sockets are classified by the
status line the server sent before closing."""

from __future__ import annotations

import socket

from bench.attack import ATTACKS, _drain


def test_the_attack_list_covers_every_group_with_unique_names() -> None:
    names = [spec.name for spec in ATTACKS]
    assert len(names) == len(set(names))
    assert {spec.group for spec in ATTACKS} == {"slow", "amplifier", "bomb", "500"}
    assert {spec.server for spec in ATTACKS} == {"main", "cap"}


def test_drain_counts_answers_silent_closes_and_open_sockets() -> None:
    pairs = [socket.socketpair() for _ in range(3)]
    answered, silent, still_open = (server for server, _ in pairs)
    answered.sendall(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n")
    answered.close()
    silent.close()
    try:
        statuses, _, left = _drain([client for _, client in pairs], limit_s=0.5)
    finally:
        still_open.close()
        for _, client in pairs:
            client.close()
    assert dict(statuses) == {"408": 1, "closed": 1, "open": 1}
    assert left == 1
