"""Incremental span parsing: the generated text, as it streams, -> completed span groups.

A group is a task span `<TASK>argument</TASK>` followed by zero or more grounding spans
`<BOX>label:[x1, y1, x2, y2]</BOX>` (only whitespace between them), or grounding spans on their own.
A group is complete when something other than whitespace or another <BOX> follows its last span, or at
the end of the text; a span may stay open for many steps, and a tag may arrive split across text deltas
(a `<` that could still become a tag is held until it can't). Offsets are character offsets into the
request's text ([start, end) from the task tag's `<` to the end of the last closing tag).

Bad spans still become groups, with `error` set (the engine reports them as TaskResults with that error
and the text stays as it is): a span open at the end of the text, a malformed box (not `label:[four
numbers]`, a number outside [0, 1], x2 < x1 or y2 < y1), and a task tag the span vocabulary does not know
(reported when its closing tag appears; an unknown tag never closed is plain text).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

from ..routes import GROUNDING_TASK

TAG = re.compile(r"<(/?)([A-Z][A-Z0-9_]{0,31})>")
_PARTIAL = re.compile(r"</?[A-Z0-9_]{0,32}")
BOX = GROUNDING_TASK


@dataclass
class SpanGroup:
    """task: the task tag name ("IMGSEG"), GROUNDING_TASK for boxes on their own.
    text: the task span's argument; boxes: (label, (x1, y1, x2, y2)) normalised, in order;
    box_spans: the grounding spans closed in the group, malformed ones included."""

    task: str
    start: int
    end: int = -1
    text: str = ""
    boxes: list[tuple[str, tuple[float, float, float, float]]] = field(default_factory=list)
    error: Optional[str] = None
    box_spans: int = 0

    def fail(self, msg: str) -> None:
        if self.error is None:
            self.error = msg


def parse_box(content: str) -> tuple[str, tuple[float, float, float, float]]:
    """`label:[x1, y1, x2, y2]` (label optional) -> (label, box); ValueError says what is wrong."""
    body = content.strip()
    lb = body.rfind("[")
    if lb < 0 or not body.endswith("]"):
        raise ValueError(f"malformed <BOX> {content!r}: expected 'label:[x1, y1, x2, y2]'")
    label = body[:lb].strip()
    if label:
        if not label.endswith(":"):
            raise ValueError(f"malformed <BOX> {content!r}: expected ':' between the label and the coordinates")
        label = label[:-1].strip()
    parts = [p.strip() for p in body[lb + 1:-1].split(",")]
    if len(parts) != 4:
        raise ValueError(f"malformed <BOX> {content!r}: expected 4 coordinates, got {len(parts)}")
    try:
        vals = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"malformed <BOX> {content!r}: coordinates must be numbers") from None
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in vals):
        raise ValueError(f"malformed <BOX> {content!r}: coordinates must be in [0, 1]")
    x1, y1, x2, y2 = vals
    if x2 < x1 or y2 < y1:
        raise ValueError(f"malformed <BOX> {content!r}: needs x1 <= x2 and y1 <= y2")
    return label, vals


class SpanParser:
    """Feed text deltas in order (`feed`), then `finish` once; each returns the groups completed by it."""

    def __init__(self, tasks: Iterable[str]):
        self.tasks = frozenset(tasks) - {BOX}
        self.buf = ""
        self.pos = 0
        self.state = "idle"  # idle | task | box | after
        self.group: Optional[SpanGroup] = None
        self.content = 0  # where the open span's content starts
        self.unknown: dict[str, tuple[int, int]] = {}  # unknown tag -> (start, content start) of its last opening
        self.finished = False

    def feed(self, delta: str) -> list[SpanGroup]:
        if self.finished:
            raise RuntimeError("SpanParser: feed after finish")
        self.buf += delta
        return self._scan(self._limit())

    def finish(self) -> list[SpanGroup]:
        """End of text: open spans fail, a group waiting for more boxes completes."""
        if self.finished:
            return []
        self.finished = True
        out = self._scan(len(self.buf))
        g = self.group
        if self.state in ("task", "box"):
            what = f"<{g.task}>" if self.state == "task" else "<BOX>"
            g.fail(f"span {what} still open at the end of the text")
            g.end = len(self.buf)
        if g is not None:
            out.append(g)
        self.group, self.state = None, "idle"
        return out

    def _limit(self) -> int:
        """Scan only up to a trailing '<...' that may still become a tag."""
        lt = self.buf.rfind("<", self.pos)
        if lt >= 0 and ">" not in self.buf[lt:] and _PARTIAL.fullmatch(self.buf, lt):
            return lt
        return len(self.buf)

    def _scan(self, limit: int) -> list[SpanGroup]:
        out: list[SpanGroup] = []
        buf = self.buf
        while True:
            if self.state in ("task", "box"):
                name = self.group.task if self.state == "task" else BOX
                close = f"</{name}>"
                i = buf.find(close, self.pos, limit)
                if i < 0:
                    self.pos = max(self.pos, limit - len(close) + 1, self.content)
                    return out
                self._close(buf[self.content:i], i + len(close))
                continue
            m = TAG.search(buf, self.pos, limit)
            if self.state == "after":
                stop = m.start() if m else limit
                if buf[self.pos:stop].strip() or (m and not (m.group(2) == BOX and not m.group(1))):
                    out.append(self.group)
                    self.group, self.state = None, "idle"
                    continue
                if m is None:
                    self.pos = limit
                    return out
                self._open_box(m)
                continue
            if m is None:
                self.pos = limit
                return out
            self.pos = m.end()
            closing, name = bool(m.group(1)), m.group(2)
            if closing:
                if name in self.unknown and name not in self.tasks:
                    start, content = self.unknown.pop(name)
                    g = SpanGroup(name, start, m.end(), buf[content:m.start()])
                    g.fail(f"unknown task token <{name}>; task tokens: "
                           f"{', '.join(f'<{t}>' for t in sorted(self.tasks)) or 'none'}")
                    out.append(g)
            elif name == BOX:
                self.group = SpanGroup(BOX, m.start())
                self._open_box(m)
            elif name in self.tasks:
                self.group, self.state, self.content = SpanGroup(name, m.start()), "task", m.end()
            else:
                self.unknown[name] = (m.start(), m.end())

    def _open_box(self, m: re.Match) -> None:
        self.state, self.content, self.pos = "box", m.end(), m.end()

    def _close(self, content: str, end: int) -> None:
        g = self.group
        if self.state == "task":
            g.text = content.strip()
        else:
            g.box_spans += 1
            try:
                g.boxes.append(parse_box(content))
            except ValueError as e:
                g.fail(str(e))
        g.end, self.pos, self.state = end, end, "after"
