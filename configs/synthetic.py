"""The demo: the whole DeTT pipeline on the built-in synthetic benchmark (CPU, ~10 min).

  python train.py --config=configs/synthetic.py --workdir=/tmp/dett_demo

Teacher ResNet-18 and student ResNet-10 (width 1/8, small-image stem), both
pretrained on the unbiased synthetic pretraining task (shapes x backgrounds)
as a stand-in for ImageNet pretraining, then: ERM teacher -> DFR teacher ->
ERM identification model (T_id epochs) -> every student method.
"""

import ml_collections


def optim(epochs: int, learning_rate: float, weight_decay: float = 5e-4,
          optimizer: str = "sgd") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      optimizer=optimizer, epochs=epochs, learning_rate=learning_rate, momentum=0.9,
      weight_decay=weight_decay, warmup_epochs=0.0,
      batch_size=0,  # 0: the global batch_size
      accumulate_steps=1,  # k > 1: one update per k micro-batches (gradient accumulation)
      lr_scaling="none", base_batch_size=256))  # or linear/sqrt in (batch * k) / base


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 128  # global; must be divisible by the mesh's data axis
  config.eval_batch_size = 256
  config.augment = True
  config.log_every_steps = 20
  config.checkpoint_every_steps = 50
  config.checkpoint_every_minutes = 0.0  # >0: also checkpoint after this much wall-clock time
  config.keep_checkpoints = 2  # recent checkpoints kept per stage (each holds the best so far)
  config.min_free_mb = 100  # refuse to start on a workdir disk with less free space
  config.on_nonfinite = "stop"  # a NaN/inf loss or gradient: "stop" the run, or "skip" the step
  config.stop_after_steps = 0  # >0: stop each stage after this many steps, as if preempted

  config.data = ml_collections.ConfigDict(dict(
      name="synthetic", image_size=32, train_size=2000, val_size=1200, test_size=2000,
      class_shapes=(3, 2), noise=0.05, faint=0.15, seed=0,
      # Preprocessing (dett_jax/data/images.py): edge-pad 4, random crop, flip.
      train_transform="pad_crop", pad=4, eval_resize=0,
      mean=(127.5, 127.5, 127.5), std=(64.0, 64.0, 64.0),
      workers=0))  # grain worker processes for decoding/augmentation (0: in-process)

  # Mesh (data, model); parameters replicated or FSDP-sharded by path rules
  # ("regex=kind", kinds replicated/fsdp/model; see dett_jax/sharding.py).
  config.mesh = ml_collections.ConfigDict(dict(data=-1, model=1, cpu_devices=0,
                                               strategy="replicated", rules=()))
  config.precision = "float32"  # or bfloat16: activations/matmuls; params, losses, BN stats f32
  # Convolutions on maps smaller than their kernel as patches x matrix: "auto" (on CPU,
  # where XLA's own path for them is ~10x slower), "patches" or "xla".
  config.small_map_conv = "auto"

  config.pretrain = ml_collections.ConfigDict(dict(enabled=True, size=4000))
  config.pretrain.teacher = optim(epochs=5, learning_rate=3e-3, optimizer="adamw", weight_decay=1e-4)
  config.pretrain.student = optim(epochs=5, learning_rate=3e-3, optimizer="adamw", weight_decay=1e-4)

  config.teacher = ml_collections.ConfigDict(dict(
      depth=18, width=0.125, stem="small",
      debias="dfr",  # debiased teachers to produce, comma-separated: "dfr", "gdro" ("" none)
      init="",  # ResNet checkpoint to start from (e.g. imported ImageNet weights)
      checkpoint="",  # a finished teacher: skip training it
      dfr_c_grid=(1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01), dfr_num_refits=10))
  config.teacher.optim = optim(epochs=4, learning_rate=0.03)  # ERM and group-DRO teachers

  # Group DRO (Sagawa et al. 2020), for the gdro teacher and the gdro student: step size
  # of the group weights, and C of the adjustment C / sqrt(n_g) added to each group loss.
  config.gdro = ml_collections.ConfigDict(dict(eta=0.01, adjustment=0.0))

  config.student = ml_collections.ConfigDict(dict(depth=10, width=0.125, stem="small", init=""))

  # Identification model: student architecture, ERM for T_id epochs.
  config.identification = optim(epochs=2, learning_rate=0.03)

  config.distill = ml_collections.ConfigDict(dict(
      # dett_head: DeTT whose matching sees the transplanted head, the recommended
      # variant (README, "DeTT fidelity"); dett: the paper's method, beside it.
      methods="dett,dett_head,kd,kd_up,simkd,dett_no_transplant,erm,jtt",
      teacher="dfr",  # which teacher is distilled: "dfr", "gdro" (debiased) or "erm"
      lambda_up=20.0, reweight="upsample",  # or "loss_weight"
      projector="simkd", projector_factor=2, match="map",  # or "pooled"
      temperature=3.0, kd_ce_weight=0.0,
      head_weight=1.0,  # dett_head: weight of the head-space term (logit MSE through h_T)
      select="val_worst_group",  # or "last"
      teacher_cache=False))  # True: teacher outputs computed once (needs no augmentation)
  config.distill.optim = optim(epochs=6, learning_rate=2e-3, optimizer="adamw", weight_decay=1e-4)
  return config
