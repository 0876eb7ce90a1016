"""warm.py: scratch volumes made ahead and views shared by the containers on them.

Plain objects stand in for volumes and views here: what is checked is who
makes, shares and closes what, and when (the snapshotter's tests run them
with the real backend)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from trustplane.layerstore.warm import SharedViews, Spares

DEADLINE = 30.0


def eventually(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class Maker:
    def __init__(self, fail: int = 0) -> None:
        self.made: list[int] = []
        self.dropped: list[int] = []
        self.fail = fail
        self.lock = threading.Lock()

    def make(self) -> int:
        with self.lock:
            if self.fail:
                self.fail -= 1
                raise RuntimeError("no volume today")
            self.made.append(len(self.made))
            return self.made[-1]

    def drop(self, value: int) -> None:
        self.dropped.append(value)


def test_a_spare_is_taken_and_another_made_behind_it() -> None:
    maker = Maker()
    spares = Spares(maker.make, maker.drop, 1)
    spares.fill()
    assert eventually(lambda: maker.made == [0])
    assert spares.take() == 0  # the one made ahead
    assert eventually(lambda: maker.made == [0, 1])  # and one behind it
    assert spares.take() == 1
    spares.close()  # what was made ahead and not taken is dropped
    assert maker.dropped == maker.made[2:]


def test_no_spares_or_a_failing_maker_still_makes_on_demand() -> None:
    maker = Maker()
    none = Spares(maker.make, maker.drop, 0)
    assert none.take() == 0
    assert maker.made == [0]
    none.close()
    failing = Maker(fail=1)
    spares = Spares(failing.make, failing.drop, 1)
    spares.fill()  # fails in the background, logged
    assert eventually(lambda: spares._filler is None)
    assert failing.made == []
    assert spares.take() == 0  # made on demand; the refill behind it works again
    assert eventually(lambda: failing.made == [0, 1])
    spares.close()
    assert failing.dropped == [1]


class Views:
    def __init__(self, busy: int = 0) -> None:
        self.opened: list[str] = []
        self.closed: list[tuple[str, bool]] = []
        self.busy = busy

    def open(self, key: str) -> str:
        self.opened.append(key)
        return f"view-{key}-{len(self.opened)}"

    def close(self, view: str, force: bool) -> None:
        if self.busy and not force:
            self.busy -= 1
            raise RuntimeError("target is busy")
        self.closed.append((view, force))


def test_one_view_for_all_users_closed_with_the_last_when_idle_is_zero() -> None:
    views = Views()
    shared = SharedViews(views.open, views.close, idle=0)
    first = shared.acquire("img")
    assert shared.acquire("img") == first
    assert views.opened == ["img"]
    shared.release("img")
    assert views.closed == []
    shared.release("img")
    assert views.closed == [(first, False)]
    assert shared.acquire("img") != first  # opened anew
    shared.close()


def test_an_idle_view_is_kept_a_while_then_closed() -> None:
    views = Views()
    shared = SharedViews(views.open, views.close, idle=0.3)
    first = shared.acquire("img")
    shared.release("img")
    assert shared.acquire("img") == first  # within the idle time: the same view
    shared.release("img")
    assert eventually(lambda: views.closed == [(first, False)])
    assert views.opened == ["img"]


def test_a_busy_view_is_closed_later_and_evict_or_close_force() -> None:
    views = Views(busy=2)
    shared = SharedViews(views.open, views.close, idle=0)
    first = shared.acquire("a")
    shared.release("a")  # busy twice (an overlay on its way out), then closed
    assert eventually(lambda: views.closed == [(first, False)])
    second = shared.acquire("b")
    shared.evict("b")  # in use: left alone
    assert views.closed == [(first, False)]
    idle = SharedViews(views.open, views.close, idle=3600)
    third = idle.acquire("c")
    idle.release("c")
    idle.evict("c")  # its layers are about to go: closed now
    assert views.closed[-1] == (third, True)
    shared.close()
    assert views.closed[-1] == (second, True)
