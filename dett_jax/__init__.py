"""dett-jax: debiased knowledge distillation (DeTT) in JAX/Flax.

The public API is exactly the names in `dett_jax.__all__`, importable from here; they
are stable across minor versions and each has a docstring with shapes and an example.
Everything else (the submodules behind these names, the stages of the bundled pipeline,
any name not listed below) is private by convention and may change without notice.

  dett_loss, make_dett_step, make_dett_predict   DeTT as a loss `(params, collections,
                                   batch, frozen, rng) -> (loss, aux)` for any training
                                   loop, a guarded step over it, the student's prediction
  TrainState, make_update          the one train state, and the one guarded update of any loss
  rng                              named randomness: seeds from the run seed and a name
  methods, Method, Models          the method registry (`methods.register`, `methods.get`):
                                   every method (dett, kd, gdro, ... or your own) is a
                                   `Method` whose `.loss` has dett_loss's signature
  apply_projector, matched_feature_loss, transplanted_logits   DeTT's building blocks
  feature_loss, kd_loss            the DeTT weighted feature MSE and Hinton KD
  read_head, transplant_head, dense_apply   the teacher's Dense head, copied into a student
  freeze                           an optax optimizer that leaves parameter subtrees frozen
  Projector, NNXProjector, align_spatial   student -> teacher feature maps (Linen, NNX)
  create_resnet, Backbone, Backend the ResNet backbones, the backbone protocol, the
                                   models' compute policy
  TextModelConfig, create_text_model   BERT and DistilBERT classifiers (the same protocol)
  read_hf_config, load_hf_variables, save_hf_checkpoint   Hugging Face checkpoint folders
                                   (config.json, model.safetensors) <-> Flax variables
  fit_dfr, dense_params            DFR last-layer retraining -> an nn.Dense subtree
  find_error_set, example_weights, upsampled_indices, upsample, train_epoch, epoch_batches,
  eval_batches                     the error set, its reweighting, and batches (grain)
  group_sums, group_counts, GroupAccumulator, group_accuracy_metrics   group metrics
  evaluate_groups, split_outputs   a model's group metrics or outputs over a whole split
  Split, Preprocess, load_splits   data sets (built-in, metadata.csv folders, CelebA, text) and transforms
  Texts, Tokenize                  text examples and their tokenisation (Hugging Face tokenizers)
  save_variables, load_variables   pytrees of arrays to and from Orbax checkpoints
  load_state_dict, torchvision_to_flax   PyTorch ResNet weights -> Flax variables
  make_train_step, make_eval_step, jit_train_step   the bundled trainer's steps of a method
  DeTTState                        deprecated alias of TrainState (removed in 0.3)

The whole bundled pipeline is `python train.py --config=configs/synthetic.py
--workdir=DIR`; `examples/` shows DeTT in hand-written Linen and NNX training loops.
"""

__version__ = "0.2.0"

from dett_jax import methods, rng
from dett_jax.checkpoints import load_variables, save_variables
from dett_jax.data import Preprocess, Split, load_splits
from dett_jax.data.tokenize import Texts, Tokenize
from dett_jax.data.pipeline import (epoch_batches, eval_batches, example_weights, find_error_set,
                                    train_epoch, upsample, upsampled_indices)
from dett_jax.dett import DeTTState, dett_loss, make_dett_predict, make_dett_step
from dett_jax.dfr import dense_params, fit_dfr
from dett_jax.import_torch import load_state_dict, torchvision_to_flax
from dett_jax.methods import (Method, Models, apply_projector, matched_feature_loss,
                              transplanted_logits)
from dett_jax.evaluation import evaluate_groups, split_outputs
from dett_jax.hf_checkpoint import load_hf_variables, read_hf_config, save_hf_checkpoint
from dett_jax.metrics import GroupAccumulator, group_accuracy_metrics, group_counts, group_sums
from dett_jax.models.backbone import Backbone
from dett_jax.models.backend import Backend
from dett_jax.models.bert import TextModelConfig, create_text_model
from dett_jax.models.nnx_projector import NNXProjector
from dett_jax.models.projector import Projector, align_spatial
from dett_jax.models.resnet import create_resnet
from dett_jax.objectives import feature_loss, kd_loss
from dett_jax.optimizers import freeze
from dett_jax.training.state import TrainState
from dett_jax.training.steps import jit_train_step, make_eval_step, make_train_step
from dett_jax.training.update import make_update
from dett_jax.transplant import dense_apply, read_head, transplant_head

__all__ = [
    # DeTT in any training loop.
    "dett_loss", "make_dett_step", "make_dett_predict", "TrainState", "make_update", "rng",
    # Methods (plug-ins) and their building blocks.
    "methods", "Method", "Models", "apply_projector", "matched_feature_loss",
    "transplanted_logits", "feature_loss", "kd_loss", "read_head", "transplant_head",
    "dense_apply", "freeze", "Projector", "NNXProjector", "align_spatial", "create_resnet", "Backbone",
    "Backend", "TextModelConfig", "create_text_model", "read_hf_config", "load_hf_variables",
    "save_hf_checkpoint", "fit_dfr", "dense_params",
    # The error set, its reweighting, batches.
    "find_error_set", "example_weights", "upsampled_indices", "upsample", "train_epoch",
    "epoch_batches", "eval_batches",
    # Group metrics.
    "group_sums", "group_counts", "GroupAccumulator", "group_accuracy_metrics",
    "evaluate_groups", "split_outputs",
    # Data and checkpoints.
    "Split", "Preprocess", "load_splits", "Texts", "Tokenize", "save_variables", "load_variables",
    "load_state_dict", "torchvision_to_flax",
    # The bundled trainer's steps.
    "make_train_step", "make_eval_step", "jit_train_step",
    # Deprecated.
    "DeTTState",
]
