"""Drop-in adapters: rlkern kernels behind the names and signatures of TRL, verl and OpenRLHF.

- :mod:`rlkern.integrations.trl`: ``GRPOTrainer``, a subclass of TRL's trainer (needs ``trl``).
- :mod:`rlkern.integrations.verl`: functions of ``verl.trainer.ppo.core_algos`` (no verl needed).
- :mod:`rlkern.integrations.openrlhf`: ``PolicyLoss``, ``ValueLoss``, ``compute_approx_kl`` (no OpenRLHF needed).

The submodules are imported on demand so that importing one never requires another's framework.
"""
