"""The pipeline's stages, called by both the pipeline (`dett_jax.experiment`) and the
sweeps (`dett_jax.sweep`): pretraining and teachers (`teachers`), identification and
students (`students`), on a shared `context.Context`."""
