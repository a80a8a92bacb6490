"""dett-jax: debiased knowledge distillation (DeTT) in JAX/Flax.

The method's pieces, importable from here:

  feature_loss, kd_loss            the DeTT weighted feature MSE and Hinton KD
  read_head, transplant_head       the teacher's Dense head, copied into a student tree
  Projector, align_spatial         student -> teacher feature maps
  create_resnet                    ResNet-10/18/34/50 returning feature_map/features/logits
  fit_dfr, dense_params            DFR last-layer retraining -> an nn.Dense subtree
  upsampled_indices, example_weights, train_epoch   error-set reweighting in grain
  group_sums, group_accuracy_metrics                group metrics
  make_train_step, jit_train_step, Networks, create_state   pure, jit-able steps
  Split, Preprocess, load_splits   data sets (built-in, metadata.csv folders, CelebA) and transforms
  load_state_dict, torchvision_to_flax   PyTorch ResNet weights -> Flax variables

The whole pipeline is `dett_jax.experiment.train_and_evaluate(config, workdir)`.
"""

__version__ = "0.1.0"

from dett_jax.data import Preprocess, Split, load_splits
from dett_jax.data.pipeline import example_weights, train_epoch, upsampled_indices
from dett_jax.dfr import dense_params, fit_dfr
from dett_jax.metrics import group_accuracy_metrics, group_sums
from dett_jax.models.projector import Projector, align_spatial
from dett_jax.models.resnet import create_resnet
from dett_jax.objectives import feature_loss, kd_loss
from dett_jax.training.steps import Networks, create_state, jit_train_step, make_train_step
from dett_jax.import_torch import load_state_dict, torchvision_to_flax
from dett_jax.transplant import read_head, transplant_head

__all__ = [
    "Networks", "Preprocess", "Projector", "Split", "align_spatial", "create_resnet", "create_state", "dense_params",
    "example_weights", "feature_loss", "fit_dfr", "group_accuracy_metrics", "group_sums",
    "jit_train_step", "kd_loss", "load_splits", "load_state_dict", "make_train_step",
    "read_head", "torchvision_to_flax", "train_epoch", "transplant_head", "upsampled_indices",
]
