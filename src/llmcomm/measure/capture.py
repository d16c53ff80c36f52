"""Record every collective and point-to-point call a rank makes, and count them the nccl-tests way.

Where the calls are seen
------------------------
DeepSpeed-Inference on CPU all-reduces through its shared-memory kernel (``torch.ops.deepspeed.inference_all_reduce_``),
which never touches ``torch.distributed``; on gloo/NCCL ``deepspeed.comm`` forwards to ``torch.distributed``. So a
:class:`Capture` wraps, in one table (:data:`_WRAPPED`) and for as long as it is active, the public functions of

* ``deepspeed.comm`` (sees the shm path and everything DeepSpeed issues, incl. its comms-logger wrapper ``timed_op``),
* ``torch.distributed`` and ``torch.distributed.distributed_c10d`` (the same function objects under two names: both
  must be replaced, otherwise ``P2POp``/``batch_isend_irecv`` compare ``op is isend`` against the other name and
  break; and calls made by code that uses torch directly, e.g. pipeline runtimes, are seen).

A call made *inside* a recorded call (``deepspeed.comm.all_reduce`` → ``TorchBackend.all_reduce`` →
``torch.distributed.all_reduce``; ``reduce_scatter_fn`` → ``reduce_scatter_tensor``; the comms logger's own MPI
``barrier``) is not recorded again: only the outermost call counts. Object collectives (``broadcast_object_list``,
``all_gather_object``, …) are *transparent*: what goes on the wire is the tensor collectives they issue (sizes, then
pickled bytes), and those are recorded. Limits: references to the functions taken before the capture started
(``from torch.distributed import all_reduce`` at import time) and functional collectives (DTensor) are not seen; the
wrappers keep a per-capture depth counter, so calls are assumed to come from one thread.

Counting (nccl-tests size m, :mod:`llmcomm.derive.conventions`)
--------------------------------------------------------------
Each :class:`Event` carries ``bytes`` = m of that call: all_reduce/reduce/broadcast the buffer; all_gather and gather
the total gathered (output) bytes; reduce_scatter and scatter the total input; all_to_all the bytes one rank sends;
send/recv the tensor; barrier 0. :func:`aggregate` counts a collective on a group once (from the lowest rank of the
group whose events are present), and a send/recv pair once (from the sender, or the receiver when the sender's
events are absent) as op ``send_recv`` with group size 2.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import time
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from llmcomm.derive.conventions import OPS as COLLECTIVE_OPS
from llmcomm.derive.traffic import rows_of_calls
from llmcomm.record import write_json

__all__ = ["Capture", "CaptureError", "Event", "aggregate", "calls_of", "check_consistent", "write_chrome_trace", "OPS"]

#: the ops a captured row can have: the collectives of the conventions, and barriers (size 0)
OPS = (*COLLECTIVE_OPS, "barrier")


class CaptureError(RuntimeError):
    """Misuse of a capture (nested, re-entered) or events from ranks that disagree about what they did."""


@dataclass
class Event:
    """One call on one rank.

    ``op`` is the normalised operation (:data:`OPS` minus ``send_recv``, plus ``send``/``recv``); ``api`` the function
    that was called (e.g. ``deepspeed.comm.inference_all_reduce``); ``group`` the global ranks of the group the call
    ran on; ``peer`` the global rank of the other side of a send/recv (None for a recv from any source), or the root
    of a broadcast, gather, reduce or scatter (None for other collectives); ``t_start``/``t_end`` seconds since the epoch (same clock on all ranks of one machine; the end is when
    the call returned, which for ``async_op`` is not completion; with ``Capture(sync=True)`` the device is
    synchronised before and after each call). ``splits`` (all_to_all only): the bytes this rank sends to each
    member of the group, in group order (its own chunk included; an equal split when the call gave no sizes).
    """

    rank: int
    seq: int
    phase: str
    op: str
    api: str
    dtype: str | None
    shape: list[int] | None
    bytes: int
    group: list[int]
    peer: int | None = None
    async_op: bool = False
    t_start: float = 0.0
    t_end: float = 0.0
    splits: list[int] | None = None     # all_to_all: bytes this rank sends to each member of the group, in order

    def as_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------------------
# What is wrapped, and how S is read from the arguments. Each rule names the parameters (DeepSpeed and torch spell some
# differently, hence the alternatives) — arguments are matched to names by position from the real signature, once.
# size rules: ("one", names) → bytes of that tensor; ("list", names) → sum over a tensor list; ("times_n", names) →
# tensor bytes × group size; None → 0 bytes.
_RULES: dict[str, tuple[str, tuple | None]] = {
    "all_reduce": ("all_reduce", ("one", ("tensor",))),
    "inference_all_reduce": ("all_reduce", ("one", ("tensor",))),
    "all_reduce_coalesced": ("all_reduce", ("list", ("tensors",))),
    "reduce": ("reduce", ("one", ("tensor",))),
    "broadcast": ("broadcast", ("one", ("tensor",))),
    "all_gather": ("all_gather", ("list", ("tensor_list",))),
    "all_gather_into_tensor": ("all_gather", ("one", ("output_tensor",))),
    "_all_gather_base": ("all_gather", ("one", ("output_tensor",))),
    "all_gather_single": ("all_gather", ("one", ("output_tensor",))),        # torch ≥ 2.13 name
    "gather": ("gather", ("times_n", ("tensor",))),
    "scatter": ("scatter", ("times_n", ("tensor",))),
    "reduce_scatter": ("reduce_scatter", ("list", ("input_list",))),
    "reduce_scatter_tensor": ("reduce_scatter", ("one", ("tensor", "input"))),
    "_reduce_scatter_base": ("reduce_scatter", ("one", ("input",))),
    "reduce_scatter_single": ("reduce_scatter", ("one", ("input",))),         # torch ≥ 2.13 name
    "all_to_all": ("all_to_all", ("list", ("input_tensor_list",))),
    "all_to_all_single": ("all_to_all", ("one", ("tensor", "input"))),
    "send": ("send", ("one", ("tensor",))),
    "isend": ("send", ("one", ("tensor",))),
    "recv": ("recv", ("one", ("tensor",))),
    "irecv": ("recv", ("one", ("tensor",))),
    "barrier": ("barrier", None),
    "monitored_barrier": ("barrier", None),
    "batch_isend_irecv": ("batch", None),
}
_ASYNC_ALWAYS = {"isend", "irecv", "batch_isend_irecv"}
#: where the other side of a call is named: the peer of a send/recv, the root of a rooted collective
_PEER_PARAM = {"send": ("dst", "group_dst"), "isend": ("dst", "group_dst"),
               "recv": ("src", "group_src"), "irecv": ("src", "group_src"),
               "broadcast": ("src", "group_src"), "scatter": ("src", "group_src"),
               "gather": ("dst", "group_dst"), "reduce": ("dst", "group_dst")}

# module → functions replaced there (those the module has). torch.distributed and distributed_c10d share objects.
_WRAPPED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("deepspeed.comm", tuple(_RULES)),
    ("torch.distributed", tuple(_RULES)),
    ("torch.distributed.distributed_c10d", tuple(_RULES)),
)


@functools.lru_cache(maxsize=None)
def _positions(fn) -> dict[str, int]:
    """Parameter name → position for ``fn``. DeepSpeed's ``timed_op`` wrapper is ``log_wrapper(*args, **kwargs)``
    without ``functools.wraps``; the real signature is that of the function it closes over (``func``)."""
    import inspect

    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return {}
    if any(p.kind is p.VAR_POSITIONAL for p in sig.parameters.values()):
        inner = inspect.getclosurevars(fn).nonlocals.get("func")
        if callable(inner):
            return _positions(inner)
    return {n: i for i, (n, p) in enumerate(sig.parameters.items())
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)}


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _a2a_splits(name: str, pos: dict[str, int]):
    """A function ``(args, kwargs, n) → [bytes to each of the n group members]`` for an all-to-all wrapper:
    ``all_to_all_single`` splits its input along dim 0 by ``input_split_sizes`` (rows), or equally without it;
    the list form sends ``input_tensor_list[j]`` to member j."""
    if name == "all_to_all":
        li = pos.get("input_tensor_list")

        def of_list(args, kwargs, n):
            lst = args[li] if li is not None and li < len(args) else kwargs.get("input_tensor_list")
            return [_nbytes(x) for x in lst] if lst is not None else None
        return of_list
    ti = next((pos[x] for x in ("input", "tensor") if x in pos), None)
    si = pos.get("input_split_sizes")

    def of_single(args, kwargs, n):
        t = args[ti] if ti is not None and ti < len(args) else kwargs.get("input", kwargs.get("tensor"))
        sizes = args[si] if si is not None and si < len(args) else kwargs.get("input_split_sizes")
        if t is None:
            return None
        total = _nbytes(t)
        if not sizes:
            return [total // n] * n
        row = total // max(int(t.shape[0]), 1)
        return [int(x) * row for x in sizes]
    return of_single


def _labelled(fn, op: str):
    """``fn`` run inside the profiler label ``llmcomm::comm::<op>`` (:class:`Capture` with ``annotate``)."""
    from torch.autograd.profiler import record_function

    label = "llmcomm::comm::" + op

    def labelled(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    return labelled


def _dtype_name(dtype) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


class Capture:
    """Context manager recording every collective/p2p call of this rank while active.

    >>> with Capture() as cap:                       # doctest: +SKIP
    ...     with cap.phase("prefill"):
    ...         model(ids)
    >>> rows = aggregate(cap.events)                 # on one rank's events: counts as seen from this rank

    ``rank`` defaults to ``torch.distributed.get_rank()`` (0 when not initialised). ``sync=True`` synchronises the CUDA
    device around each call so that ``t_end - t_start`` is the call's duration; off by default (it changes timing).
    The phase starts as ``"setup"``. ``annotate=True`` runs each recorded call inside a ``torch.profiler``
    label ``llmcomm::comm::<op>`` (:mod:`llmcomm.measure.opprofile`: the call's whole time, waiting included, is then
    communication in a profiler trace).
    """

    _active: "Capture | None" = None

    def __init__(self, *, rank: int | None = None, sync: bool = False, phase: str = "setup", annotate: bool = False):
        self.rank = rank
        self.sync = sync
        self.annotate = annotate
        self._phase = phase
        self._raw: list[tuple] = []
        self._spans: list[tuple[str, float, float]] = []
        self._saved: list[tuple[Any, str, Any]] = []
        self._depth = 0
        self._group_cache: dict[int, tuple[Any, tuple[int, ...]]] = {}
        self._world: tuple[int, ...] | None = None
        self._offset = 0.0

    # ---------------------------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> "Capture":
        if Capture._active is not None:
            raise CaptureError("a Capture is already active in this process; nest phases with cap.phase(...) instead")
        import torch
        import torch.distributed as tdist

        if self.rank is None:
            self.rank = tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0
        self._dist = tdist
        self._sync_fn = torch.cuda.synchronize if (self.sync and torch.cuda.is_available()) else None
        # One clock for all ranks of a machine (epoch seconds), monotonic within the rank (perf_counter).
        self._offset = time.time() - time.perf_counter()
        self._phase_start = time.perf_counter()
        wrappers: dict[int, Any] = {}           # id(original) → wrapper: one wrapper per function object
        for modname, names in _WRAPPED:
            try:
                mod = importlib.import_module(modname)
            except ImportError:
                continue
            for name in names:
                orig = getattr(mod, name, None)
                if orig is None or not callable(orig):
                    continue
                if getattr(orig, "_llmcomm_capture", None) is not None:
                    raise CaptureError(f"{modname}.{name} is already wrapped by another capture")
                w = wrappers.get(id(orig))
                if w is None:
                    w = wrappers[id(orig)] = self._make_wrapper(modname, name, orig)
                self._saved.append((mod, name, orig))
                setattr(mod, name, w)
        Capture._active = self
        return self

    def __exit__(self, *exc) -> None:
        self._close_span()
        for mod, name, orig in reversed(self._saved):
            setattr(mod, name, orig)
        self._saved.clear()
        Capture._active = None

    @contextlib.contextmanager
    def phase(self, name: str):
        """Attribute the calls made inside the block to phase ``name`` (restores the previous phase afterwards)."""
        prev = self._phase
        self._close_span()
        self._phase = name
        try:
            yield self
        finally:
            self._close_span()
            self._phase = prev

    def _close_span(self) -> None:
        now = time.perf_counter()
        start = self._phase_start + self._offset
        if self._spans and self._spans[-1][0] == self._phase:       # same phase resumed: extend its span
            start = self._spans.pop()[1]
        self._spans.append((self._phase, start, now + self._offset))
        self._phase_start = now

    # ---------------------------------------------------------------------------------------------------- recording
    def _ranks_of(self, group) -> tuple[int, ...]:
        if group is not None:
            hit = self._group_cache.get(id(group))
            if hit is not None and hit[0] is group:
                return hit[1]
        d = self._dist
        if group is None or group is d.GroupMember.WORLD:
            if self._world is None:
                self._world = tuple(range(d.get_world_size())) if d.is_initialized() else (self.rank,)
            return self._world
        # keep the group object in the cache so its id cannot be reused by another group
        self._group_cache[id(group)] = (group, tuple(d.get_process_group_ranks(group)))
        return self._group_cache[id(group)][1]

    def _make_wrapper(self, modname: str, name: str, orig):
        op, size_rule = _RULES[name]
        api = f"{modname}.{name}"
        if op == "batch":
            return self._make_batch_wrapper(api, orig)
        call = _labelled(orig, op) if self.annotate else orig
        pos = _positions(orig)
        kind, tnames = size_rule if size_rule else (None, ())
        # Positions resolved once here: the wrapper runs on every collective (tens of thousands per run), and its
        # cost is what the overhead benchmark measures. A positional argument wins, else the keyword.
        ti = next((pos[n] for n in tnames if n in pos), None)
        gi, ai = pos.get("group"), pos.get("async_op")
        peer_names = _PEER_PARAM.get(name)
        pi = pos.get(peer_names[0]) if peer_names else None
        gpi = pos.get(peer_names[1]) if peer_names else None
        always_async = name in _ASYNC_ALWAYS
        times_n = kind == "times_n"
        splits_of = _a2a_splits(name, pos) if op == "all_to_all" else None
        cap = self
        perf = time.perf_counter
        raw = self._raw

        def kw(kwargs, names):
            for n in names:
                if n in kwargs:
                    return kwargs[n]
            return None

        @functools.wraps(orig)
        def wrapper(*args, **kwargs):
            if cap._depth:
                return orig(*args, **kwargs)       # issued by an outer recorded call: already counted
            n = len(args)
            group = args[gi] if gi is not None and gi < n else kwargs.get("group")
            ranks = cap._ranks_of(group)
            if kind is None:
                ref, nbytes = None, 0
            else:
                obj = args[ti] if ti is not None and ti < n else kw(kwargs, tnames)
                if kind == "list":
                    ref = obj[0] if obj else None
                    nbytes = sum(x.numel() * x.element_size() for x in obj) if obj else 0
                else:
                    ref = obj
                    nbytes = obj.numel() * obj.element_size() * (len(ranks) if times_n else 1)
            peer = None
            if peer_names:
                peer = args[pi] if pi is not None and pi < n else kwargs.get(peer_names[0])
                if peer is None:
                    gp = args[gpi] if gpi is not None and gpi < n else kwargs.get(peer_names[1])
                    peer = ranks[gp] if gp is not None else None
            async_op = always_async or bool(args[ai] if ai is not None and ai < n else kwargs.get("async_op"))
            sync = cap._sync_fn
            cap._depth += 1
            try:
                if sync:
                    sync()
                t0 = perf()
                out = call(*args, **kwargs)
                if sync:
                    sync()
                t1 = perf()
            finally:
                cap._depth -= 1
            raw.append((cap._phase, op, api, ref.dtype if ref is not None else None,
                        ref.shape if ref is not None else None, nbytes, ranks, peer, async_op, t0, t1,
                        splits_of(args, kwargs, len(ranks)) if splits_of else None))
            return out

        wrapper._llmcomm_capture = self
        return wrapper

    def _make_batch_wrapper(self, api: str, orig):
        """``batch_isend_irecv``: one event per P2POp, recorded here (the inner isend/irecv are not recorded again).

        torch's ``batch_isend_irecv`` decides send vs recv by ``op.op is isend`` against the *current* module attribute,
        so a P2POp built outside the capture (holding the unwrapped function) is re-pointed at the current one.
        """
        cap = self
        call = _labelled(orig, "batch_isend_irecv") if self.annotate else orig

        @functools.wraps(orig)
        def wrapper(p2p_op_list, *args, **kwargs):
            if cap._depth:
                return orig(p2p_op_list, *args, **kwargs)
            recs = []
            for p in p2p_op_list:
                fn = p.op
                if isinstance(fn, str):            # deepspeed.comm.P2POp stores 'isend' / 'irecv'
                    kind = "send" if fn == "isend" else "recv"
                else:
                    base = getattr(fn, "__wrapped__", fn)
                    kind = "send" if base.__name__ == "isend" else "recv"
                    current = getattr(cap._dist, "isend" if kind == "send" else "irecv")
                    if fn is not current and getattr(current, "__wrapped__", None) is base:
                        p.op = current
                ranks = cap._ranks_of(getattr(p, "group", None))
                recs.append((kind, p.tensor, ranks, p.peer))
            sync = cap._sync_fn
            cap._depth += 1
            try:
                if sync:
                    sync()
                t0 = time.perf_counter()
                out = call(p2p_op_list, *args, **kwargs)
                if sync:
                    sync()
                t1 = time.perf_counter()
            finally:
                cap._depth -= 1
            for kind, t, ranks, peer in recs:
                cap._raw.append((cap._phase, kind, api, t.dtype, tuple(t.shape), _nbytes(t), ranks, peer, True, t0, t1,
                                 None))
            return out

        wrapper._llmcomm_capture = self
        return wrapper

    # ---------------------------------------------------------------------------------------------------- results
    @property
    def events(self) -> list[Event]:
        """The calls recorded so far, in call order."""
        off, r = self._offset, self.rank
        return [Event(rank=r, seq=i, phase=ph, op=op, api=api, dtype=_dtype_name(dt),
                      shape=list(sh) if sh is not None else None, bytes=nb, group=list(g), peer=peer,
                      async_op=a, t_start=t0 + off, t_end=t1 + off, splits=sp)
                for i, (ph, op, api, dt, sh, nb, g, peer, a, t0, t1, sp) in enumerate(self._raw)]

    @property
    def phase_spans(self) -> list[dict]:
        """``[{"rank", "phase", "t_start", "t_end"}]``: when each phase was current (for traces)."""
        return [{"rank": self.rank, "phase": ph, "t_start": a, "t_end": b} for ph, a, b in self._spans if b > a]

    def rows(self) -> list[dict]:
        """:func:`aggregate` over this rank's events alone."""
        return aggregate(self.events)


# ------------------------------------------------------------------------------------------------------- aggregation
def _get(e, key):
    return e[key] if isinstance(e, Mapping) else getattr(e, key)


def calls_of(events: Iterable[Event | Mapping]) -> list[tuple]:
    """The distinct calls in the events of any set of ranks: ``(phase, op, ranks, m, 1, root)`` as
    :func:`llmcomm.derive.traffic.rows_of_calls` takes them.

    A collective on a group counts once: it is taken from the lowest rank of the group that has events in the input
    (all members of a group issue the same collectives in the same order; :func:`check_consistent` verifies it).
    A send/recv pair counts once as ``send_recv`` with ranks (sender, receiver) and m = tensor bytes: from the
    sender's event, or from the receiver's when no event of the sender is in the input."""
    events = list(events)
    present = {_get(e, "rank") for e in events}
    rep: dict[tuple, int] = {}
    out = []
    for e in events:
        op, rank, phase, nbytes = _get(e, "op"), _get(e, "rank"), _get(e, "phase"), int(_get(e, "bytes"))
        peer = _get(e, "peer")
        if op in ("send", "recv"):
            if op == "recv" and peer is not None and peer in present:
                continue                                   # counted on the sender's side
            pair = (rank, -1 if peer is None else peer) if op == "send" else (-1 if peer is None else peer, rank)
            out.append((phase, "send_recv", pair, nbytes, 1, None))
            continue
        group = tuple(_get(e, "group"))
        r = rep.get(group)
        if r is None:
            members = [g for g in group if g in present]
            r = rep[group] = min(members) if members else rank
        if rank == r:
            out.append((phase, op, group, nbytes, 1, peer))
    return out


def aggregate(events: Iterable[Event | Mapping], node_of: Callable[[int], object] | None = None,
              algorithm: str = "ring") -> list[dict]:
    """Rows over the events of any set of ranks, counted exactly as the predictions are
    (:func:`llmcomm.derive.traffic.rows_of_calls` on :func:`calls_of`): ``{"phase", "op", "group_size", "calls",
    "bytes", "algorithm", "sent_bytes_per_rank", "link_bytes"}``, plus ``"inter_node_bytes"`` when ``node_of``
    maps a rank to its node (e.g. the hosts the ranks ran on). ``algorithm`` is the all-reduce's (``direct`` for
    DeepSpeed's shared-memory kernel). The traffic metrics are derived from the captured calls (group, size,
    ranks), not counted on a wire. Rows are sorted by phase (setup, prefill, decode, then others), op, group size."""
    return rows_of_calls(calls_of(events), node_of, algorithm)


def check_consistent(events: Iterable[Event | Mapping]) -> None:
    """Raise :class:`CaptureError` unless the ranks agree: every member of a group saw the same sequence of
    (phase, op, bytes) on it, and every send from a present rank to a present rank has its recv (same count and bytes
    per phase and direction). Guards the once-per-group counting of :func:`aggregate`."""
    events = list(events)
    present = {_get(e, "rank") for e in events}
    seqs: dict[tuple, dict[int, list]] = {}
    p2p: dict[tuple, list[int]] = {}
    for e in events:
        op, rank, phase, nb = _get(e, "op"), _get(e, "rank"), _get(e, "phase"), int(_get(e, "bytes"))
        if op in ("send", "recv"):
            peer = _get(e, "peer")
            if peer is None or peer not in present:
                continue
            src, dst = (rank, peer) if op == "send" else (peer, rank)
            c = p2p.setdefault((phase, src, dst), [0, 0, 0, 0])
            i = 0 if op == "send" else 2
            c[i] += 1
            c[i + 1] += nb
        else:
            group = tuple(_get(e, "group"))
            seqs.setdefault(group, {}).setdefault(rank, []).append((phase, op, nb))
    for group, by_rank in seqs.items():
        missing = [r for r in group if r in present and r not in by_rank]
        if missing:
            raise CaptureError(f"ranks {missing} of group {list(group)} recorded no call on it, "
                               f"rank {min(by_rank)} recorded {len(by_rank[min(by_rank)])}")
        ref_rank = min(by_rank)
        ref = by_rank[ref_rank]
        for r, seq in by_rank.items():
            if seq != ref:
                i = next((k for k, (x, y) in enumerate(zip(seq, ref)) if x != y), min(len(seq), len(ref)))
                raise CaptureError(f"group {list(group)}: rank {r} and rank {ref_rank} disagree at call {i} "
                                   f"({seq[i] if i < len(seq) else 'nothing'} vs {ref[i] if i < len(ref) else 'nothing'})")
    for (phase, src, dst), (ns, bs, nr, br) in p2p.items():
        if (ns, bs) != (nr, br):
            raise CaptureError(f"{phase}: rank {src} sent {ns} tensors ({bs} B) to rank {dst}, "
                               f"which received {nr} ({br} B)")


# ------------------------------------------------------------------------------------------------------------ traces
def write_chrome_trace(events: Iterable[Event | Mapping], path: str | Path,
                       phase_spans: Iterable[Mapping] = ()) -> Path:
    """Write a Chrome/Perfetto JSON trace: one process per rank, calls on thread "comm", phases on thread "phase"."""
    events = list(events)
    spans = list(phase_spans)
    starts = [_get(e, "t_start") for e in events] + [s["t_start"] for s in spans]
    t0 = min(starts) if starts else 0.0
    out = []
    ranks = sorted({_get(e, "rank") for e in events} | {s["rank"] for s in spans})
    for r in ranks:
        out.append({"ph": "M", "name": "process_name", "pid": r, "args": {"name": f"rank {r}"}})
        out.append({"ph": "M", "name": "process_sort_index", "pid": r, "args": {"sort_index": r}})
        out.append({"ph": "M", "name": "thread_name", "pid": r, "tid": 0, "args": {"name": "phase"}})
        out.append({"ph": "M", "name": "thread_name", "pid": r, "tid": 1, "args": {"name": "comm"}})
    for s in spans:
        out.append({"ph": "X", "name": s["phase"], "cat": "phase", "pid": s["rank"], "tid": 0,
                    "ts": (s["t_start"] - t0) * 1e6, "dur": (s["t_end"] - s["t_start"]) * 1e6})
    for e in events:
        d = asdict(e) if isinstance(e, Event) else dict(e)
        out.append({"ph": "X", "name": d["op"], "cat": d["phase"], "pid": d["rank"], "tid": 1,
                    "ts": (d["t_start"] - t0) * 1e6, "dur": max(d["t_end"] - d["t_start"], 0.0) * 1e6,
                    "args": {k: d.get(k) for k in ("api", "dtype", "shape", "bytes", "group", "peer", "seq")}})
    return write_json(path, {"traceEvents": out, "displayTimeUnit": "ms"})
