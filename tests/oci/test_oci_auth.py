"""Registry auth: challenge parsing, stored credentials, the token flow (in-process)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest

from trustplane.errors import AuthError, MalformedError, UnavailableError
from trustplane.oci.auth import Authenticator, Challenge
from trustplane.oci.credentials import Credentials, auth_files, lookup_credentials

# -- WWW-Authenticate --------------------------------------------------------------


def test_bearer_challenge_from_the_token_spec() -> None:
    # docs/spec/auth/token.md of the distribution project, verbatim.
    header = (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:samalba/my-app:pull,push"'
    )
    assert Challenge.parse(header) == Challenge(
        "bearer",
        {
            "realm": "https://auth.docker.io/token",
            "service": "registry.docker.io",
            "scope": "repository:samalba/my-app:pull,push",
        },
    )


def test_insufficient_scope_challenge() -> None:
    header = (
        'Bearer realm="https://r/token", service="r", scope="repository:a:pull,push", '
        'error="insufficient_scope"'
    )
    challenge = Challenge.parse(header)
    assert challenge.params["error"] == "insufficient_scope"
    assert challenge.params["scope"] == "repository:a:pull,push"


def test_basic_challenge_case_and_unquoted_values() -> None:
    assert Challenge.parse('Basic realm="Registry Realm"') == Challenge(
        "basic", {"realm": "Registry Realm"}
    )
    assert Challenge.parse("  BEARER Realm=https://h/t?x=1,Service=reg  ") == Challenge(
        "bearer", {"realm": "https://h/t?x=1", "service": "reg"}
    )
    assert Challenge.parse("Negotiate") == Challenge("negotiate", {})


def test_quoted_pairs_are_unescaped() -> None:
    # RFC 9110 5.6.4: a backslash quotes the next character.
    challenge = Challenge.parse(r'Basic realm="say \"hi\" \\o/"')
    assert challenge.params["realm"] == 'say "hi" \\o/'


# -- stored credentials -------------------------------------------------------------


def _auth_file(path: Path, auths: object) -> Path:
    path.write_text(json.dumps({"auths": auths}))
    return path


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_credentials_parse_and_basic_header() -> None:
    # RFC 7617 section 2's example.
    assert Credentials.parse("Aladdin:open sesame").basic_header() == (
        "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
    )
    assert Credentials.parse("u:p:with:colons") == Credentials("u", "p:with:colons")
    assert Credentials.parse("u:") == Credentials("u", "")
    for bad in ("nocolon", ":password", ""):
        with pytest.raises(MalformedError, match="USER:PASSWORD"):
            Credentials.parse(bad)


def test_lookup_finds_host_in_any_spelling(tmp_path: Path) -> None:
    path = _auth_file(
        tmp_path / "auth.json",
        {
            "reg.io:5000": {"auth": _b64("alice:pw1")},
            "https://secure.io": {"auth": _b64("bob:pw2")},
            "http://plain.io": {"auth": _b64("carol:pw3")},
            "helper.io": {},
        },
    )
    assert lookup_credentials("reg.io:5000", [path]) == Credentials("alice", "pw1")
    assert lookup_credentials("secure.io", [path]) == Credentials("bob", "pw2")
    assert lookup_credentials("plain.io", [path]) == Credentials("carol", "pw3")
    assert lookup_credentials("helper.io", [path]) is None
    assert lookup_credentials("other.io", [path]) is None
    assert lookup_credentials("reg.io", [path]) is None  # the port is part of the name


def test_lookup_takes_the_first_file_that_knows_the_host(tmp_path: Path) -> None:
    first = _auth_file(tmp_path / "a.json", {"other.io": {"auth": _b64("x:y")}})
    second = _auth_file(tmp_path / "b.json", {"reg.io": {"auth": _b64("second:2")}})
    third = _auth_file(tmp_path / "c.json", {"reg.io": {"auth": _b64("third:3")}})
    missing = tmp_path / "missing.json"
    files = [missing, first, second, third]
    assert lookup_credentials("reg.io", files) == Credentials("second", "2")
    assert lookup_credentials("nowhere.io", [missing]) is None


def test_file_without_auths_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"credsStore": "desktop"}')
    assert lookup_credentials("reg.io", [path]) is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not a valid auth file"),
        ("[]", "not a valid auth file"),
        (json.dumps({"auths": []}), "not a valid auth file"),
        (json.dumps({"auths": {"reg.io": {"auth": "!!!"}}}), "USER:PASSWORD"),
        (json.dumps({"auths": {"reg.io": {"auth": "é"}}}), "credentials for reg.io"),
        (json.dumps({"auths": {"reg.io": {"auth": _b64("nocolon")}}}), "USER:PASSWORD"),
    ],
)
def test_bad_auth_files_are_malformed(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "auth.json"
    path.write_text(content)
    with pytest.raises(MalformedError, match=message) as info:
        lookup_credentials("reg.io", [path])
    assert "\n" not in str(info.value)
    assert "nocolon" not in str(info.value)  # never echo the secret


def test_auth_files_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "env.json"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert auth_files(tmp_path / "explicit.json") == [
        tmp_path / "explicit.json",
        tmp_path / "env.json",
        tmp_path / "run" / "containers" / "auth.json",
        tmp_path / "home" / ".docker" / "config.json",
    ]
    monkeypatch.delenv("REGISTRY_AUTH_FILE")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert auth_files() == [tmp_path / "home" / ".docker" / "config.json"]


# -- the Authenticator against an in-process token server ---------------------------


class TokenServer:
    def __init__(self, answers: list[httpx.Response]) -> None:
        self.answers = answers
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.answers.pop(0)


def _client(server: TokenServer) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(server))


def _challenge(header: str) -> httpx.Response:
    return httpx.Response(401, headers={"WWW-Authenticate": header})


BEARER = 'Bearer realm="https://auth.test/token",service="reg.test"'


def test_no_challenge_no_header() -> None:
    auth = Authenticator("reg.test", None)
    assert auth.header(_client(TokenServer([])), ()) == {}
    assert auth.learn(httpx.Response(401)) is False


def test_basic_flow() -> None:
    auth = Authenticator("reg.test", Credentials("u", "p"))
    assert auth.learn(_challenge('Basic realm="r"')) is True
    assert auth.header(_client(TokenServer([])), ()) == {"Authorization": "Basic dTpw"}
    # Refused again with the same scheme: retrying cannot help.
    assert auth.learn(_challenge('Basic realm="r"')) is False
    anonymous = Authenticator("reg.test", None)
    anonymous.learn(_challenge('Basic realm="r"'))
    with pytest.raises(AuthError, match="requires credentials"):
        anonymous.header(_client(TokenServer([])), ())


def test_bearer_flow_fetches_and_caches_a_token_per_scope() -> None:
    server = TokenServer(
        [
            httpx.Response(200, json={"token": "T1", "expires_in": 300}),
            httpx.Response(200, json={"access_token": "T2"}),
        ]
    )
    client = _client(server)
    auth = Authenticator("reg.test", Credentials("u", "p"))
    assert auth.learn(_challenge(BEARER)) is True
    pull = ("repository:app:pull",)
    assert auth.header(client, pull) == {"Authorization": "Bearer T1"}
    assert auth.header(client, pull) == {"Authorization": "Bearer T1"}  # cached
    both = ("repository:app:pull", "repository:app:push")
    assert auth.header(client, both) == {"Authorization": "Bearer T2"}
    assert len(server.requests) == 2
    first = server.requests[0]
    assert first.url.host == "auth.test"
    assert first.url.params.get_list("service") == ["reg.test"]
    assert first.url.params.get_list("scope") == ["repository:app:pull"]
    assert first.headers["Authorization"] == "Basic dTpw"
    assert server.requests[1].url.params.get_list("scope") == list(both)


def test_bearer_insufficient_scope_is_final_but_expiry_is_retried() -> None:
    auth = Authenticator("reg.test", None)
    assert auth.learn(_challenge(BEARER)) is True
    assert auth.learn(_challenge(BEARER)) is True  # token expired: fetch another
    assert auth.learn(_challenge(BEARER + ',error="insufficient_scope"')) is False


@pytest.mark.parametrize(
    ("answer", "error", "message"),
    [
        (httpx.Response(401), AuthError, "refused the credentials"),
        (httpx.Response(403), AuthError, "refused the credentials"),
        (httpx.Response(500), AuthError, "answered HTTP 500"),
        (httpx.Response(200, content=b"not json"), AuthError, "invalid answer"),
        (httpx.Response(200, json=[]), AuthError, "invalid answer"),
        (httpx.Response(200, json={"token": "t", "expires_in": "soon"}), AuthError, "invalid"),
        (httpx.Response(200, json={}), AuthError, "sent no token"),
        (httpx.Response(200, json={"token": 5}), AuthError, "sent no token"),
    ],
)
def test_token_server_failures(answer: httpx.Response, error: type, message: str) -> None:
    auth = Authenticator("reg.test", None)
    auth.learn(_challenge(BEARER))
    with pytest.raises(error, match=message):
        auth.header(_client(TokenServer([answer])), ("repository:a:pull",))


def test_unreachable_token_server_and_missing_realm() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    auth = Authenticator("reg.test", None)
    auth.learn(_challenge(BEARER))
    with pytest.raises(UnavailableError, match="unreachable"):
        auth.header(httpx.Client(transport=httpx.MockTransport(refuse)), ())
    no_realm = Authenticator("reg.test", None)
    no_realm.learn(_challenge('Bearer service="x"'))
    with pytest.raises(AuthError, match="without a realm"):
        no_realm.header(_client(TokenServer([])), ())


def test_unsupported_scheme() -> None:
    auth = Authenticator("reg.test", None)
    auth.learn(_challenge("Negotiate"))
    with pytest.raises(AuthError, match="unsupported auth 'negotiate'"):
        auth.header(_client(TokenServer([])), ())
