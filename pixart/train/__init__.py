"""Training: the config, the IDDPM loss, the step and the loop, checkpoints, re-parameterisation, samples.

In the order a run meets them: `config.py`; `prepare.py` (checks and conditions before any worker starts) and
`conditions.py` (null caption, sample prompts); `run.py` (one worker's job) and `trainer.py` (the step and the loop),
with `stages.py` (what differs per stage), `sharding.py` (DDP or FSDP), `diffusion.py` (the IDDPM objective),
`weights.py` (init and resume) and `reparam.py` (DiT -> PixArt); `state.py` and `checkpoint.py` (what a checkpoint
holds and how it is published); `monitor.py` (metrics, loss curve, cost) and `sampling.py` (sample grids)."""
