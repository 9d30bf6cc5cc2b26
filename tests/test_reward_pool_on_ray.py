"""The reward pool on a real local Ray: parallel scoring, and every way a sample can fail being counted."""

import os
import sys
import time

from ray import cloudpickle
import numpy as np
import pytest

from rewards.composite import CompositeReward, get_reward, register_component
from rewards.pool import RewardPool
from rewards.scoring import score_in_process

pytestmark = pytest.mark.ray

# Test-only components travel to the actors by value (this module is not importable there).
cloudpickle.register_pickle_by_value(sys.modules[__name__])

RAISE, HANG, KILL = (0, 0), (0, 1), (0, 2)  # a pixel set here makes the component misbehave


@register_component("test_troublemaker", (0, 1), "dice, except for masks marked to raise, hang or kill")
def troublemaker(pair):
    if pair.pred[RAISE]:
        raise RuntimeError("marked to raise")
    if pair.pred[HANG]:
        time.sleep(60)
    if pair.pred[KILL]:
        os._exit(3)
    return pair.dice()


def make_batch(n=12, shape=(48, 48), seed=0):
    rng = np.random.default_rng(seed)
    targets = {f"img{i}": (rng.random(shape) < 0.2, None) for i in range(3)}
    items = [(f"img{i % 3}", rng.random(shape) < 0.2) for i in range(n)]
    for _, mask in items:
        mask[0, :3] = False
    return targets, items


def test_pool_matches_in_process_scoring(ray_local):
    targets, items = make_batch(n=20)
    reward = get_reward("default")
    expected = score_in_process(reward, items, targets)
    with RewardPool(reward, num_actors=2, num_cpus_per_actor=1) as pool:
        pool.add_targets(targets)
        got = pool.score(items)
        assert [o.total for o in got] == pytest.approx([o.total for o in expected])
        assert all(o.ok for o in got)
        assert got[0].components.keys() == {"dice", "cldice", "recall", "betti0", "length"}
        assert pool.stats.scored == 20 and pool.stats.failed == 0


def test_raising_sample_is_a_recorded_failure(ray_local):
    targets, items = make_batch()
    items[5][1][RAISE] = True
    with RewardPool(CompositeReward({"test_troublemaker": 1}), num_actors=2, num_cpus_per_actor=0.5) as pool:
        pool.add_targets(targets)
        out = pool.score(items)
        assert [o.ok for o in out].count(False) == 1 and not out[5].ok
        assert "RuntimeError: marked to raise" in out[5].error and "img2" in out[5].error
        assert pool.stats.failed == 1 and pool.stats.scored == 11
        assert pool.failures[-1].index == 5 and pool.failures[-1].target_id == "img2"
        assert pool.stats.actor_restarts == 0


def test_hanging_sample_times_out_alone(ray_local):
    targets, items = make_batch()
    items[7][1][HANG] = True
    with RewardPool(CompositeReward({"test_troublemaker": 1}), num_actors=2, num_cpus_per_actor=0.5,
                    timeout_s=5.0, chunk_size=4) as pool:
        pool.add_targets(targets)
        start = time.monotonic()
        out = pool.score(items)
        # the hang is 60 s: the pool gave up on it well before (a timeout of 1.5 s also timed out a chunk-mate
        # re-scored on a freshly restarted actor when the 2-core machine was loaded)
        assert time.monotonic() - start < 45
        assert not out[7].ok and "timed out" in out[7].error
        assert all(o.ok for i, o in enumerate(out) if i != 7)  # its chunk-mates were re-scored
        assert pool.stats.timeouts == 1 and pool.stats.actor_restarts >= 2  # chunk, then the lone retry


def test_sample_that_kills_its_actor_fails_after_retries_and_actor_is_replaced(ray_local):
    targets, items = make_batch()
    items[3][1][KILL] = True
    with RewardPool(CompositeReward({"test_troublemaker": 1}), num_actors=2, num_cpus_per_actor=0.5,
                    max_attempts=2, chunk_size=3) as pool:
        pool.add_targets(targets)
        out = pool.score(items)
        assert not out[3].ok and "actor died" in out[3].error and out[3].attempts == 2
        assert all(o.ok for i, o in enumerate(out) if i != 3)
        # killed with its chunk, then once more alone (2 attempts): three deaths, three replacements
        assert pool.stats.actor_restarts == 3
        assert pool.num_actors == 2
        assert all(o.ok for o in pool.score(make_batch(seed=1)[1]))  # the replacements work


def test_externally_killed_actor_is_replaced(ray_local):
    targets, items = make_batch()
    with RewardPool("default", num_actors=2, num_cpus_per_actor=0.5) as pool:
        pool.add_targets(targets)
        ray_local.kill(pool._actors[0], no_restart=True)
        out = pool.score(items)
        assert all(o.ok for o in out)
        assert pool.stats.actor_restarts >= 1


def test_unknown_target_is_a_clear_error(ray_local):
    with RewardPool("default", num_actors=1, num_cpus_per_actor=0.5) as pool:
        with pytest.raises(KeyError, match="no ground truth added for target id"):
            pool.score([("nope", np.zeros((4, 4), bool))])
