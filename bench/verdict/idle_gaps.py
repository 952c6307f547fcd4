"""Where a profiled step's GPU waits: the gaps between its kernels, from `run --profile`'s
Chrome trace, each charged to the CPU ops that launched the kernel after it.

The profile's idle share says how long the GPU had nothing to run, not why. A gap ends
when the CPU launches the next kernel, so the ops around that launch (the enclosing
ones on the launching thread, outermost first: an autograd node, a recompute range, an
aten op) say what the CPU was doing instead of feeding the GPU; the stream
synchronizations counted beside them are the places where the CPU waited for the GPU
to drain its queue first. Read by `perf` after the runs, so the training steps are not
slowed by it.
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict

# Shorter gaps are the launch itself, not waiting.
MIN_GAP_US = 5
# Gap lengths, microseconds: bucket -> upper bound.
GAP_LENGTHS = {"under 50 us": 50, "50 us to 1 ms": 1_000, "1 ms and over": float("inf")}
DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
CPU_CATEGORIES = {"cpu_op", "user_annotation"}
# Launches: the runtime's, and the driver's (Triton's kernels).
LAUNCH_CATEGORIES = {"cuda_runtime", "cuda_driver"}
# Enclosing ops named for a gap: the outermost ones and the innermost one.
OUTER_OPS = 2


def idle_gaps(trace_events: list[dict], top: int = 8) -> dict:
    """The gaps over MIN_GAP_US between consecutive device events of ``trace_events``
    (a Chrome trace's complete events), in seconds by length and by the CPU ops that
    launched the kernel after each (the ``top`` largest), and the trace's stream and
    device synchronizations."""
    complete = [event for event in trace_events if event.get("ph") == "X"]
    device = sorted((e for e in complete if e.get("cat") in DEVICE_CATEGORIES), key=lambda e: e["ts"])
    launches = {
        e["args"]["correlation"]: e
        for e in complete
        if e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {})
    }
    enclosing = _Enclosing(e for e in complete if e.get("cat") in CPU_CATEGORIES)
    by_length, by_ops = Counter(dict.fromkeys(GAP_LENGTHS, 0.0)), Counter()
    for before, after in zip(device, device[1:]):
        gap = after["ts"] - (before["ts"] + before["dur"])
        if gap <= MIN_GAP_US:
            continue
        by_length[next(name for name, bound in GAP_LENGTHS.items() if gap < bound)] += gap / 1e6
        launch = launches.get(after.get("args", {}).get("correlation"))
        by_ops[enclosing.path(launch) if launch else "(launch not in the trace)"] += gap / 1e6
    synchronizations = sum(
        1
        for e in complete
        if e.get("cat") == "cuda_runtime" and e["name"] in ("cudaStreamSynchronize", "cudaDeviceSynchronize")
    )
    return {
        "gap_seconds": sum(by_length.values()),
        "by_length_seconds": dict(by_length),
        "by_launching_ops": [{"ops": ops, "seconds": seconds} for ops, seconds in by_ops.most_common(top)],
        "synchronizations": synchronizations,
    }


class _Enclosing:
    """The CPU ops of each thread as a forest (each op's parent: the innermost op still
    open when it starts), to find the ops enclosing a moment in depth steps."""

    def __init__(self, ops):
        self._ops: dict = defaultdict(list)
        for op in ops:
            self._ops[op["tid"]].append(op)
        self._parents, self._starts = {}, {}
        for tid, thread_ops in self._ops.items():
            thread_ops.sort(key=lambda op: (op["ts"], -op["dur"]))  # an enclosing op before what it encloses
            parents, open_ops = [], []
            for index, op in enumerate(thread_ops):
                while open_ops and _end(thread_ops[open_ops[-1]]) <= op["ts"]:
                    open_ops.pop()
                parents.append(open_ops[-1] if open_ops else None)
                open_ops.append(index)
            self._parents[tid], self._starts[tid] = parents, [op["ts"] for op in thread_ops]

    def path(self, launch: dict) -> str:
        """The ops enclosing ``launch`` on its thread, outermost first: the OUTER_OPS
        outermost and the innermost, or "(no op)"."""
        tid = launch["tid"]
        if tid not in self._ops:
            return "(no op)"
        ops, parents = self._ops[tid], self._parents[tid]
        started = bisect.bisect_right(self._starts[tid], launch["ts"])
        index = started - 1 if started else None  # the last op started by then, or none
        while index is not None and _end(ops[index]) < _end(launch):
            index = parents[index]
        names = []
        while index is not None:
            names.append(ops[index]["name"])
            index = parents[index]
        names.reverse()
        if len(names) > OUTER_OPS + 1:
            names = [*names[:OUTER_OPS], "...", names[-1]]
        return " > ".join(names) or "(no op)"


def _end(event: dict) -> float:
    return event["ts"] + event["dur"]
