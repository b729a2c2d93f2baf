"""One table out of the benchmarks' logs (`benchmarks/run` calls it with its log directory).

A benchmark reports rows as `RESULT<TAB>benchmark<TAB>metric<TAB>value<TAB>target` lines;
bench_sync, which prints only its own table, is read from that table's lines, and a benchmark
whose last JSON line maps names to {ours_ms, reference_ms, ratio} (bench_cni) from that line.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

_SYNC_ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+([\d.]+)s\s+([\d.]+)s\s+([\d.]+)\s")
_SYNC_READ = re.compile(r"^\s*read_overlay_entries\s+([\d.]+)s")
_SYNC_DUMPS = re.compile(r"^\s*three ip/bridge -j dumps\s+([\d.]+)s")
_SYNC_DUAL = re.compile(r"^\s*(vxnet6?\.\d+)\s+(\d+)\s+([\d.]+)s\s+([\d.]+)s\s+([\d.]+)\s*$")
SYNC_TARGET_PEERS, SYNC_TARGET_RATIO = 5000, 0.8  # issue 14: a full sync of 5,000 peers <= 0.8x iproute2's batches


def rows_of(name: str, text: str) -> list[tuple[str, str, str, str]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("RESULT\t"):
            parts = (line.split("\t") + [""] * 5)[1:5]
            rows.append((parts[0], parts[1], parts[2], parts[3]))
    if rows:
        return rows
    if name != "bench_sync":
        return _ratio_report(name, text)
    read = dumps = None
    for line in text.splitlines():
        if m := _SYNC_ROW.match(line):
            peers, _entries, reference, ours, ratio = m.groups()
            target = ""
            if peers == str(SYNC_TARGET_PEERS):
                verdict = "meets" if float(ratio) <= SYNC_TARGET_RATIO else "MISSES"
                target = f"<= {SYNC_TARGET_RATIO}x: {verdict} (ratio {float(ratio) / SYNC_TARGET_RATIO:.2f})"
            rows.append(("sync", f"full sync {peers} peers: ours / ip+bridge -batch",
                         f"{ours} s / {reference} s = {ratio}x", target))
        elif m := _SYNC_DUAL.match(line):
            device, entries, reference, ours, ratio = m.groups()
            rows.append(("sync", f"full sync {entries} dual-stack entries on {device}: ours / ip+bridge -batch",
                         f"{ours} s / {reference} s = {ratio}x", ""))
        elif m := _SYNC_READ.match(line):
            read = m.group(1)
        elif m := _SYNC_DUMPS.match(line):
            dumps = m.group(1)
    if read:
        rows.append(("sync", "read back 5000 peers: ours / ip -j dumps", f"{read} s / {dumps or '?'} s", ""))
    return rows


def _ratio_report(name: str, text: str) -> list[tuple[str, str, str, str]]:
    for line in reversed(text.splitlines()):
        if not line.startswith("{"):
            continue
        try:
            report = json.loads(line)
        except ValueError:
            continue
        if isinstance(report, dict) and all(isinstance(v, dict) and "ratio" in v for v in report.values()):
            return [(name.removeprefix("bench_"), f"{metric}: ours / reference",
                     f"{v.get('ours_ms')} ms / {v.get('reference_ms')} ms = {v['ratio']}x", "")
                    for metric, v in report.items()]
    return []


def main(log_dir: str) -> int:
    table = []
    for log in sorted(Path(log_dir).glob("*.log")):
        name = log.stem
        rc_file = log.with_suffix(".rc")
        rc = rc_file.read_text().strip() if rc_file.exists() else "?"
        rows = rows_of(name, log.read_text(errors="replace"))
        if rc != "0":
            table.append((name.removeprefix("bench_"), "FAILED", f"exit {rc}", ""))
        table.extend(rows or [(name.removeprefix("bench_"), "(no summary rows; see its output above)", "", "")])
    headers = ("benchmark", "metric", "value", "target")
    widths = [max(len(h), *(len(r[i]) for r in table)) if table else len(h) for i, h in enumerate(headers)]
    print("\n== summary")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
