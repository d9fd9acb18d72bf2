"""The numbers the primary shows: Prometheus rendering, the /metrics endpoint's
request handling, ``ctl stats`` data and statsd lines. All pure."""

from __future__ import annotations

import math
import re

import pytest

from forkserve.metrics import (
    HEAD_MAX,
    Histogram,
    Snapshot,
    WorkerSample,
    escape_help,
    escape_label,
    family,
    number,
    parse_head,
    render,
    respond,
    stats,
)
from forkserve.scoreboard import BUCKETS, Counts, bucket_index, method_index, status_index
from forkserve.statsd import clean_name, lines, packets, split_address


def counts(*requests: tuple[str, int, float]) -> Counts:
    """Counts as a worker's slot would hold them after ``requests``."""
    out = Counts()
    for method, status, seconds in requests:
        out.requests += 1
        out.by_method_status[method_index(method)][status_index(status)] += 1
        out.histogram[bucket_index(seconds)] += 1
        out.latency_sum += seconds
    return out


def snapshot(**overrides: object) -> Snapshot:
    fields: dict[str, object] = {
        "start_time": 1_700_000_000.5,
        "counts": counts(("GET", 200, 0.002), ("GET", 404, 0.03), ("POST", 201, 0.2)),
        "in_flight": 1,
        "workers": (
            WorkerSample(1, 101, "serving", 30 << 20, 2),
            WorkerSample(2, 102, "booting", None, 1),
        ),
        "workers_wanted": 2,
        "restarts": {"crash": 1, "max-requests": 3},
    }
    fields.update(overrides)
    return Snapshot(**fields)  # type: ignore[arg-type]


def samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value, for every sample line."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


# -- exposition format --------------------------------------------------------------


def test_every_family_has_help_and_type_before_its_samples() -> None:
    text = render(snapshot(rr_queue_length=0, rr_wait=Histogram((0.001,), (0, 0), 0.0)))
    assert text.endswith("\n")
    seen_type: dict[str, str] = {}
    lines_ = text.splitlines()
    for index, line in enumerate(lines_):
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert lines_[index - 1].startswith(f"# HELP {name} ")
            assert kind in ("counter", "gauge", "histogram")
            seen_type[name] = kind
        elif not line.startswith("#"):
            name = re.match(r"[a-z_]+", line).group(0)  # type: ignore[union-attr]
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in seen_type or seen_type.get(base) == "histogram", line
    assert seen_type["forkserve_requests_total"] == "counter"
    assert seen_type["forkserve_request_duration_seconds"] == "histogram"
    assert seen_type["forkserve_rr_queue_wait_seconds"] == "histogram"


def test_requests_by_method_and_status_class() -> None:
    values = samples(render(snapshot()))
    assert values['forkserve_requests_total{method="GET",status="2xx"}'] == 1
    assert values['forkserve_requests_total{method="GET",status="4xx"}'] == 1
    assert values['forkserve_requests_total{method="POST",status="2xx"}'] == 1
    assert 'forkserve_requests_total{method="PUT",status="2xx"}' not in values


def test_histogram_buckets_are_cumulative_and_count_matches() -> None:
    values = samples(render(snapshot()))
    name = "forkserve_request_duration_seconds"
    buckets = [values[f'{name}_bucket{{le="{number(float(b))}"}}'] for b in BUCKETS]
    assert buckets == sorted(buckets)
    assert values[f'{name}_bucket{{le="0.005"}}'] == 1
    assert values[f'{name}_bucket{{le="0.05"}}'] == 2
    assert values[f'{name}_bucket{{le="+Inf"}}'] == 3 == values[f"{name}_count"]
    assert values[f"{name}_sum"] == pytest.approx(0.232)


def test_gauges_workers_and_restarts() -> None:
    values = samples(render(snapshot()))
    assert values["forkserve_up"] == 1
    assert values["forkserve_start_time_seconds"] == 1_700_000_000.5
    assert values["forkserve_requests_in_flight"] == 1
    assert values['forkserve_workers{state="serving"}'] == 1
    assert values['forkserve_workers{state="booting"}'] == 1
    assert values['forkserve_workers{state="leaving"}'] == 0
    assert values['forkserve_worker_restarts_total{cause="max-requests"}'] == 3
    assert values['forkserve_worker_rss_bytes{worker="1",pid="101"}'] == 30 << 20
    assert 'forkserve_worker_rss_bytes{worker="2",pid="102"}' not in values  # unknown RSS
    assert values['forkserve_worker_requests_total{worker="2"}'] == 1


def test_round_robin_families_only_under_round_robin() -> None:
    assert "rr_queue" not in render(snapshot())
    wait = Histogram((0.001, 0.01), (3, 1, 0), 0.004)
    values = samples(render(snapshot(rr_queue_length=5, rr_wait=wait)))
    assert values["forkserve_rr_queue_length"] == 5
    assert values['forkserve_rr_queue_wait_seconds_bucket{le="0.01"}'] == 4
    assert values["forkserve_rr_queue_wait_seconds_count"] == 4


def test_label_and_help_escaping() -> None:
    assert escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    assert escape_help("a\\b\nc") == "a\\\\b\\nc"
    text = "\n".join(family("x", "gauge", "h", [("", {"cause": 'we"ird\n'}, 1)]))
    assert 'forkserve_x{cause="we\\"ird\\n"} 1' in text.splitlines()


def test_numbers() -> None:
    assert number(3) == "3"
    assert number(0.25) == "0.25"
    assert number(math.inf) == "+Inf"
    assert number(-math.inf) == "-Inf"
    assert number(math.nan) == "NaN"


# -- the endpoint's requests ----------------------------------------------------------


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"GET /metrics HTTP/1.1\r\nHost: x", ("GET", "/metrics")),
        (b"HEAD /metrics?x=1 HTTP/1.0", ("HEAD", "/metrics")),
        (b"GET /metrics HTTP/1.1\nHost: x", ("GET", "/metrics")),
        (b"GET /metrics HTTP/2.0", None),
        (b"GET  /metrics HTTP/1.1", None),
        (b"get /metrics HTTP/1.1", None),
        (b"GET metrics HTTP/1.1", None),
        (b"GET /met\x01rics HTTP/1.1", None),
        (b"GET /metrics HTTP/1.1\r\nno colon here", None),
        (b"GET /metrics HTTP/1.1\r\n folded: x", None),
        (b"GET /metrics HTTP/1.1\r\nName : x", None),
        (b"\xff\xfe garbage", None),
        (b"", None),
    ],
)
def test_parse_head(head: bytes, expected: tuple[str, str] | None) -> None:
    assert parse_head(head) == expected


def test_respond() -> None:
    def body() -> str:
        return "forkserve_up 1\n"

    ok = respond(b"GET /metrics HTTP/1.1\r\nHost: x", body)
    head, _, content = ok.partition(b"\r\n\r\n")
    assert status_of(ok) == 200
    assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in head
    assert b"Content-Length: 15" in head and b"Connection: close" in head
    assert content == b"forkserve_up 1\n"
    head_only = respond(b"HEAD /metrics HTTP/1.1", body)
    assert b"Content-Length: 15" in head_only and head_only.endswith(b"\r\n\r\n")
    assert status_of(respond(b"GET / HTTP/1.1", body)) == 404
    assert status_of(respond(b"GET /metricsx HTTP/1.1", body)) == 404
    not_allowed = respond(b"POST /metrics HTTP/1.1", body)
    assert status_of(not_allowed) == 405 and b"Allow: GET, HEAD" in not_allowed
    assert status_of(respond(b"\x00\x01\x02", body)) == 400
    assert status_of(respond(b"GET /metrics HTTP/1.1\r\n" + b"a: b\r\n" * HEAD_MAX, body)) == 431


# -- histograms and ctl stats ---------------------------------------------------------


def test_histogram_quantiles_are_bucket_upper_bounds() -> None:
    hist = Histogram((0.01, 0.1, 1.0), (50, 40, 9, 1), 5.0)
    assert hist.count == 100
    assert hist.mean == 0.05
    assert hist.quantile(0.5) == 0.01
    assert hist.quantile(0.9) == 0.1
    assert hist.quantile(0.99) == 1.0
    assert hist.quantile(1.0) == math.inf
    assert Histogram((1.0,), (0, 0), 0.0).quantile(0.5) is None
    later = Histogram((0.01, 0.1, 1.0), (52, 40, 9, 1), 5.01)
    assert later.minus(hist).counts == (2, 0, 0, 0)


def test_stats_data() -> None:
    data = stats(snapshot(rr_queue_length=2, rr_wait=Histogram((0.001,), (4, 0), 0.002)))
    assert data["requests"] == 3
    assert data["by_status"] == {"1xx": 0, "2xx": 2, "3xx": 0, "4xx": 1, "5xx": 0}
    assert data["by_method"] == {"GET": {"2xx": 1, "4xx": 1}, "POST": {"2xx": 1}}
    latency = data["latency"]
    assert isinstance(latency, dict)
    assert latency["count"] == 3 and latency["p50_ms"] == 50.0  # 0.03 s: the 0.05 bucket
    assert data["restarts"] == {"crash": 1, "max-requests": 3}
    assert data["workers"] == {"booting": 1, "serving": 1, "retiring": 0, "leaving": 0}
    rr = data["rr"]
    assert isinstance(rr, dict) and rr["queue_length"] == 2
    assert stats(snapshot())["rr"] is None


# -- statsd ---------------------------------------------------------------------------


def test_statsd_lines_are_deltas() -> None:
    first = snapshot()
    sent = lines("app", first, None)
    assert "app.requests:3|c" in sent
    assert "app.request.status.2xx:2|c" in sent
    assert "app.request.status.4xx:1|c" in sent
    assert "app.worker.restarts.crash:1|c" in sent
    assert "app.workers:2|g" in sent
    assert "app.requests.in_flight:1|g" in sent
    assert any(line.startswith("app.request.duration:") and line.endswith("|ms") for line in sent)
    more = counts(("GET", 200, 0.002), ("GET", 404, 0.03), ("POST", 201, 0.2))
    more.add(counts(("GET", 500, 0.5)))
    second = snapshot(counts=more, restarts={"crash": 1, "max-requests": 4})
    sent = lines("app", second, first)
    assert "app.requests:1|c" in sent
    assert "app.request.status.5xx:1|c" in sent
    assert not any(line.startswith("app.request.status.2xx") for line in sent)
    assert "app.worker.restarts.max-requests:1|c" in sent
    assert "app.request.duration:500.000|ms" in sent
    quiet = lines("app", second, second)
    assert not any("|c" in line or "|ms" in line for line in quiet)
    assert "app.workers:2|g" in quiet


def test_statsd_round_robin_and_names() -> None:
    wait = Histogram((0.001,), (2, 0), 0.001)
    sent = lines("my app:x|", snapshot(rr_queue_length=3, rr_wait=wait), None)
    assert "my_app_x_.rr.queue_length:3|g" in sent
    assert "my_app_x_.rr.queue_wait:0.500|ms" in sent
    assert clean_name("a.b-c_d") == "a.b-c_d"
    assert clean_name(".x.") == "x"


def test_statsd_packets_stay_under_the_limit() -> None:
    items = [f"forkserve.metric{i}:{i}|c" for i in range(300)]
    out = packets(items, limit=200)
    assert all(len(packet) <= 200 for packet in out)
    assert b"\n".join(out).split(b"\n") == [item.encode() for item in items]
    assert packets(["x" * 300, "ok:1|c"], limit=200) == [b"ok:1|c"]
    assert packets([]) == []


def test_split_address() -> None:
    assert split_address("127.0.0.1:8125") == ("127.0.0.1", 8125)
    assert split_address("[::1]:8125") == ("::1", 8125)
    assert split_address("localhost:9") == ("localhost", 9)


# -- Q: a connection's wait in the primary, for its first request only ----------------


def test_wsgi_queued_ms_reaches_the_first_request_only() -> None:
    from http_helpers import FakeTransport

    from forkserve.http.wsgi import HTTPOptions, WSGIConnection

    seen: list[object] = []

    def app(environ: dict[str, object], start_response: object) -> list[bytes]:
        seen.append(environ.get("forkserve.queued_ms"))
        start_response("200 OK", [("Content-Length", "0")])  # type: ignore[operator]
        return []

    get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    conn = WSGIConnection(FakeTransport(get + get), app, HTTPOptions(), None, None, queued_ms=2.5)
    assert conn.handle_request() and conn.handle_request()
    assert seen == [2.5, 0.0]
    seen.clear()
    plain = WSGIConnection(FakeTransport(get), app, HTTPOptions(), None, None)
    plain.handle_request()
    assert seen == [None]
