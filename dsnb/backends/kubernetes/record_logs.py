"""What a StatefulSet job's pods left of their output in the job's record, joined to what dsnb read.

When a job ends, its pods scale their StatefulSet to 0 (:mod:`dsnb.runtime.pod_api`)
and their logs go with them. Before that, each node wrote into the record the end of its output
(``log-<node>.jsonl``) and every metric line (``metrics-<node>.jsonl``), as ``[line number, time,
line]`` rows. A client that followed the pods has most of it already; one that
came later has nothing. :func:`missing_lines` gives what the client lacks: every row after the
last line it has of that node, or all rows, with a mark where lines were not kept.

Example:
    >>> data = {"log-0.jsonl": '[0,1.0,"[default0]:step 1"]\\n[1,2.0,"[default0]:done"]', "metrics-0.jsonl": "",
    ...         "outcome-0.json": '{"node": 0, "exit_code": 0, "lines_not_kept": 0}'}
    >>> [(rank, text) for rank, text, _ in missing_lines(data, 0, 2, [(0, "step 1")])]
    [(0, 'done')]
"""

from __future__ import annotations

import json

from dsnb.backends.kubernetes.logs import split_rank
from dsnb.status import node_line_rank

#: Put where the record's rows begin after lines that were never read and not kept.
NOT_KEPT_MARK = ("[dsnb] earlier lines of this node are missing: its pod was gone before dsnb read its log, "
                 "and the job's record keeps only the end of each node's output and its metric lines")


def _rows(text: str | None) -> list[tuple[int, float, str]]:
    rows = []
    for line in (text or "").splitlines():
        try:
            number, when, raw = json.loads(line)
        except (ValueError, TypeError):
            continue
        rows.append((int(number), float(when), str(raw)))
    return rows


def belongs_to(rank: int, node: int, procs_per_node: int) -> bool:
    """Whether a ``LogLine.rank`` is one of ``node``'s ranks or its launcher's."""
    return node * procs_per_node <= rank < (node + 1) * procs_per_node or rank == node_line_rank(node)


def _after_last_read(kept: list[tuple[int, str, float]], have: list[tuple[int, str]], context: int = 5) -> int | None:
    """The index in ``kept`` just after the last line the client read, or None when none of them was kept.

    The client's lines are matched from its newest back (the entry's own closing lines are not in the
    record), each first with up to ``context`` lines before it, so that a line printed again and again
    does not match too late.
    """
    rows = [(rank, text) for rank, text, _ in kept]
    for back in range(len(have) - 1, max(len(have) - 200, 0) - 1, -1):
        for size in range(min(context, back + 1), 0, -1):
            window = have[back - size + 1:back + 1]
            for end in range(len(rows), size - 1, -1):
                if rows[end - size:end] == window:
                    return end
    return None


def missing_lines(data: dict[str, str], node: int, procs_per_node: int,
                  have: list[tuple[int, str]]) -> list[tuple[int, str, float]]:
    """``(rank, text, time)`` of node ``node``'s kept output that is not in ``have`` (its lines so far, in order).

    Args:
        data: the record's data.
        node: the node rank.
        procs_per_node: ranks per node (to give each line its global rank).
        have: ``(rank, text)`` of the lines of that node the client read.
    """
    rows = sorted(_rows(data.get(f"log-{node}.jsonl")) + _rows(data.get(f"metrics-{node}.jsonl")))  # in printed order
    if not rows:
        return []
    kept = [(*split_rank(raw, node, procs_per_node), when) for _, when, raw in rows]
    try:
        not_kept = int(json.loads(data.get(f"outcome-{node}.json") or "{}").get("lines_not_kept") or 0)
    except (ValueError, TypeError, AttributeError):
        not_kept = 0
    start = _after_last_read(kept, have)
    gap = start is None and not_kept > 0
    result = kept[start or 0:]
    if gap and result:
        result.insert(0, (node_line_rank(node), NOT_KEPT_MARK, result[0][2]))
    return result
