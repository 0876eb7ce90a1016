"""The one error table (every class goes out as a status and body and comes back as
itself), and which failed file operations are expected and how they read
(errors.from_os_error)."""

from __future__ import annotations

import errno
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from trustplane.control.app import create_app
from trustplane.embedded.app_server import serve_app
from trustplane.errors import (
    AuthError,
    DecryptionKeyError,
    ExitCode,
    Forbidden,
    IntegrityError,
    MalformedError,
    NotFoundError,
    StorageError,
    TrustplaneError,
    UnavailableError,
    UnsupportedError,
    UsageError,
    error_body,
    error_class,
    error_from_http,
    error_table,
    from_os_error,
    missing,
)

TABLE = error_table()


def _server_raising(kind: type[TrustplaneError]) -> FastAPI:
    """The control plane's own app (its error handlers), with one route that fails."""
    app = create_app(None)  # type: ignore[arg-type]  # no request here reaches the plane

    @app.get("/fail")
    def fail() -> None:
        raise kind(f"it went wrong ({kind.__name__})")

    return app


def test_the_table_holds_every_class_once() -> None:
    assert set(TABLE) == {
        UsageError,
        NotFoundError,
        AuthError,
        Forbidden,
        IntegrityError,
        DecryptionKeyError,
        MalformedError,
        UnavailableError,
        UnsupportedError,
        StorageError,
    }
    assert len({kind.error_type for kind in TABLE}) == len(TABLE)
    for kind in TABLE:
        assert 400 <= kind.http_status < 600
        assert kind.exit_code not in (ExitCode.OK, ExitCode.INTERNAL)


@pytest.mark.parametrize("kind", TABLE, ids=lambda kind: kind.__name__)
def test_every_class_round_trips_through_the_server(kind: type[TrustplaneError]) -> None:
    with serve_app(_server_raising(kind)) as url:  # no lifespan: no plane needed
        answer = httpx.get(f"{url}/fail")
    assert answer.status_code == kind.http_status
    assert answer.json() == {
        "error": {"type": kind.error_type, "message": f"it went wrong ({kind.__name__})"}
    }
    back = error_from_http(answer.status_code, answer.json(), "control plane")
    assert type(back) is kind
    assert str(back) == f"control plane: it went wrong ({kind.__name__})"
    assert back.exit_code == kind.exit_code


def test_statuses_shared_by_two_classes_are_told_apart_by_the_body() -> None:
    no_key = error_from_http(403, error_body(DecryptionKeyError("no key opens it")), "kms")
    refused = error_from_http(403, error_body(Forbidden("policy says no")), "kms")
    assert type(no_key) is DecryptionKeyError
    assert type(refused) is Forbidden
    assert type(error_from_http(422, error_body(UnsupportedError("x")), "s")) is UnsupportedError
    assert type(error_from_http(422, error_body(MalformedError("x")), "s")) is MalformedError


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, UsageError),
        (401, AuthError),
        (403, Forbidden),
        (404, NotFoundError),
        (409, IntegrityError),
        (422, MalformedError),
        (503, UnavailableError),
        (500, UnavailableError),
        (502, UnavailableError),
        (418, UnavailableError),
    ],
)
def test_a_bare_status_means_the_first_class_defined_for_it(
    status: int, expected: type[TrustplaneError]
) -> None:
    for body in (None, "not json", {"error": "flat"}, {"error": {"type": "SomethingNew"}}):
        error = error_from_http(status, body, "control plane")
        assert type(error) is expected
        assert str(error) == f"control plane: HTTP {status}"
    assert error_class(status) is expected


def test_a_subclass_travels_as_its_nearest_class_in_the_table() -> None:
    class VendorDown(UnavailableError):
        """Like keys/kmip_client.py's KmipOperationError: no error_type of its own."""

    assert VendorDown not in error_table()
    error = VendorDown("the KMIP server said no")
    assert error.http_status == 503
    assert error_body(error) == {
        "error": {"type": "UnavailableError", "message": "the KMIP server said no"}
    }


def test_an_error_type_cannot_be_taken_twice() -> None:
    with pytest.raises(TypeError, match="taken"):

        class Impostor(TrustplaneError):
            error_type = "Forbidden"


def test_unexpected_failures_say_nothing_of_the_inside() -> None:
    app = create_app(None)  # type: ignore[arg-type]

    @app.get("/crash")
    def crash() -> None:
        raise RuntimeError("secret detail")

    with serve_app(app) as url:
        answer = httpx.get(f"{url}/crash")
    assert answer.status_code == 500
    assert answer.json() == {"error": {"type": "InternalError", "message": "internal error"}}
    assert type(error_from_http(500, answer.json(), "control plane")) is UnavailableError


# -- expected failures of file operations ---------------------------------------------


def _error(code: int, path: Path | None = None) -> OSError:
    return OSError(code, "ignored", str(path) if path else None)


def test_a_full_disk_and_its_kin_are_storage(tmp_path: Path) -> None:
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO):
        error = from_os_error(_error(code), tmp_path / "k.pem")
        assert isinstance(error, StorageError)
        assert error.exit_code == ExitCode.STORAGE == 10
        assert str(error).startswith(f"{tmp_path / 'k.pem'}: ")
    # write() knows no file name: the reason alone, still one line
    assert str(from_os_error(OSError(errno.ENOSPC, "No space left on device"))) == (
        "no space left on device"
    )


def test_what_is_missing_is_named(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    cases = {
        tmp_path / "a" / "b" / "k.pem": f"directory {tmp_path / 'a'} does not exist",
        tmp_path / "file" / "k.pem": f"{tmp_path / 'file'} is not a directory",
        tmp_path / "k.pem": f"{tmp_path / 'k.pem'} does not exist",
    }
    for path, text in cases.items():
        for code in (errno.ENOENT, errno.ENOTDIR):
            error = from_os_error(_error(code, path))
            assert isinstance(error, NotFoundError)
            assert text in str(error)
        assert text in str(missing(path))


def test_directories_and_files_in_each_others_place_are_usage(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    is_dir = from_os_error(_error(errno.EISDIR, tmp_path))
    assert isinstance(is_dir, UsageError)
    assert str(is_dir) == f"{tmp_path}: is a directory"
    not_dir = from_os_error(_error(errno.EEXIST, tmp_path / "file"))
    assert isinstance(not_dir, UsageError)
    assert str(not_dir) == f"{tmp_path / 'file'}: exists and is not a directory"


@pytest.mark.parametrize("code", [errno.ECONNREFUSED, errno.EPIPE, errno.EBADF, None])
def test_anything_else_is_not_expected(code: int | None) -> None:
    """Left to the caller (a bug, exit 1, unless the caller knows better)."""
    exc = OSError("odd") if code is None else OSError(code, "odd")
    assert from_os_error(exc) is None
