"""dett-jax: debiased knowledge distillation (DeTT) in JAX/Flax.

The public API is exactly the names in `dett_jax.__all__`, importable from here; they
are stable across minor versions and each has a docstring with shapes and an example.
Everything else (the submodules behind these names, `dett_jax.experiment` and the rest
of the bundled trainer, any name not listed below) is private by convention and may
change without notice.

  make_dett_step, make_dett_predict, DeTTState   DeTT as a pure, jit-able step for any
                                                 Flax model that returns its feature map
  feature_loss, kd_loss            the DeTT weighted feature MSE and Hinton KD
  read_head, transplant_head, dense_apply   the teacher's Dense head, copied into a student
  freeze                           an optax optimizer that leaves parameter subtrees frozen
  Projector, align_spatial         student -> teacher feature maps
  create_resnet                    ResNet-10/18/34/50 returning feature_map/features/logits
  fit_dfr, dense_params            DFR last-layer retraining -> an nn.Dense subtree
  find_error_set, example_weights, upsampled_indices, upsample, train_epoch
                                   the error set and its reweighting (grain)
  group_sums, GroupAccumulator, group_accuracy_metrics   group metrics
  Split, Preprocess, load_splits   data sets (built-in, metadata.csv folders, CelebA) and transforms
  save_variables, load_variables   pytrees of arrays to and from Orbax checkpoints
  load_state_dict, torchvision_to_flax   PyTorch ResNet weights -> Flax variables
  make_train_step, jit_train_step, Networks, create_state   the bundled trainer's steps

The whole bundled pipeline is `python train.py --config=configs/synthetic.py
--workdir=DIR`; `examples/` shows DeTT in hand-written Linen and NNX training loops.
"""

__version__ = "0.1.0"

from dett_jax.checkpoints import load_variables, save_variables
from dett_jax.data import Preprocess, Split, load_splits
from dett_jax.data.pipeline import (example_weights, find_error_set, train_epoch, upsample,
                                    upsampled_indices)
from dett_jax.dett import DeTTState, make_dett_predict, make_dett_step
from dett_jax.dfr import dense_params, fit_dfr
from dett_jax.import_torch import load_state_dict, torchvision_to_flax
from dett_jax.metrics import GroupAccumulator, group_accuracy_metrics, group_sums
from dett_jax.models.projector import Projector, align_spatial
from dett_jax.models.resnet import create_resnet
from dett_jax.objectives import feature_loss, kd_loss
from dett_jax.optimizers import freeze
from dett_jax.training.steps import Networks, create_state, jit_train_step, make_train_step
from dett_jax.transplant import dense_apply, read_head, transplant_head

__all__ = [
    # DeTT in any training loop.
    "DeTTState", "make_dett_step", "make_dett_predict",
    # Losses, transplant, projectors, models.
    "feature_loss", "kd_loss", "read_head", "transplant_head", "dense_apply", "freeze",
    "Projector", "align_spatial", "create_resnet", "fit_dfr", "dense_params",
    # The error set and its reweighting.
    "find_error_set", "example_weights", "upsampled_indices", "upsample", "train_epoch",
    # Group metrics.
    "group_sums", "GroupAccumulator", "group_accuracy_metrics",
    # Data and checkpoints.
    "Split", "Preprocess", "load_splits", "save_variables", "load_variables",
    "load_state_dict", "torchvision_to_flax",
    # The bundled trainer's steps.
    "Networks", "create_state", "make_train_step", "jit_train_step",
]
