"""Time of an MPC run on a real network, modelled from measured bytes and rounds.

    T_net = wall_loopback + rounds * RTT + bytes * 8 / bandwidth

``wall_loopback`` is the measured wall time of the run with every party on
this machine (local compute plus loopback transfers, which are therefore
counted twice: a small over-estimate). ``rounds`` are the blocking exchanges
of the busiest party (online rounds plus its round trips to the dealer: with
CrypTen's TTP the dealer is asked in-line, on the critical path), and
``bytes`` what that party puts on the wire or pulls from the dealer (online
bytes sent + dealer bytes received); parties send at the same time over
full-duplex links, so the per-party figure is the one that takes time. The
``*_online_s`` variants count the online channel only (correlated randomness
delivered ahead of time, as a preprocessing phase would).
"""

from __future__ import annotations

NETWORKS = {
    "lan": {"bandwidth_bit_s": 10e9, "rtt_s": 0.2e-3, "label": "LAN 10 Gbit/s, 0.2 ms RTT"},
    "wan": {"bandwidth_bit_s": 400e6, "rtt_s": 40e-3, "label": "WAN 400 Mbit/s, 40 ms RTT"},
}


def modelled_s(wall_s: float, rounds: int, nbytes: float, network: str) -> float:
    net = NETWORKS[network]
    return wall_s + rounds * net["rtt_s"] + nbytes * 8 / net["bandwidth_bit_s"]


def add_network_times(row: dict) -> dict:
    """Fill ``lan_s``, ``wan_s``, ``lan_online_s``, ``wan_online_s`` of an MPC row in place."""
    for net in NETWORKS:
        row[f"{net}_s"] = round(modelled_s(row["wall_s"], row["rounds"] + row["offline_rounds"],
                                           row["bytes_per_party"], net), 3)
        row[f"{net}_online_s"] = round(modelled_s(row["wall_s"], row["rounds"], row["online_bytes"], net), 3)
    return row
