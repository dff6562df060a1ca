"""remote_retry's waits are drawn from a source of their own: ranks and loader workers seeded alike
(`seed_everything` seeds `random` with one seed on every rank) still draw different waits, and a
retry does not move the training's `random` stream. No object store needed: the draws themselves."""
from __future__ import annotations

import multiprocessing
import random

from enspipe.stores import remote_retry


def _draws(seed: int) -> list[float]:
    random.seed(seed)  # as seed_everything does on every rank
    return [remote_retry._wait(6) for _ in range(8)]


def test_processes_seeded_alike_draw_different_waits_and_leave_random_alone():
    random.seed(0)
    before = random.getstate()
    [remote_retry._wait(k) for k in range(8)]
    assert random.getstate() == before  # the training's stream is not advanced by a retry's wait
    hi = min(remote_retry.RETRY_MAX_WAIT_S, remote_retry.RETRY_BASE_S * 2 ** 6)
    mine = _draws(7)
    # A forked child (a loader worker; a rank started by fork) with the same seed: other waits.
    with multiprocessing.get_context("fork").Pool(1) as pool:
        child = pool.apply(_draws, (7,))
    assert all(0 <= w <= hi for w in mine + child)
    assert mine != child, (mine, child)
    assert len(set(mine)) == len(mine)  # jittered: not one value drawn again


def test_a_stalled_read_is_tried_again_and_a_connect_timeout_is_not():
    """s3fs makes one attempt (remote_retry owns the tries): a body that stalls past the read timeout
    (an overloaded store) must be transient here, or one stall ends a run; a connect timeout is the
    endpoint's (a dead one fails at once). botocore's own exception classes."""
    from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError

    assert remote_retry._transient(ReadTimeoutError(endpoint_url="http://x")) is not None
    assert remote_retry._transient(ConnectTimeoutError(endpoint_url="http://x")) is None
