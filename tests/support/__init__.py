"""Helpers of the test suite (not part of the installed package): CPU multi-rank runs
(`multirank`), real ``pretrain_tst.py`` launches and faults (`launches`), a local Slurm
cluster (`slurm_cluster`) and tiny models built without the trainer (`tiny_models`).

Tests import them as ``tests.support.<module>`` (``tests/conftest.py`` puts the repository
root on ``sys.path``, also for the ranks `multirank` starts).
"""
