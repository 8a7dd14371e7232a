"""Training: the config, the IDDPM loss, the step and the loop, checkpoints, re-parameterisation, samples."""
