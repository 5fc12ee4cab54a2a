"""Path normalisation before the allowlist."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import paths
from proxy.errors import BadRequest, PathNotAllowed

ALLOWED = ("/api/v3/partners/",)


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/a/b/../c", "/a/c"),
        ("/a/./b/.", "/a/b/"),
        ("/../../x", "/x"),
        ("/a/%2e%2e/b", "/b"),
        ("/a%2Fb", "/a/b"),
        ("/a%5C..%5Cb", "/b"),
        ("/a/%252e%252e/b", "/b"),
        ("/caf%C3%A9", "/café"),
        ("/100%25", "/100%"),
    ],
)
def test_normalise(raw: str, normal: str) -> None:
    assert paths.normalise(raw) == normal


@pytest.mark.parametrize("raw", ["/%", "/%zz", "/a%2", "/%ff", "/%c3%28", "/a%00b", "/a%2500"])
def test_undecodable(raw: str) -> None:
    with pytest.raises(BadRequest):
        paths.normalise(raw)


def test_empty_allowlist_forwards_every_path() -> None:
    assert paths.check("/anything/at/all", ()) == "/anything/at/all"


_segment = st.sampled_from(["..", ".", "", "api", "v3", "partners", "x", "%2e%2e", "%2E.", "..%2f", "%5c..", "%252e%252e", "a%2Fb"])


@given(st.lists(_segment, max_size=12))
def test_whatever_the_spelling_an_admitted_path_stays_under_the_prefix(segments: list[str]) -> None:
    raw = "/api/v3/partners/" + "/".join(segments)
    try:
        judged = paths.check(raw, ALLOWED)
    except (PathNotAllowed, BadRequest):
        return
    assert judged.startswith("/api/v3/partners/")
    assert "/../" not in judged + "/" and "/./" not in judged + "/"
    # the partner API decoding the path any number of times cannot climb out either
    assert paths.normalise(quote(judged, safe="/")).startswith("/api/v3/partners/")


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_normalise_never_crashes(text: str) -> None:
    raw = "/" + quote(text, safe="/%.")
    try:
        out = paths.normalise(raw)
    except BadRequest:
        return
    assert out.startswith("/")
    assert "\x00" not in out


@given(st.lists(st.sampled_from(["api", "v3", "partners", "", "x.y", "a..b", "..", ".", "~", "-_"]), max_size=10))
def test_the_shortcut_for_plain_paths_agrees_with_the_full_algorithm(segments: list[str]) -> None:
    raw = "/" + "/".join(segments)
    assert paths.normalise(raw) == paths.remove_dot_segments(raw)
