"""Turn the captured logs of a failed run into a reason a person can act on.

Recognises the failures that end long multi-node runs (out of memory, NCCL
timeouts and errors, killed ranks), names the first failing rank as torchrun
reports it, and adds a hint. Reads only the files under ``logs/``.
"""

from __future__ import annotations

import re
from pathlib import Path

# The last line of a Python traceback: "pkg.module.SomeError: message".
ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)(:.*)?$")
# torchrun's prefixes on a rank's lines ("[rank0]: ", "[default0]:[rank0]: ") and its
# wrapper of every rank's failure, which names no cause (its summary follows as a table).
RANK_PREFIX = re.compile(r"^(\[\w+\]:)+ ?")
TORCHRUN_WRAPPER = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError"
CHAIN_MARKERS = ("The above exception was the direct cause", "During handling of the above exception")
# torchrun's ChildFailedError summary: "Root Cause (first observed failure): ... rank : 3 (local_rank: 1)"
FIRST_FAILURE = re.compile(r"Root Cause \(first observed failure\):.*?rank\s*:\s*(\d+) \(local_rank: (\d+)\)", re.S)
OUT_OF_MEMORY = re.compile(r"CUDA out of memory|OutOfMemoryError")
OUT_OF_MEMORY_WHAT = "out of GPU memory"
DISK_FULL = re.compile(r"No space left on device|\[Errno 28\]")
KNOWN_FAILURES = (
    (OUT_OF_MEMORY, OUT_OF_MEMORY_WHAT, "a smaller --per-device-batch with --global-batch to keep the global batch"),
    (
        re.compile(r"Watchdog caught collective operation timeout|NCCL.{0,80}(timed out|[Tt]imeout)"),
        "an NCCL collective timed out",
        "check that every node started and that nodes reach each other on the interface NCCL uses "
        "(NCCL_SOCKET_IFNAME, NCCL_IB_HCA); run llava-bench check-cluster",
    ),
    (
        re.compile(r"NCCL error|ncclSystemError|ncclInternalError|ncclUnhandledCudaError|ncclRemoteError"),
        "NCCL failed",
        "check the network interface variables (NCCL_SOCKET_IFNAME, NCCL_IB_*) and run llava-bench check-cluster",
    ),
    (
        DISK_FULL,
        "a filesystem the trainer writes is full",
        "free space on it, or pass --out to a folder on a larger filesystem",
    ),
    (
        re.compile(r"pyarrow\.lib\.Arrow\w*|ArrowInvalid|ArrowIOError|DatasetGenerationError"),
        "the dataset's Arrow data could not be read",
        "a tokenized dataset damaged on disk (under <results>/cache/ or next to the dataset JSON, named "
        "tokenized-*): delete it, the next run builds it again",
    ),
    (
        re.compile(r"exitcode\s*:\s*-9|Signal 9 \(SIGKILL\)"),
        "a rank was killed (SIGKILL)",
        "often the host ran out of memory: check the container's memory limit and dmesg",
    ),
)


def _logs(logs_dir: Path) -> list[Path]:
    return sorted(logs_dir.rglob("*.log")) if logs_dir.is_dir() else []


def _chains(lines: list[str]) -> list[list[str]]:
    """The exception lines of each traceback chain in a log, in order. Python prints a
    chained exception's cause first, then "The above exception was the direct cause of
    the following exception:" (or "During handling of the above exception ..."), then
    the exception itself; a message that ends in ":" continues on the next line."""
    chains: list[list[str]] = []
    chained = False
    lines = [RANK_PREFIX.sub("", line.strip()) for line in lines]
    for index, text in enumerate(lines):
        if text.startswith(CHAIN_MARKERS):
            chained = True
        elif ERROR_LINE.match(text) and not text.startswith(TORCHRUN_WRAPPER):
            following = lines[index + 1] if index + 1 < len(lines) else ""
            if text.endswith(":") and following and not following.startswith(CHAIN_MARKERS):
                text = f"{text} {following}"
            if chained and chains:
                chains[-1].append(text)
            else:
                chains.append([text])
            chained = False
    return chains


def last_error_line(logs_dir: Path) -> str:
    """The last exception any rank wrote, with the file it is in, and the first cause of
    its chain when it has one (a wrapper's message often hides the cause)."""
    found = ""
    for log in _logs(logs_dir):
        chains = _chains(log.read_text(errors="replace").splitlines())
        if chains:
            chain = chains[-1]
            cause = f"; caused by {chain[0]}" if len(chain) > 1 and chain[0] != chain[-1] else ""
            found = f"{chain[-1]}{cause} ({log.relative_to(logs_dir)})"
    return found


def last_lines(logs_dir: Path) -> str:
    """The last non-empty line of each log, for a run that went silent."""
    parts = []
    for log in _logs(logs_dir):
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
        if lines:
            parts.append(f"{log.relative_to(logs_dir)}: {lines[-1][-200:]}")
    return "; ".join(parts)


# What CUDA's out-of-memory message says was missing: the allocation that failed and
# what the allocator held unused ("... reserved by PyTorch but unallocated").
OUT_OF_MEMORY_FIGURES = (
    re.compile(r"Tried to allocate ([\d.]+) ([GM]iB)"),
    re.compile(r"([\d.]+) ([GM]iB) is reserved by PyTorch but unallocated"),
)


def out_of_memory_shortfall_mib(logs_dir: Path) -> float:
    """The most memory any rank's out-of-memory message says it lacked, in MiB: the failed
    allocation plus what the allocator held unused (0 when no message says)."""
    most = 0.0
    for log in _logs(logs_dir):
        text = log.read_text(errors="replace")
        for line in (line for line in text.splitlines() if OUT_OF_MEMORY.search(line)):
            figures = [pattern.search(line) for pattern in OUT_OF_MEMORY_FIGURES]
            mib = sum(float(m.group(1)) * (1024 if m.group(2) == "GiB" else 1) for m in figures if m)
            most = max(most, mib)
    return most


def logs_report(logs_dir: Path, failure: re.Pattern) -> bool:
    """Whether any rank's log reports ``failure`` (OUT_OF_MEMORY, DISK_FULL)."""
    return any(failure.search(log.read_text(errors="replace")) for log in _logs(logs_dir))


def diagnose(logs_dir: Path, out_of_memory_hint: str | None = None) -> str:
    """First failing rank, the cause and a hint; the last exception line when nothing is known.
    ``out_of_memory_hint`` replaces the generic one with what helps this run's recipe."""
    texts = {log: log.read_text(errors="replace") for log in _logs(logs_dir)}
    everything = "\n".join(texts.values())
    parts = []
    first = FIRST_FAILURE.search(everything)
    if first:
        parts.append(f"rank {first.group(1)} (local rank {first.group(2)}) failed first")
    for pattern, what, hint in KNOWN_FAILURES:
        if pattern.search(everything):
            parts.append(
                f"{what}; hint: {out_of_memory_hint if what == OUT_OF_MEMORY_WHAT and out_of_memory_hint else hint}"
            )
            break
    cause = last_error_line(logs_dir)
    if cause:
        parts.append(cause)
    return "; ".join(parts)
