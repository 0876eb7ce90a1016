"""The policy's `runtime.stop_on_drift`: which images' containers a node stops on drift."""

from __future__ import annotations

import pytest

from trustplane.control.policy import DEFAULT_POLICY, parse_policy
from trustplane.errors import MalformedError


def policy_with(runtime: str) -> str:
    return DEFAULT_POLICY + runtime


def test_absent_means_report_only() -> None:
    policy = parse_policy(DEFAULT_POLICY, "p.yaml")
    assert not policy.stops_on_drift("shop/app")


def test_true_stops_every_image_and_false_none() -> None:
    assert parse_policy(policy_with("runtime:\n  stop_on_drift: true\n"), "p").stops_on_drift("x")
    assert not parse_policy(policy_with("runtime:\n  stop_on_drift: false\n"), "p").stops_on_drift(
        "x"
    )


def test_a_list_names_images_by_glob() -> None:
    policy = parse_policy(policy_with('runtime:\n  stop_on_drift: ["image:shop/*"]\n'), "p")
    assert policy.stops_on_drift("shop/app")
    assert policy.stops_on_drift("shop/team/app")
    assert not policy.stops_on_drift("other/app")


@pytest.mark.parametrize(
    ("runtime", "message"),
    [
        ("runtime: yes please\n", "runtime must be a mapping"),
        ("runtime:\n  stop_on_drfit: true\n", "only stop_on_drift"),
        ("runtime:\n  stop_on_drift: 1\n", "runtime.stop_on_drift must be a non-empty list"),
        ("runtime:\n  stop_on_drift: []\n", "runtime.stop_on_drift must be a non-empty list"),
    ],
)
def test_a_typo_is_an_error_not_a_silent_default(runtime: str, message: str) -> None:
    with pytest.raises(MalformedError, match=message):
        parse_policy(policy_with(runtime), "p.yaml")
