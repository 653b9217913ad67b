#!/usr/bin/env python3
"""Print one table of ratios from the last `cargo bench` run.

Usage: cargo bench && python3 benches/ratios.py

Reads criterion's estimates under target/criterion and the JSON that the latency and
resources benches write there. Every agentbus figure is divided by its baseline from
the same run, on the same file system.
"""
import glob
import json
import os
import platform
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "criterion")


def load():
    times = {}
    for bench in glob.glob(os.path.join(ROOT, "**", "new", "benchmark.json"), recursive=True):
        meta = json.load(open(bench))
        est = json.load(open(os.path.join(os.path.dirname(bench), "estimates.json")))
        times[(meta["group_id"], meta["function_id"])] = est["mean"]["point_estimate"]
    return times


def extra(name):
    path = os.path.join(ROOT, name)
    return json.load(open(path)) if os.path.exists(path) else {}


def main():
    t = load()
    rows = []

    def ratio(label, group, base, ours, target, higher_is_better=True):
        if (group, base) not in t or (group, ours) not in t:
            rows.append((label, "not measured", target, ""))
            return
        r = t[(group, base)] / t[(group, ours)] if higher_is_better else t[(group, ours)] / t[(group, base)]
        ok = r >= target if higher_is_better else r <= target
        sign = ">=" if higher_is_better else "<="
        rows.append((label, f"{r:.2f}x", f"{sign} {target}", "met" if ok else "MISSED"))

    ratio("send Flush / raw write()", "flush", "raw_write", "send", 0.30)
    ratio("send Flush / raw flock+fstat+write (the floor)", "flush", "raw_flock_fstat_write", "send", 0.5)
    ratio("send Sync / raw write+fdatasync", "sync", "raw_write_fdatasync", "send", 0.85)
    ratio("send_batch(100) Sync / raw batch+fdatasync", "batch100_sync", "raw_write_fdatasync", "send_batch", 0.50)
    ratio("drain 100k, ack each / raw write", "drain_100k", "raw_write", "per_message_ack", 0.10)
    ratio("drain 100k, cumulative ack / raw write", "drain_100k", "raw_write", "cumulative_ack", 0.25)
    if ("lease", "acquire_release") in t:
        us = t[("lease", "acquire_release")] / 1000
        rows.append(("lease acquire+release (2 fsyncs, always)", f"{us:.0f} us", "-", ""))
    ratio("receive next: 1M history / empty", "receive_next", "empty_mailbox", "history_1M", 1.2, higher_is_better=False)
    ratio("open+receive after 1M compacted / fresh", "open_and_receive_next", "fresh_mailbox", "after_1M_compacted", 1.2, higher_is_better=False)
    for mode, send_target, claim_target in [("flush_vs_normal", 5, 5), ("sync_vs_full", 1, 2)]:
        ratio(f"send vs SQLite ({mode})", f"{mode}/send", "sqlite", "agentbus", send_target)
        ratio(f"claim+ack vs SQLite ({mode})", f"{mode}/claim_ack", "sqlite", "agentbus", claim_target)

    # The JetStream backend (cargo bench --features nats --bench nats, with a server).
    for group, what in [("backend_send", "send"), ("backend_claim_ack", "claim+ack")]:
        if (group, "jetstream") in t:
            for base in ["dir_flush", "dir_sync"]:
                if (group, base) in t:
                    r = t[(group, "jetstream")] / t[(group, base)]
                    rows.append((f"{what}: JetStream time / directory {base[4:]}", f"{r:.2f}x", "-", ""))
    lat = extra("agentbus-latency.json")
    if lat:
        r = lat["agentbus_p50_us"] / lat["raw_p50_us"]
        rows.append(("cross-process latency p50 / raw inotify", f"{r:.2f}x", "<= 5", "met" if r <= 5 else "MISSED"))
        p99 = lat["agentbus_p99_us"]
        rows.append(("cross-process latency p99", f"{p99:.0f} us", "< 1000 us", "met" if p99 < 1000 else "MISSED"))
    res = extra("agentbus-resources.json")
    if res:
        mem = res["peak_rss_mib"]
        rows.append((f"peak memory draining {res['drained_mib']} MiB", f"{mem:.1f} MiB", "<= 32 MiB", "met" if mem <= 32 else "MISSED"))
        cli = res["cli_send_median_ms"]
        rows.append(("CLI send, median wall time", f"{cli:.2f} ms", "<= 3 ms", "met" if cli <= 3 else "MISSED"))

    width = max(len(r[0]) for r in rows)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}")
    print(f"{'measure'.ljust(width)}  {'result':>12}  {'target':>10}")
    for label, value, target, verdict in rows:
        print(f"{label.ljust(width)}  {value:>12}  {target:>10}  {verdict}")


if __name__ == "__main__":
    sys.exit(main())
