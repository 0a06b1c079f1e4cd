"""Carry the series' insertions into lists that upstream also edited.

Upstream edits some files as lists: ``MAINTAINERS`` (sections), Sphinx
toctrees, ``meson.build`` source lists, ``Kconfig`` entries,
``docs/specs/pci-ids.rst``.  When the series adds a line to such a list and
the release it is replayed onto changed the lines around it, git's
three-way merge stops on a conflict that is not one: the patch only
*inserted* lines.  This module merges such a file itself and resolves a
conflicting region only in that case; anything else stays a conflict for a
maintainer.

    merge(base, ours, theirs, recorded) -> ListMerge   text in, text out, plus why
    recordable(base, ours, theirs, resolved)            a maintainer's resolutions,
                                                        region by region, to record

* ``base`` is the file the patch was made on, ``ours`` the file in the new
  release (with the patches before applied), ``theirs`` base with the patch
  applied: git's index stages 1, 2 and 3 of an unmerged path.
* A three-way merge on lines (:func:`_chunks`, the classic diff3) takes
  every one-sided change as git would.
* In a region both sides changed, the patch's side must be base plus pure
  insertions; the result is upstream's lines with the inserted ones placed

  (a) where a sorted run of like lines (same indentation and first token:
      ``system_ss.add(``, ``devices/``, ``F:``) stays sorted, or, for a
      block of whole paragraphs (a ``MAINTAINERS`` section), where the
      paragraph titles around stay sorted;
  (b) else right after the line (for a block: the section) they followed
      in base, or right before the line they preceded;
  (c) else nowhere: the whole file is refused.

* A region whose two sides (:func:`conflict_key`) match a resolution a
  maintainer made before (:class:`Recorded`, git's rerere is the model) is
  replayed from it instead; :func:`recordable` cuts a resolved file into
  those per-region resolutions.
"""

from __future__ import annotations

import bisect
import difflib
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SORTED, AFTER_ANCHOR, BEFORE_ANCHOR = "sorted", "after-anchor", "before-anchor"


@dataclass(frozen=True)
class Placed:
    """Lines put into one conflict region and the rule that chose them: a
    list rule for the patch's inserted lines, or ``recorded:<name>`` for a
    replayed resolution."""

    lines: tuple[str, ...]
    rule: str


@dataclass(frozen=True)
class ListMerge:
    text: str | None  # None: refused, the conflict stays for a maintainer
    reason: str
    placed: tuple[Placed, ...] = ()

    @property
    def inserted(self) -> tuple[str, ...]:
        return tuple(line.rstrip("\r\n") for p in self.placed for line in p.lines)


@dataclass(frozen=True)
class _Conflict:
    """A region both sides changed: base[b0:b1], theirs[t0:t1], and
    upstream's lines at out[s:e] of the merged output."""

    b0: int
    b1: int
    t0: int
    t1: int
    s: int
    e: int


class _Refused(Exception):
    pass


@dataclass(frozen=True)
class Recorded:
    """A maintainer's resolution of one conflict region, kept in the
    repository and replayed when the same conflict comes back."""

    name: str  # where it is kept, for the report
    upstream: tuple[str, ...]  # upstream's side of the region
    patch: tuple[str, ...]  # the patch's side
    resolution: tuple[str, ...]

    @property
    def key(self) -> str:
        return conflict_key(self.upstream, self.patch)


def conflict_key(upstream: Sequence[str], patch: Sequence[str]) -> str:
    """The same conflict gives the same key wherever it is in the file;
    whitespace at line ends does not count."""
    h = hashlib.sha256()
    for side in (upstream, patch):
        for line in side:
            h.update(line.rstrip().encode() + b"\n")
        h.update(b"\0")
    return h.hexdigest()[:20]


def merge(base: str, ours: str, theirs: str,
          recorded: Mapping[str, Recorded] | None = None) -> ListMerge:
    """Three-way merge of one file: each conflict region is replayed from
    ``recorded`` (by :func:`conflict_key`) or resolved as list insertions."""
    b, o, t = (x.splitlines(keepends=True) for x in (base, ours, theirs))
    out, stable, conflicts = _merge_lines(b, o, t)
    if not conflicts:
        return ListMerge("".join(out), "no conflict")
    edits = []  # (start, end, order, lines, rule): out[start:end] becomes lines
    try:
        for c in conflicts:
            rec = (recorded or {}).get(conflict_key(out[c.s:c.e], t[c.t0:c.t1]))
            if rec is not None:
                edits.append((c.s, c.e, c.t0, list(rec.resolution), f"recorded:{rec.name}"))
            else:
                edits += [(p, p, order, lines, rule)
                          for p, order, lines, rule in _place_conflict(b, t, out, stable, c)]
        _check_disjoint(edits)
    except _Refused as exc:
        return ListMerge(None, str(exc))
    # Edit from the bottom up so earlier positions stay valid; at one
    # position, keep the patch's order.
    for start, end, _, lines, _ in sorted(edits, key=lambda x: (x[0], x[2]), reverse=True):
        out[start:end] = lines
    placed = tuple(Placed(tuple(lines), rule) for _, _, _, lines, rule in edits)
    rules = sorted({pl.rule for pl in placed})
    return ListMerge("".join(out), f"{len(conflicts)} conflict(s) resolved ({', '.join(rules)})",
                     placed)


def _check_disjoint(edits) -> None:
    for start, end, *_ in edits:
        if any(start < other < end for other, *_ in edits):
            raise _Refused("an insertion falls inside a region replayed from a recorded "
                           "resolution")


def recordable(base: str, ours: str, theirs: str,
               resolved: str) -> list[tuple[tuple[str, ...], ...]] | None:
    """What a maintainer made of each conflict region of this merge, as
    ``(upstream, patch, resolution)`` line tuples; None when the resolved
    file also differs outside the regions (nothing safe to replay)."""
    b, o, t = (x.splitlines(keepends=True) for x in (base, ours, theirs))
    r = resolved.splitlines(keepends=True)
    out, _, conflicts = _merge_lines(b, o, t)
    at = _matches(out, r)
    # Each region in r lies between the shared lines around it in out.
    bounds = []
    for c in conflicts:
        start = at.get(c.s - 1, -2) + 1 if c.s > 0 else 0
        end = at.get(c.e, -1) if c.e < len(out) else len(r)
        if start < 0 or end < start:
            return None
        bounds.append((start, end))
    rebuilt, last_out = [], 0
    for c, (start, end) in zip(conflicts, bounds):
        rebuilt += out[last_out:c.s] + r[start:end]
        last_out = c.e
    rebuilt += out[last_out:]
    if rebuilt != r:
        return None
    return [(tuple(out[c.s:c.e]), tuple(t[c.t0:c.t1]), tuple(r[start:end]))
            for c, (start, end) in zip(conflicts, bounds)]


# -- three-way merge on lines ---------------------------------------------------


def _matches(a: list[str], b: list[str]) -> dict[int, int]:
    """Line i of ``a`` -> line j of ``b`` for the lines a diff keeps."""
    sm = difflib.SequenceMatcher(None, a, b, autojunk=False)
    return {blk.a + k: blk.b + k for blk in sm.get_matching_blocks() for k in range(blk.size)}


def _chunks(b: list[str], o: list[str], t: list[str]):
    """diff3: yield ``(b0, b1, o0, o1, t0, t1)`` for each region, stable
    (one line all three share) or not."""
    mo, mt = _matches(b, o), _matches(b, t)
    i = io = it = 0
    while i < len(b):
        k = next((k for k in range(i, len(b)) if k in mo and k in mt), len(b))
        if k == len(b):
            break
        if k == i and mo[k] == io and mt[k] == it:
            yield i, i + 1, io, io + 1, it, it + 1
            i, io, it = i + 1, io + 1, it + 1
        else:
            yield i, k, io, mo[k], it, mt[k]
            i, io, it = k, mo[k], mt[k]
    if i < len(b) or io < len(o) or it < len(t):
        yield i, len(b), io, len(o), it, len(t)


def _merge_lines(b, o, t) -> tuple[list[str], dict[int, int], list[_Conflict]]:
    """Merged lines with upstream's side in every conflict; where each
    stable base line landed; the conflicts."""
    out: list[str] = []
    stable = {-1: -1}  # the start of the file is shared by all
    conflicts = []
    for b0, b1, o0, o1, t0, t1 in _chunks(b, o, t):
        base_part, ours_part, theirs_part = b[b0:b1], o[o0:o1], t[t0:t1]
        if b1 - b0 == 1 and base_part == ours_part == theirs_part:
            stable[b0] = len(out)
            out += ours_part
        elif ours_part == base_part or ours_part == theirs_part:
            out += theirs_part
        elif theirs_part == base_part:
            out += ours_part
        else:
            conflicts.append(_Conflict(b0, b1, t0, t1, len(out), len(out) + len(ours_part)))
            out += ours_part
    stable[len(b)] = len(out)
    return out, stable, conflicts


# -- placing the patch's insertions ---------------------------------------------


def _place_conflict(b, t, out, stable, c: _Conflict):
    """``(position in out, order, lines, rule)`` for each run of lines the
    patch inserted in this region; refuses anything but insertions."""
    sm = difflib.SequenceMatcher(None, b[c.b0:c.b1], t[c.t0:c.t1], autojunk=False)
    placements = []
    for tag, i1, _, j1, j2 in sm.get_opcodes():
        if tag == "equal":
            continue
        if tag != "insert":
            raise _Refused(f"the patch changes or removes base line {c.b0 + i1 + 1} "
                           f"({b[c.b0 + i1].strip()!r}) where upstream changed lines too")
        pos, lines = _as_block(b, c.b0 + i1, t[c.t0 + j1:c.t0 + j2], c)
        p, rule = _position(b, out, stable, c, pos, lines)
        placements.append((p, c.t0 + j1, lines, rule))
    return placements


def _blank(line: str) -> bool:
    return not line.strip()


def _is_block(b: list[str], pos: int, lines: list[str]) -> bool:
    """Whole paragraphs inserted between paragraphs."""
    return (not _blank(lines[0]) and _blank(lines[-1])
            and (pos == 0 or _blank(b[pos - 1])))


def _as_block(b, pos, lines, c: _Conflict) -> tuple[int, list[str]]:
    """A diff may show a new paragraph as "blank line + paragraph" one line
    early; slide it (same resulting text) to start at its title."""
    for shift in sorted(range(-len(lines), len(lines) + 1), key=abs):
        q, moved = pos, list(lines)
        ok = True
        for _ in range(abs(shift)):
            if shift < 0 and q > c.b0 - 1 and q > 0 and moved[-1] == b[q - 1]:
                q, moved = q - 1, [moved[-1]] + moved[:-1]
            elif shift > 0 and q < min(c.b1 + 1, len(b)) and moved[0] == b[q]:
                q, moved = q + 1, moved[1:] + [moved[0]]
            else:
                ok = False
                break
        if ok and _is_block(b, q, moved):
            return q, moved
    return pos, lines


def _position(b, out, stable, c: _Conflict, pos: int, lines: list[str]) -> tuple[int, str]:
    block = _is_block(b, pos, lines)
    listed = [x for x in (lines[:1] if block else lines)
              if not _blank(x) and x in out[c.s:c.e]]
    if listed:
        raise _Refused(f"{listed[0].strip()!r} is already upstream, next to where the "
                       "patch adds it")
    p = _sorted_block_position(out, c, lines) if block else _sorted_position(out, c, lines)
    if p is not None:
        return p, SORTED
    anchor = _block_anchor(b, pos) if block else pos - 1
    p = _find(b, out, stable, c, anchor)
    if p is not None:
        return (_paragraph_end(out, p) if block else p + 1), AFTER_ANCHOR
    p = _find(b, out, stable, c, pos)
    if p is not None:
        return p, BEFORE_ANCHOR
    what = b[pos - 1].strip() if pos > 0 else "the start of the file"
    raise _Refused(f"no place for {lines[0].strip()!r}: the line it followed ({what!r}) "
                   "and the line it preceded are gone or not unique upstream, "
                   "and the list around is not sorted")


def _find(b, out, stable, c: _Conflict, k: int) -> int | None:
    """Where base line ``k`` is in out: known for a line all sides kept,
    else searched in upstream's side of the region (it must be unique)."""
    if k in stable:
        return stable[k]
    if not c.b0 <= k < c.b1:
        return None
    hits = [i for i in range(c.s, c.e) if out[i] == b[k]]
    return hits[0] if len(hits) == 1 else None


_SHAPE = re.compile(r"\s*[^\s(:/'\"=,]*[\s(:/'\"=,]?")


def _shape(line: str) -> str:
    """Indentation and first token: lines of one list share it."""
    return "" if _blank(line) else _SHAPE.match(line).group()


def _key(line: str) -> str:
    return line.strip().casefold()


def _sorted_position(out, c: _Conflict, lines: list[str]) -> int | None:
    """Where ``lines`` keep the sorted run of like lines around the region
    sorted; None if there is no such run."""
    shape = _shape(lines[0])
    if not shape or any(_shape(x) != shape for x in lines + out[c.s:c.e]):
        return None
    new = [_key(x) for x in lines]
    a, z = c.s, c.e
    while a > 0 and _shape(out[a - 1]) == shape:
        a -= 1
    while z < len(out) and _shape(out[z]) == shape:
        z += 1
    keys = [_key(x) for x in out[a:z]]
    if len(keys) < 2 or keys != sorted(keys) or new != sorted(new) or set(new) & set(keys):
        return None
    p = a + bisect.bisect(keys, new[0])
    if not c.s <= p <= c.e or (p < z and new[-1] > keys[p - a]):
        return None
    return p


def _paragraphs(out) -> list[int]:
    """Where each paragraph (a run of non-blank lines) starts."""
    return [i for i, x in enumerate(out) if not _blank(x) and (i == 0 or _blank(out[i - 1]))]


def _sorted_block_position(out, c: _Conflict, lines: list[str]) -> int | None:
    """Where a new section keeps the section titles around the region
    sorted (at least three titles, one on each side of the region)."""
    starts = _paragraphs(out)
    inside = [i for i, p in enumerate(starts) if c.s <= p <= c.e]
    if not inside:
        return None
    lo, hi = max(inside[0] - 1, 0), min(inside[-1] + 2, len(starts))
    titles = [_key(out[p]) for p in starts[lo:hi]]
    title = _key(lines[0])
    if len(titles) < 3 or titles != sorted(titles) or title in titles:
        return None
    at = bisect.bisect(titles, title)
    if not 0 < at < len(titles):
        return None
    p = starts[lo + at]
    return p if c.s <= p <= c.e else None


def _block_anchor(b, pos: int) -> int:
    """The title line of the paragraph a new block followed in base."""
    k = pos - 1
    while k > 0 and _blank(b[k]):
        k -= 1
    while k > 0 and not _blank(b[k - 1]):
        k -= 1
    return k if pos > 0 else -1


def _paragraph_end(out, title: int) -> int:
    """Just past the paragraph starting at ``title`` and its blank lines."""
    if title < 0:
        return 0
    p = title
    while p < len(out) and not _blank(out[p]):
        p += 1
    while p < len(out) and _blank(out[p]):
        p += 1
    return p
