"""Hostile input against the gateway's parser, classifier, body policy and HTTP
framing, in process: many thousands of crafted requests per run.

The oracle is how dockerd would read the same bytes: Go's path cleaning and
percent-decoding, case-insensitive JSON keys with the last duplicate winning,
Content-Length and Transfer-Encoding in any combination. Whatever the
gateway accepts must mean the same to it as to dockerd; everything else
must be refused. TRUSTPLANE_FUZZ_EXAMPLES sets the number of examples per
property (default 5 000 for the path property, a third of that for the
others: hypothesis spends about 2 ms per example generating it). The bulk
test sends TRUSTPLANE_FUZZ_BULK (default 100 000) requests built from the
same pieces by a seeded random generator through the whole in-process
decision path (head, framing, target, action, body) in a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import posixpath
import random
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trustplane.errors import MalformedError
from trustplane.gateway.actions import classify
from trustplane.gateway.host_access import host_access, parse_json_object
from trustplane.gateway.http1 import (
    check_content_type,
    chunk,
    parse_request_head,
    read_body,
    request_framing,
)
from trustplane.gateway.request import parse_target

EXAMPLES = int(os.environ.get("TRUSTPLANE_FUZZ_EXAMPLES", "5000"))
BULK = int(os.environ.get("TRUSTPLANE_FUZZ_BULK", "100000"))
FAST = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
SOME = settings(
    max_examples=max(1000, EXAMPLES // 3),
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)

MUTATING = [
    "/containers/create",
    "/containers/web/start",
    "/containers/web/kill",
    "/containers/web/exec",
    "/images/create",
    "/images/busybox",
    "/exec/abc/start",
    "/build",
    "/volumes/create",
]
MUTATING_CALLS = {("DELETE", "/images/busybox")} | {
    ("POST", path) for path in MUTATING if path != "/images/busybox"
}
READ = ["/containers/json", "/images/json", "/_ping", "/info", "/containers/web/logs"]
PIECES = [
    "/", "//", ".", "..", "/./", "/../", "%2e", "%2E", "%2f", "%2F", "%252e", "%00", "%",
    "\\", ";", "?", "#", "v1.41", "V1.41", "v1.23", "v1.41.0", "v01.41", "v1", "v1.",
    "containers", "Containers", "CONTAINERS", "images", "json", "create", "start", "web",
    "exec", "%63ontainers", "%20", " ", "\t", "\x00", "\u212a", "ſ", "é", "*", "~", "@", ":",
]  # fmt: skip


def go_view(path: str) -> str:
    """How Go's router would see a path: percent-decoded and cleaned."""
    return posixpath.normpath(unquote(path)) if path else path


@st.composite
def hostile_targets(draw: st.DrawFn) -> str:
    base = draw(st.sampled_from(MUTATING + READ))
    version = draw(st.sampled_from(["", "/v1.41", "/v1.24", "/V1.41", "/v1.23", "/v1.41.0"]))
    parts = draw(st.lists(st.sampled_from(PIECES), max_size=6))
    where = draw(st.integers(0, len(base)))
    mixed = base[:where] + "".join(parts) + base[where:]
    mask = draw(st.integers(0, 2**64 - 1))  # one draw for the case of every character
    if mask & 1:
        mixed = "".join(c.upper() if mask >> (i % 63) & 2 else c for i, c in enumerate(mixed))
    query = draw(st.sampled_from(["", "?name=x", "?fromImage=busybox", "?a=1&a=2", "?x=%zz"]))
    return version + mixed + query


@FAST
@given(method=st.sampled_from(["GET", "POST", "DELETE", "PUT", "HEAD", "get", "PATCH"]),
       target=hostile_targets())  # fmt: skip
def test_accepted_paths_mean_the_same_to_dockerd(method: str, target: str) -> None:
    try:
        parsed = parse_target(method, target)
    except MalformedError:
        return
    raw_path = target.partition("?")[0]
    # Accepted: no decoding or cleaning changes it, so dockerd routes what we classified.
    assert go_view(raw_path) == raw_path
    assert "%" not in raw_path
    assert "\\" not in raw_path
    assert ".." not in parsed.segments
    assert "." not in parsed.segments
    assert parse_target(method, parsed.upstream_target) == parsed
    try:
        classified = classify(parsed)
    except MalformedError:
        return
    if (method, parsed.path) in MUTATING_CALLS:
        assert classified.action is not None, (method, target)


@SOME
@given(target=st.text(min_size=0, max_size=80), method=st.text(max_size=8))
def test_arbitrary_text_is_refused_or_canonical(target: str, method: str) -> None:
    try:
        parsed = parse_target(method, target)
    except MalformedError:
        return
    assert parsed.upstream_target.isascii()
    assert go_view(target.partition("?")[0]) == target.partition("?")[0]


DANGEROUS: list[tuple[str, Any, str]] = [
    ("Privileged", True, "privileged"),
    ("Binds", ["/:/host"], "host-bind"),
    ("Binds", ["/etc:/x:ro"], "host-bind"),
    ("Mounts", [{"Type": "bind", "Source": "/", "Target": "/x"}], "host-bind"),
    ("PidMode", "host", "host-namespace"),
    ("NetworkMode", "host", "host-namespace"),
    ("IpcMode", "host", "host-namespace"),
    ("UsernsMode", "host", "host-namespace"),
    ("CapAdd", ["SYS_ADMIN"], "capabilities"),
    ("Devices", [{"PathOnHost": "/dev/sda"}], "devices"),
    ("SecurityOpt", ["seccomp=unconfined"], "security-opt"),
]


@st.composite
def create_bodies(draw: st.DrawFn) -> tuple[bytes, set[str]]:
    """A create body with dangerous fields under case-mangled keys, maybe duplicated."""
    chosen = draw(st.lists(st.sampled_from(DANGEROUS), min_size=1, max_size=4))
    pairs: list[str] = []
    wanted: set[str] = set()
    for key, value, category in chosen:
        mask = draw(st.integers(0, 2**32 - 1))
        spelled = "".join(c.swapcase() if mask >> i & 1 else c for i, c in enumerate(key))
        if draw(st.booleans()):
            pairs.append(json.dumps(spelled) + ": " + json.dumps(_harmless(value)))
        pairs.append(json.dumps(spelled) + ": " + json.dumps(value))
        wanted.add(category)
    host_key = draw(st.sampled_from(["HostConfig", "hostconfig", "HOSTCONFIG", "hostConfig"]))
    body = '{"Image": "busybox", ' + json.dumps(host_key) + ": {" + ", ".join(pairs) + "}}"
    return body.encode(), wanted


def _harmless(value: Any) -> Any:
    if isinstance(value, bool):
        return False
    if isinstance(value, list):
        return []
    return ""


@SOME
@given(case=create_bodies())
def test_dangerous_bodies_are_seen_in_any_spelling(case: tuple[bytes, set[str]]) -> None:
    body, wanted = case
    target = parse_target("POST", "/v1.41/containers/create")
    try:
        found, _ = host_access("create", target, body)
    except MalformedError:
        return  # refused outright (duplicate keys): also a denial
    assert wanted <= found


@SOME
@given(body=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_garbage_bodies_are_refused_not_crashing(body: bytes) -> None:
    target = parse_target("POST", "/containers/create")
    with contextlib.suppress(MalformedError):
        host_access("create", target, body)


def test_known_json_tricks() -> None:
    target = parse_target("POST", "/containers/create")
    for body in (
        b'{"HostConfig": {"Privileged": false, "privileged": true}}',
        b'{"HostConfig": {"Privileged": true, "HostConfig": 1}, "HostConfig": {}}',
        b'{"HostConfig": {"Privileged": 1}}',
        b'{"HostConfig": {"\\u212aey": 1}}',
        b'{"HostConfig": {"Privileged": true}',
        b"[1]",
        b'{"HostConfig": "x"}',
        b'{"Image": "a"}\xff',
    ):
        with pytest.raises(MalformedError):
            host_access("create", target, body)
    assert parse_json_object(b"") == {}


HEADER_NAMES = ["Content-Length", "content-length", "CONTENT-LENGTH", "Transfer-Encoding",
                "transfer-encoding", "Host", "Expect", "X-Trustplane-Token"]  # fmt: skip
HEADER_VALUES = ["0", "5", "05", "+5", "-1", "5, 5", "chunked", "Chunked", " chunked",
                 "chunked, identity", "identity", "gzip, chunked", "", "x\x00", "docker"]  # fmt: skip


@st.composite
def heads(draw: st.DrawFn) -> tuple[bytes, list[tuple[str, str]]]:
    headers = draw(
        st.lists(
            st.tuples(st.sampled_from(HEADER_NAMES), st.sampled_from(HEADER_VALUES)), max_size=5
        )
    )
    separator = draw(st.sampled_from([": ", ":", " : ", ":\t"]))
    ending = draw(st.sampled_from(["\r\n", "\r\n", "\n", "\r"]))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2", "http/1.1"]))
    lines = [f"POST /containers/create {version}", "Host: docker"]
    lines += [f"{name}{separator}{value}" for name, value in headers]
    return (ending.join(lines) + "\r\n\r\n").encode(), headers


@SOME
@given(case=heads())
def test_smuggling_framing_is_refused(case: tuple[bytes, list[tuple[str, str]]]) -> None:
    data, headers = case
    try:
        head = parse_request_head(data)
        framing = request_framing(head)
    except MalformedError:
        return
    lengths = [v for n, v in headers if n.lower() == "content-length"]
    encodings = [v for n, v in headers if n.lower() == "transfer-encoding"]
    assert not (lengths and encodings)
    assert len(lengths) <= 1
    assert len(encodings) <= 1
    if lengths:
        assert lengths[0].isdigit()
        assert framing.length == int(lengths[0])
    if encodings:
        assert encodings[0].strip().lower() == "chunked"
        assert framing.chunked
    assert len(head.all("host")) == 1


def test_the_table_examples() -> None:
    cases = {
        ("GET", "/_ping"): None,
        ("GET", "/v1.41/containers/json?all=1"): None,
        ("POST", "/v1.41/containers/create?name=x"): "container.start",
        ("POST", "/v1.41/containers/abc/start"): "container.start",
        ("POST", "/v1.41/containers/abc/kill?signal=KILL"): "container.stop",
        ("DELETE", "/v1.41/containers/abc?force=1"): "container.delete",
        ("DELETE", "/v1.41/images/repo/name:tag"): "container.delete",
        ("POST", "/v1.41/images/create?fromImage=busybox&tag=1"): "image.pull",
        ("POST", "/v1.41/images/create?fromSrc=-&repo=x"): "container.modify",
        ("POST", "/v1.41/images/a/b:c/tag?repo=d"): "container.modify",
        ("POST", "/v1.41/build?t=shop/app:1"): "image.build",
        ("POST", "/v1.41/build/prune"): "container.delete",
        ("POST", "/v1.41/commit?container=abc&repo=x"): "container.modify",
        ("GET", "/v1.41/images/a/b:c/json"): None,
        ("POST", "/v1.41/exec/abc/start"): "container.modify",
        ("GET", "/v1.41/containers/abc/archive?path=/"): "container.modify",
        ("POST", "/v1.41/containers/abc/resize?h=1&w=1"): None,
    }
    for (method, target), action in cases.items():
        assert classify(parse_target(method, target)).action == action, target
    for method, target in (
        ("POST", "/v1.41/plugins/pull"),
        ("POST", "/session"),
        ("GET", "/v1.41/containers/a/b/json"),
        ("POST", "/v1.41/images/create?fromImage=a&fromImage=b"),
        ("POST", "/v1.41/images/create"),
        ("OPTIONS", "/_ping"),
        ("GET", "/v1.41/swarm"),
    ):
        with pytest.raises(MalformedError):
            classify(parse_target(method, target))


def _bulk_request(rng: random.Random, number: int) -> bytes:
    base = rng.choice(MUTATING + READ)
    version = rng.choice(["", "/v1.41", "/V1.41", "/v1.23", "/v1.41.0", "/v1", "/v1.41/"])
    cut = rng.randint(0, len(base))
    noise = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 4)))
    path = version + base[:cut] + noise + base[cut:]
    if rng.random() < 0.3:
        path = "".join(c.upper() if rng.random() < 0.5 else c for c in path)
    target = f"{path}?name=fz{number}" + rng.choice(["", "&name=x", "&fromImage=a", "&tag=b"])
    method = rng.choice(["POST", "POST", "GET", "DELETE", "PUT", "HEAD", "post", "PATCH"])
    key, value, _ = rng.choice(DANGEROUS)
    spelled = "".join(c.swapcase() if rng.random() < 0.3 else c for c in key)
    body = rng.choice(
        [
            json.dumps({"Image": "busybox", "HostConfig": {spelled: value}}).encode(),
            b'{"Image": "busybox", "HostConfig": {"Privileged": false, "privileged": true}}',
            b"{", b"[]", b"null", b"\xff", b'{"HostConfig": {"Privileged": "yes"}}',
        ]
    )  # fmt: skip
    headers = [f"{method} {target} HTTP/1.1", "Host: docker", "X-Trustplane-Token: t"]
    headers += rng.choice(
        [[], [], ["Content-Type: application/json"], ["Content-Type: application/x-tar"],
         ["Content-Type: application/x-www-form-urlencoded"],
         ["content-type: Multipart/Form-Data; boundary=b"]]
    )  # fmt: skip
    framing = rng.choice(["length", "both", "double", "te", "te-odd", "none"])
    if framing in ("length", "both", "double"):
        headers.append(f"Content-Length: {len(body)}")
    if framing == "double":
        headers.append(f"content-length: {len(body)}")
    if framing in ("both", "te"):
        headers.append(rng.choice(["Transfer-Encoding: chunked", "transfer-encoding: Chunked"]))
    if framing == "te-odd":
        headers.append(
            rng.choice(["Transfer-Encoding: chunked, identity", "Transfer-Encoding:\tgzip"])
        )
    if framing in ("both", "te", "te-odd") and rng.random() < 0.8:
        cut = rng.randint(0, len(body))
        body = (
            chunk(body[:cut]) + chunk(body[cut:]) + chunk(b"") if cut else chunk(body) + chunk(b"")
        )
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


async def _decide_in_process(data: bytes) -> tuple[str | None, bytes]:
    """The gateway's local checks, in its order; the action it would ask about, or None."""
    head_end = data.index(b"\r\n\r\n") + 4
    head = parse_request_head(data[:head_end])
    framing = request_framing(head)
    check_content_type(head)
    reader = asyncio.StreamReader()
    reader.feed_data(data[head_end:])
    reader.feed_eof()
    body = b"".join([piece async for piece in read_body(reader, framing)])
    target = parse_target(head.start[0], head.start[1])
    classified = classify(target)
    wanted, _ = host_access(classified.body, target, b"" if classified.stream_body else body)
    if classified.action is not None and wanted:
        return None, body
    # Only a create body carries a HostConfig (exec start or commit ignore one).
    return classified.action or "read", body if classified.body == "create" else b""


def test_bulk_crafted_requests_fail_closed() -> None:
    """BULK requests: each is refused, or is exactly what dockerd would read the same way."""
    asyncio.run(_bulk())


async def _bulk() -> None:
    rng = random.Random(20261203)
    outcomes: dict[str, int] = {}
    for number in range(BULK):
        data = _bulk_request(rng, number)
        try:
            verdict, body = await _decide_in_process(data)
        except MalformedError:
            verdict, body = None, b""
        key = verdict or "refused"
        outcomes[key] = outcomes.get(key, 0) + 1
        if verdict not in (None, "read"):
            # Let through to authorization: the bytes must be unambiguous.
            text = data.decode("latin-1")
            path = text.split(" ", 2)[1].partition("?")[0]
            assert go_view(path) == path, text
            assert "%" not in path, text
            lowered = text.lower()
            assert lowered.count("content-length") + lowered.count("transfer-encoding") <= 1
            assert "form" not in lowered.partition("\r\n\r\n")[0], text
            # What the gateway read as this request's body asks for nothing dangerous
            # (bytes after an unframed request are parsed, and refused, as the next one).
            assert b'privileged": true' not in body.lower(), text
            assert b'"/:/host"' not in body, text
    assert sum(outcomes.values()) == BULK
    assert outcomes["refused"] > BULK // 2, outcomes
    # Not vacuous: well-formed calls do get through to the next stage.
    assert outcomes.get("read", 0) > 0, outcomes
    assert outcomes.get("container.start", 0) > 0, outcomes
    print(f"bulk outcomes over {BULK} requests: {outcomes}")
