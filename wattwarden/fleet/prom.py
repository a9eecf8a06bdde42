"""The fleet controller's memory: the Prometheus HTTP API (or Thanos, Mimir, VictoriaMetrics).

:class:`PrometheusClient` runs instant queries (``GET /api/v1/query`` with ``time``) and reads
the active scrape targets (``GET /api/v1/targets``), each call bounded by a timeout, over HTTP or
HTTPS (a CA file), with basic auth or a bearer token where configured. Answers are parsed
strictly: anything out of shape, an error answer, a refused, reset or slow connection is one
:class:`PrometheusError` whose message is one line naming the server and what went wrong. A
vector in Prometheus's own compact layout is read as text, without decoding the JSON; anything
that is not exactly that layout is decoded and checked sample by sample (the same result either
way, tested over damaged answers).

:class:`FleetReader` reads what the controller needs each period, one query per figure, every
query at the same evaluation time, all at once (:data:`QUERY_CONCURRENCY`):

========================  =================================================================
``up``                    ``up{job=J}``: the agents (discovery) and whether each is scraped
``power``                 ``instance:gpu_power_watts:sum``
``gpus_up``, ``gpus``     ``instance:gpu_up:sum``, ``instance:gpu_up:count``
``floor``, ``ceiling``    ``instance:gpu_power_limit_{min,max}_watts:sum`` (GPUs up)
``demand``                ``instance:wattwarden_power_demand_above_min_watts:sum`` by
                          ``priority`` (an agent that does not export it yet:
                          ``instance:wattwarden_power_demand_watts:sum``, generous)
``starving``              ``wattwarden_power_budget_starving``
``lease``                 ``wattwarden_power_budget_watts{scope="lease"}`` (the lease in force)
``seen_at``               the older of when each node's GPU series were last scraped
                          (``timestamp(gpu_up)``, the newest) and when the recorded series
                          above were last evaluated (``timestamp()``, the oldest); only for
                          nodes that have both
========================  =================================================================

Why the timestamps: an instant query answers every sample at the evaluation time asked
for, whatever the age of the data behind it (up to the server's lookback of 5 minutes), so the
sample timestamps (kept in :class:`Sample`) cannot tell fresh from stale. PromQL's
``timestamp()`` gives the time of the sample itself: a node whose scrape stopped without a
staleness marker (Prometheus restarted, a remote store lagging) or whose recording rules stopped
being evaluated shows its true age there, and :mod:`wattwarden.fleet.model` calls it stale. The
server takes the older of the two, so one series a node comes back, not two.

The targets API, where the server has one, gives each agent's scrape address (``HOST:PORT``: the
shipped relabelling keeps only the host in ``instance``) and scrape interval. Servers without it
(Mimir, for one) answer 404; the controller then takes the address from the ``instance`` label.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.client import HTTPException
from itertools import chain, repeat
from operator import itemgetter, methodcaller
from typing import Any, NamedTuple, overload

from wattwarden.fleet.leases import one_line

log = logging.getLogger(__name__)

QUERY_CONCURRENCY = 12
"""Queries of one period run at most this many at once: all of them (11 and the targets).

Nothing can be decided before the last answer is in, and six at a time made the second half
wait for threads that then took the interpreter lock from the decoding of the first half (4 ms
a period at 10,000 GPUs). Prometheus runs 20 queries at once by default
(``--query.max-concurrency``)."""
ANSWER_MAX_BYTES = 64 * 1024 * 1024
"""A larger answer is refused: a fleet of 10,000 nodes answers a few MB per query."""


class PrometheusError(Exception):
    """Prometheus could not be read: the message is one line naming the server and the reason."""


class Sample(NamedTuple):
    """One sample of an instant vector (a tuple: a fleet's answers hold tens of thousands)."""

    labels: Mapping[str, str]
    value: float
    """May be NaN or infinite: PromQL can compute those; the model skips them."""
    timestamp_s: float
    """The sample's timestamp as answered (for an instant query: the evaluation time)."""


class Vector(Sequence[Sample]):
    """An instant vector's samples, kept as the columns they were parsed into.

    A fleet answers tens of thousands of samples a period; building a :class:`Sample` for each
    and reading its labels back later (from label maps by then scattered in memory) cost more
    than the rest of the parse. The columns are kept instead: a sample is built when indexed,
    and :meth:`column` gives one label of every sample, computed once. A vector read from
    Prometheus's own layout (:meth:`PrometheusClient.parse_query`) comes as columns, one per
    label name, and builds its label maps only if :attr:`labels` is read.
    """

    __slots__ = ("_columns", "_labels", "_names", "times", "values")

    def __init__(
        self, labels: list[Mapping[str, str]], values: list[float], times: list[float]
    ) -> None:
        if not len(labels) == len(values) == len(times):
            raise ValueError("a vector's columns differ in length")
        self._labels: list[Mapping[str, str]] | None = labels
        self._names: tuple[str, ...] | None = None
        self.values = values
        self.times = times
        self._columns: dict[str, list[str | None]] = {}

    @classmethod
    def from_columns(
        cls,
        columns: Mapping[str, list[str]],
        values: list[float],
        times: list[float],
    ) -> Vector:
        """Samples that all have the same label names: one column of values per name."""
        if any(len(c) != len(values) for c in columns.values()) or len(times) != len(values):
            raise ValueError("a vector's columns differ in length")
        vector = cls.__new__(cls)
        vector._labels, vector._names = None, tuple(columns)
        vector.values, vector.times = values, times
        vector._columns = dict(columns)  # type: ignore[arg-type]  # list[str] is a column
        return vector

    @property
    def labels(self) -> list[Mapping[str, str]]:
        """Each sample's label map."""
        if self._labels is None:
            names = self._names or ()
            if names:
                rows = zip(*(self._columns[n] for n in names), strict=True)
                self._labels = [dict(zip(names, row, strict=True)) for row in rows]
            else:
                self._labels = [{} for _ in self.values]
        return self._labels

    def column(self, name: str) -> list[str | None]:
        """The label ``name`` of each sample, None where a sample has none."""
        found = self._columns.get(name)
        if found is None:
            if self._labels is None:  # from columns: a name not among them is on no sample
                found = [None] * len(self.values)
            else:
                found = list(map(methodcaller("get", name), self._labels))
            self._columns[name] = found
        return found

    @overload
    def __getitem__(self, index: int) -> Sample: ...
    @overload
    def __getitem__(self, index: slice) -> list[Sample]: ...
    def __getitem__(self, index: int | slice) -> Sample | list[Sample]:
        labels = self.labels
        if isinstance(index, slice):
            rows = zip(labels[index], self.values[index], self.times[index], strict=True)
            return [Sample(*row) for row in rows]
        return Sample(labels[index], self.values[index], self.times[index])

    def __len__(self) -> int:
        return len(self.values)

    def __iter__(self) -> Iterator[Sample]:
        return map(Sample, self.labels, self.values, self.times)

    def __repr__(self) -> str:
        return f"Vector({list(self)!r})"


class Answer(NamedTuple):
    """An API answer as it came: the path asked, the HTTP status and the body, undecoded."""

    path: str
    status: int
    body: bytes


class Target(NamedTuple):
    """One active scrape target of the agents' job (a tuple: a fleet has thousands)."""

    instance: str
    """Its ``instance`` label."""
    job: str
    """Its ``job`` label (the scrape job)."""
    address: str
    """``HOST:PORT`` it is scraped at (its discovered ``__address__``)."""
    health: str
    """``up``, ``down`` or ``unknown``."""
    scrape_interval_s: float | None
    """As the server reports it (newer servers only)."""


@dataclass(frozen=True, slots=True)
class Auth:
    """How to reach Prometheus: CA file for HTTPS, basic auth or a bearer token."""

    ca_file: str | None = None
    basic_auth: tuple[str, str] | None = None
    bearer_token: str | None = None

    def __repr__(self) -> str:  # never show a secret
        kinds = [k for k, v in (("basic", self.basic_auth), ("bearer", self.bearer_token)) if v]
        return f"Auth(ca_file={self.ca_file!r}, {'+'.join(kinds) or 'no credentials'})"


class PrometheusClient:
    """Instant queries and targets, strictly parsed; every failure a :class:`PrometheusError`."""

    def __init__(self, url: str, *, timeout_s: float = 2.0, auth: Auth | None = None) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"Prometheus URL must be http:// or https://, got {url!r}")
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s must be above 0, got {timeout_s!r}")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.auth = auth or Auth()
        self._headers = {"Accept": "application/json"}
        if self.auth.basic_auth is not None:
            pair = ":".join(self.auth.basic_auth).encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        elif self.auth.bearer_token is not None:
            self._headers["Authorization"] = f"Bearer {self.auth.bearer_token}"
        context: ssl.SSLContext | None = None
        if parts.scheme == "https":
            try:
                context = ssl.create_default_context(cafile=self.auth.ca_file)
            except (OSError, ssl.SSLError) as e:
                raise ValueError(f"Prometheus CA file {self.auth.ca_file}: {e}") from None
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self._opener = urllib.request.build_opener(*handlers)

    def __repr__(self) -> str:
        return f"PrometheusClient({self.url}, timeout {self.timeout_s} s, {self.auth!r})"

    # ------------------------------------------------------------------ API calls
    def query(self, expr: str, at_s: float) -> list[Sample]:
        """The instant vector ``expr`` evaluates to at ``at_s`` (seconds since the epoch)."""
        return list(self.parse_query(expr, self.fetch_query(expr, at_s)))

    def fetch_query(self, expr: str, at_s: float) -> Answer:
        """The undecoded answer to :meth:`query` (the I/O half: :meth:`parse_query` does the rest).

        Split so that a reader can wait on many answers in threads and decode them in one: the
        decoding holds the interpreter lock, and threads taking turns at it only add switches.
        """
        params = {"query": expr, "time": f"{at_s:.3f}", "timeout": f"{self.timeout_s:g}s"}
        return self._fetch("/api/v1/query", params)

    def parse_query(self, expr: str, answer: Answer) -> Vector:
        """The samples of an answer :meth:`fetch_query` got for ``expr``; PrometheusError.

        Prometheus writes a vector in one fixed layout (compact JSON, keys in one order, every
        sample with the same label names for the aggregations the controller sends): such an
        answer is read as text by :func:`_read_layout`, in about 60 % of the time of decoding
        the JSON and checking each sample (``benchmarks/fleet_decision.py``). Anything else
        (another layout, an escape in a string, a sample of other label names, an error, a
        warning) takes the general path, which decodes the JSON and names what is wrong.
        """
        if answer.status == 200 and len(answer.body) <= ANSWER_MAX_BYTES:
            fast = _read_layout(answer.body)
            if fast is not None:
                return fast
        data = self._decode(answer)
        if not isinstance(data, dict):
            raise self._error(f"query {expr!r}: 'data' is not an object")
        kind = data.get("resultType")
        if kind != "vector":
            raise self._error(f"query {expr!r}: expected a vector, got resultType {kind!r}")
        result = data.get("result")
        if not isinstance(result, list):
            raise self._error(f"query {expr!r}: 'result' is not a list")
        return self._samples(expr, result)

    def targets(self) -> list[Target] | None:
        """The active scrape targets; None when the server has no targets API (404)."""
        answer = self.fetch_targets()
        return None if answer is None else self.parse_targets(answer)

    def fetch_targets(self) -> Answer | None:
        """The undecoded answer to :meth:`targets`; None when the server has no targets API."""
        try:
            return self._fetch("/api/v1/targets", {"state": "active"})
        except _NotFound:
            return None

    def parse_targets(self, answer: Answer) -> list[Target]:
        """The targets of an answer :meth:`fetch_targets` got; PrometheusError."""
        data = self._decode(answer)
        active = data.get("activeTargets") if isinstance(data, dict) else None
        if not isinstance(active, list):
            raise self._error("targets: 'activeTargets' is not a list")
        return self._targets(active)

    # ------------------------------------------------------------------ parsing
    def _samples(self, expr: str, result: list[Any]) -> Vector:
        """Every sample of a vector's ``result``, each checked as :meth:`_sample` checks it.

        The lean path: a fleet answers tens of thousands of samples a period, so the checks run
        over whole columns at C speed (the set of the items' types, of the values' lengths, of
        the label values' types), each label map is kept as decoded (the answer is ours alone)
        and each value converted once. JSON object keys are always strings, so only label
        values are tested. Should any check fail, every item goes through :meth:`_sample`,
        which names the first one out of shape.
        """
        try:
            if not set(map(type, result)) <= _DICT:
                raise _OutOfShape
            metrics = list(map(_METRIC, result))
            values = list(map(_VALUE, result))
            if not set(map(type, metrics)) <= _DICT or not set(map(type, values)) <= _LIST:
                raise _OutOfShape
            if not set(map(len, values)) <= _PAIR:
                raise _OutOfShape
            times, texts = zip(*values, strict=True) if values else ((), ())
            if not set(map(type, texts)) <= _STR or not set(map(type, times)) <= _TIME:
                raise _OutOfShape
            if not set(map(type, chain.from_iterable(map(dict.values, metrics)))) <= _STR:
                raise _OutOfShape
            return Vector(metrics, list(map(float, texts)), list(map(float, times)))
        except (_OutOfShape, KeyError, ValueError, OverflowError):
            samples = [self._sample(expr, item) for item in result]  # raises, naming the item
            return Vector(
                [s.labels for s in samples],
                [s.value for s in samples],
                [s.timestamp_s for s in samples],
            )

    def _sample(self, expr: str, item: Any) -> Sample:
        if not isinstance(item, dict):
            raise self._error(f"query {expr!r}: a result is not an object")
        metric, value = item.get("metric"), item.get("value")
        if not isinstance(metric, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metric.items()
        ):
            raise self._error(f"query {expr!r}: a result's 'metric' is not a label map")
        if (
            not isinstance(value, list)
            or len(value) != 2
            or isinstance(value[0], bool)
            or not isinstance(value[0], int | float)
            or not isinstance(value[1], str)
        ):
            raise self._error(f"query {expr!r}: a result's 'value' is not [time, \"number\"]")
        try:
            number = float(value[1])
        except ValueError:
            raise self._error(f"query {expr!r}: value {value[1]!r} is not a number") from None
        try:
            at = float(value[0])
        except OverflowError:
            raise self._error(f"query {expr!r}: time {value[0]!r} is out of range") from None
        return Sample(dict(metric), number, at)

    def _targets(self, active: list[Any]) -> list[Target]:
        """Every target of ``active``, each checked as :meth:`_target` checks it.

        The lean path, as for samples: columns checked at C speed, each distinct scrape interval
        parsed once; anything it does not take goes through :meth:`_target`, which names it.
        """
        try:
            if not set(map(type, active)) <= _DICT:
                raise _OutOfShape
            labels = list(map(_GET_LABELS, active))
            discovered = list(map(_GET_DISCOVERED, active))
            if not set(map(type, chain(labels, discovered))) <= _DICT:
                raise _OutOfShape
            instances, jobs = list(map(_GET_INSTANCE, labels)), list(map(_GET_JOB, labels))
            addresses = list(map(_GET_ADDRESS, discovered))
            healths = list(map(_GET_HEALTH, active))
            if not set(map(type, chain(instances, jobs, addresses, healths))) <= _STR:
                raise _OutOfShape
            intervals = list(map(_GET_INTERVAL, active))
            if not set(map(type, intervals)) <= _STR_OR_NONE:
                raise _OutOfShape
            seconds: dict[str | None, float | None] = {None: None}
            for text in set(intervals) - {None}:
                seconds[text] = self._duration("", text)
            durations = map(seconds.__getitem__, intervals)
            rows = zip(instances, jobs, addresses, healths, durations, strict=True)
            return list(map(tuple.__new__, repeat(Target), rows))
        except (_OutOfShape, PrometheusError):
            return [self._target(t) for t in active]  # raises, naming the target

    def _target(self, item: Any) -> Target:
        if not isinstance(item, dict):
            raise self._error("targets: a target is not an object")
        labels, discovered = item.get("labels"), item.get("discoveredLabels")
        if not isinstance(labels, dict) or not isinstance(discovered, dict):
            raise self._error("targets: a target lacks 'labels' or 'discoveredLabels'")
        instance, address = labels.get("instance"), discovered.get("__address__")
        job, health = labels.get("job"), item.get("health", "unknown")
        if not all(isinstance(v, str) for v in (instance, address, job)):
            raise self._error("targets: a target lacks its instance or job label or __address__")
        assert isinstance(instance, str) and isinstance(address, str) and isinstance(job, str)
        if not isinstance(health, str):
            raise self._error(f"targets: target {instance}: 'health' is not a string")
        interval = item.get("scrapeInterval")
        return Target(
            instance=instance,
            job=job,
            address=address,
            health=health,
            scrape_interval_s=None if interval is None else self._duration(instance, interval),
        )

    def _duration(self, instance: str, text: Any) -> float:
        """A Prometheus duration such as ``15s``, ``1m30s`` or ``500ms``, in seconds."""
        units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
        if not isinstance(text, str) or not text:
            raise self._error(f"targets: target {instance}: bad scrapeInterval {text!r}")
        total, number = 0.0, ""
        i = 0
        while i < len(text):
            c = text[i]
            if c.isdigit():
                number += c
                i += 1
                continue
            unit = "ms" if text.startswith("ms", i) else c
            if not number or unit not in units:
                raise self._error(f"targets: target {instance}: bad scrapeInterval {text!r}")
            total += int(number) * units[unit]
            number = ""
            i += len(unit)
        if number:
            raise self._error(f"targets: target {instance}: bad scrapeInterval {text!r}")
        return total

    # ------------------------------------------------------------------ transport
    def _error(self, message: str) -> PrometheusError:
        return PrometheusError(f"Prometheus {self.url}: {message}")

    def _get(self, path: str, params: Mapping[str, str]) -> Any:
        """GET an API path; the ``data`` of a success answer, or PrometheusError."""
        return self._decode(self._fetch(path, params))

    def _fetch(self, path: str, params: Mapping[str, str]) -> Answer:
        """GET an API path: its status and body, undecoded; PrometheusError without one."""
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        request = urllib.request.Request(url, headers=self._headers)
        status: int
        try:
            with self._opener.open(request, timeout=self.timeout_s) as resp:
                status, body = resp.status, resp.read(ANSWER_MAX_BYTES + 1)
        except urllib.error.HTTPError as e:
            status = e.code
            try:
                body = e.read(ANSWER_MAX_BYTES + 1)
            except (OSError, HTTPException):
                body = b""
            finally:
                e.close()
            if status == 404 and path == "/api/v1/targets":
                raise _NotFound from None
        except TimeoutError:
            raise self._error(f"no answer within {self.timeout_s:g} s") from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, TimeoutError):
                raise self._error(f"no answer within {self.timeout_s:g} s") from None
            raise self._error(f"unreachable: {one_line(str(reason))}") from None
        except (OSError, HTTPException, ValueError) as e:
            raise self._error(f"unreachable: {one_line(f'{type(e).__name__}: {e}')}") from None
        return Answer(path, status, body)

    def _decode(self, answer: Answer) -> Any:
        """The ``data`` of a success answer, or PrometheusError."""
        path, status, body = answer
        if len(body) > ANSWER_MAX_BYTES:
            raise self._error(f"{path} answer larger than {ANSWER_MAX_BYTES} bytes")
        try:
            decoded = json.loads(body)
        except ValueError:
            raise self._error(f"{path} answered {status} with no JSON body") from None
        if not isinstance(decoded, dict) or decoded.get("status") not in ("success", "error"):
            raise self._error(f"{path} answered {status} without a status")
        if decoded["status"] == "error" or status != 200:
            kind = decoded.get("errorType", "error")
            raise self._error(f"{path} answered {status}: {kind}: {decoded.get('error', '?')}")
        for warning in decoded.get("warnings") or []:
            log.debug("Prometheus %s: warning: %s", self.url, warning)
        return decoded.get("data")


class _OutOfShape(Exception):
    """The lean path of :meth:`PrometheusClient._samples` met something it does not take."""


_DICT, _LIST, _STR, _PAIR = frozenset({dict}), frozenset({list}), frozenset({str}), frozenset({2})
_TIME = frozenset({int, float})
_STR_OR_NONE = frozenset({str, type(None)})
_METRIC, _VALUE = itemgetter("metric"), itemgetter("value")
_GET_LABELS, _GET_DISCOVERED = (
    methodcaller("get", "labels"),
    methodcaller("get", "discoveredLabels"),
)
_GET_INSTANCE, _GET_JOB = methodcaller("get", "instance"), methodcaller("get", "job")
_GET_ADDRESS = methodcaller("get", "__address__")
_GET_HEALTH = methodcaller("get", "health", "unknown")
_GET_INTERVAL = methodcaller("get", "scrapeInterval")


_SCRAPE_TIMES = re.compile(
    rb'"(?:lastScrape|lastError)":"[\x20\x21\x23-\x5b\x5d-\x7e]*"'
    rb'|"lastScrapeDuration":-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?'
)
"""The fields of a target that change every scrape, with values JSON allows (strings of
printable ASCII without quotes or escapes, numbers): swapping one such value for another in a
valid answer leaves a valid answer that says the same of every target's instance, job,
address, health and scrape interval. Anything else that changes is parsed again."""


class _NotFound(Exception):
    """The server has no such API (404)."""


# ---------------------------------------------------------------------- Prometheus's own layout
_LAYOUT_HEAD = '{"status":"success","data":{"resultType":"vector","result":['
_LAYOUT_TAIL = "]}}"
_STRING = r'[^"\\\x00-\x1f]*'
"""A JSON string's content without escapes (those take the general path)."""
_NUMBER = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
"""A JSON number."""
_FIRST_NAMES = re.compile(r'\{"metric":\{((?:"[a-zA-Z_][a-zA-Z0-9_]*":"' + _STRING + r'",?)*)\}')
_NAME = re.compile(r'"([a-zA-Z_][a-zA-Z0-9_]*)":"')
_ITEM_PATTERNS: dict[tuple[str, ...], re.Pattern[str]] = {}
_ITEM_PATTERNS_MAX = 64
"""Patterns kept by label names: the controller's queries answer two sets of names."""


def _item_pattern(names: tuple[str, ...]) -> re.Pattern[str]:
    """The pattern of one sample with exactly these label names, in this order.

    Its groups: the whole sample, each label's value, the time, the value.
    """
    found = _ITEM_PATTERNS.get(names)
    if found is None:
        metric = ",".join(f'"{name}":"({_STRING})"' for name in names)
        found = re.compile(
            f'(\\{{"metric":\\{{{metric}\\}},"value":\\[({_NUMBER}),"({_STRING})"\\]\\}})'
        )
        if len(_ITEM_PATTERNS) >= _ITEM_PATTERNS_MAX:
            _ITEM_PATTERNS.clear()
        _ITEM_PATTERNS[names] = found
    return found


def _read_layout(body: bytes) -> Vector | None:
    """A vector answer in Prometheus's own layout, read as text; None when it is not one.

    The layout: ``{"status":"success","data":{"resultType":"vector","result":[...]}}`` with
    the samples ``{"metric":{"NAME":"VALUE",...},"value":[TIME,"NUMBER"]}`` joined by commas,
    no whitespace, no escapes. The label names are taken from the first sample and every
    sample must have the same ones in the same order: one pattern finds every sample, and the
    samples found, joined by commas, must be the whole result, byte for byte. So nothing is
    skipped over and nothing else is taken; what this does not take (a string escape, another
    layout, a value that is not a number) is None, and the caller decodes the JSON instead.
    Returns only what the general path would return for the same body.
    """
    try:
        text = body.decode()
    except UnicodeDecodeError:
        return None
    if not (text.startswith(_LAYOUT_HEAD) and text.endswith(_LAYOUT_TAIL)):
        return None
    result = text[len(_LAYOUT_HEAD) : -len(_LAYOUT_TAIL)]
    if not result:
        return Vector.from_columns({}, [], [])
    first = _FIRST_NAMES.match(result)
    if first is None:
        return None
    names = tuple(_NAME.findall(first.group(1)))  # a name twice: the last one counts, as in JSON
    found = _item_pattern(names).findall(result)
    if not found:
        return None
    # the whole samples, each label's values, the times, the values (every tuple as long)
    columns = list(zip(*found, strict=True))
    if ",".join(columns[0]) != result:  # the samples found are not the whole result
        return None
    k = len(names)
    times_text, numbers = columns[k + 1], columns[k + 2]
    try:
        values = list(map(float, numbers))
    except ValueError:
        return None
    distinct = set(times_text)
    if len(distinct) == 1:  # an instant query: every sample at the evaluation time
        times = [float(distinct.pop())] * len(values)
    else:
        times = list(map(float, times_text))
    if not all(map(math.isfinite, times if len(distinct) > 1 else times[:1])):
        return None  # JSON's integers beyond a float: the general path refuses those
    labels = {name: list(col) for name, col in zip(names, columns[1 : k + 1], strict=True)}
    return Vector.from_columns(labels, values, times)


# ---------------------------------------------------------------------- what one period reads
RECORDED = (
    "instance:gpu_power_watts:sum",
    "instance:gpu_up:sum",
    "instance:gpu_up:count",
    "instance:gpu_power_limit_min_watts:sum",
    "instance:gpu_power_limit_max_watts:sum",
)
"""The recorded series whose evaluation time says whether the rules still run."""


INDEXED = {"demand": ("instance", "priority")}
"""The labels the model reads of each query's samples (``instance`` where not listed)."""


def queries(job: str) -> dict[str, str]:
    """The PromQL of each figure the controller reads, for the agents' scrape job ``job``.

    Each answers one series per node labelled ``instance`` alone (``priority`` too for demand):
    the model reads no other label, and a fleet's answers are mostly label text, so dropping
    ``__name__`` and ``job`` on the server halves what is sent and decoded each period. The
    recorded series are summed by instance (one series each per node and job; were a host to run
    two agents, their GPUs' power, counts and limits add up). ``starving`` answers only the nodes
    that are (the model reads a missing node as not starving).
    """
    sel = f'job="{_escape(job)}"'
    recorded = "|".join(RECORDED)

    scraped = f"max by (instance) (timestamp(gpu_up{{{sel}}}))"
    # the name goes into a label first: timestamp() drops it, and series that differ only by
    # name would then clash
    evaluated = (
        "min by (instance) (timestamp(label_replace("
        f'{{__name__=~"{recorded}",{sel}}}, "series", "$1", "__name__", "(.+)")))'
    )

    def by_instance(series: str) -> str:
        return f"sum by (instance) ({series}{{{sel}}})"

    return {
        "up": f"min by (instance) (up{{{sel}}})",
        "power": by_instance("instance:gpu_power_watts:sum"),
        "gpus_up": by_instance("instance:gpu_up:sum"),
        "gpus": by_instance("instance:gpu_up:count"),
        "floor": by_instance("instance:gpu_power_limit_min_watts:sum"),
        "ceiling": by_instance("instance:gpu_power_limit_max_watts:sum"),
        # demand above the GPUs' minimum limits (the floor pays for those); an agent of a
        # release before that series answers its whole demand instead (floor counted twice)
        "demand": (
            "sum by (instance, priority) "
            f"(instance:wattwarden_power_demand_above_min_watts:sum{{{sel}}})"
            " or sum by (instance, priority) "
            f"(instance:wattwarden_power_demand_watts:sum{{{sel}}})"
        ),
        "starving": f"max by (instance) (wattwarden_power_budget_starving{{{sel}}}) >= 1",
        "lease": f'max by (instance) (wattwarden_power_budget_watts{{{sel},scope="lease"}})',
        # the older of the two, for nodes that have both: each labelled apart so that "or"
        # keeps both (they share their one label, instance), then "and" with each
        "seen_at": (
            f'min by (instance) (label_replace({scraped}, "of", "scrape", "", "")'
            f' or label_replace({evaluated}, "of", "rules", "", ""))'
            f" and on (instance) {scraped} and on (instance) {evaluated}"
        ),
    }


def _escape(value: str) -> str:
    """A PromQL string literal's content."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


@dataclass(frozen=True, slots=True)
class Readings:
    """Everything one period read, at one evaluation time."""

    at_s: float
    """The evaluation time (wall clock, epoch seconds)."""
    results: Mapping[str, Sequence[Sample]]
    """Each query's answer, by the names of :func:`queries` (:class:`Vector` from a reader)."""
    targets: list[Target] | None = field(default=None)
    """The agents' job's active targets; None where the server has no targets API."""


class FleetReader:
    """Reads one period's :class:`Readings`, every query at the same time, all at once."""

    def __init__(self, client: PrometheusClient, job: str) -> None:
        self.client = client
        self.job = job
        self.queries = queries(job)
        self._pool = ThreadPoolExecutor(QUERY_CONCURRENCY, thread_name_prefix="prometheus")
        self._has_targets_api = True
        self._last_targets: tuple[list[bytes], list[Target]] | None = None

    def read(self, at_s: float) -> Readings:
        """Every figure at ``at_s``; PrometheusError when any query fails (nothing half-read).

        The answers are awaited in threads and decoded here, one after the other, in the order
        of :func:`queries`: the first failure in that order is the one raised.
        """
        client = self.client
        futures = {
            name: self._pool.submit(client.fetch_query, expr, at_s)
            for name, expr in self.queries.items()
        }
        targets_future = self._pool.submit(client.fetch_targets)
        results: dict[str, Vector] = {}
        first: PrometheusError | None = None
        for name, future in futures.items():
            try:
                answer = future.result()
                if first is None:  # after a failure, only wait for the others
                    vector = results[name] = client.parse_query(self.queries[name], answer)
                    for label in INDEXED.get(name, ("instance",)):
                        vector.column(label)  # now, while the label maps are fresh
            except PrometheusError as e:
                first = first or e
        targets: list[Target] | None = None
        try:
            found = targets_future.result()
            if first is None:
                targets = self._targets(found)
        except PrometheusError as e:
            first = first or e
        if first is not None:
            raise first
        return Readings(at_s, results, targets)

    def _targets(self, answer: Answer | None) -> list[Target] | None:
        if answer is None:
            if self._has_targets_api:  # said once, asked again each period (cheap)
                log.info("Prometheus %s has no targets API: agent addresses come from the "
                         "instance label", self.client.url)  # fmt: skip
            self._has_targets_api = False
            return None
        self._has_targets_api = True
        # the answer changes every period only in when each target was last scraped: cut those
        # values out, and an answer whose every other byte is the last one's parses the same
        pieces = _SCRAPE_TIMES.split(answer.body) if answer.status == 200 else None
        last = self._last_targets
        if pieces is not None and last is not None and last[0] == pieces:
            return list(last[1])
        found = [t for t in self.client.parse_targets(answer) if t.job == self.job]
        self._last_targets = None if pieces is None else (pieces, found)
        return list(found)

    def close(self) -> None:
        """Stop the query threads (a query in flight ends within its timeout)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


__all__ = [
    "Answer",
    "Auth",
    "FleetReader",
    "PrometheusClient",
    "PrometheusError",
    "Readings",
    "Sample",
    "Target",
    "Vector",
    "queries",
]
