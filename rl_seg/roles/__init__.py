"""The Ray roles of a PPO run, one module each: rollout actors, the learner group, the coordinator.

(The reward role is ``rewards.pool``.) The algorithm itself lives in ``rl_seg.ppo.core`` and has no Ray in it.
"""
