"""Every config key this package recognises, with its default and the values it can honour.

This is the one declaration of the config layout: `dfine.config.load_config` rejects any key that is not
declared here, and the code reads values through `config_value` / `config_section`, whose defaults come
from here. Sections that build a class (HGNetv2, HybridEncoder, DFINETransformer, DFINEPostProcessor,
DFINECriterion and its matcher) list the constructor's arguments with the constructor's defaults
(tests/engine/test_config.py checks that they agree; this layer may not import the classes).

Keys of the published D-FINE release that we accept but do not implement (`type:` fields naming the one
class we have, `return_masks`, `boxes_weight_format`, ...) are declared with `choices`: the one value we
honour; any other value is an error naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

from dfine.ops import BACKENDS

__all__ = ["Key", "Section", "ListOf", "SCHEMA", "INHERITED", "TRANSFORM_OPS", "PUBLISHED_POLICY_OPS"]


@dataclass(frozen=True)
class Key:
    """One leaf key.

    types: accepted Python types of the value (int is accepted where float is; bool is never an int).
    nullable: None (YAML ``~``) is accepted.
    choices: the only values we can honour (e.g. the one class a ``type:`` field may name).
    items: type of the elements of a list value; item_choices: the values they may take; length: required
        list length.
    keys: for a dict value (e.g. a weight_dict), the names its entries may have.
    inherit: when the section does not set the key, the value of this top-level key is used
        (e.g. ``DFINETransformer.num_classes`` <- ``num_classes``), as the release shares them.
    """

    default: Any = None
    types: Tuple[type, ...] = ()
    nullable: bool = False
    choices: Optional[tuple] = None
    items: Optional[Tuple[type, ...]] = None
    length: Optional[int] = None
    keys: Optional[Tuple[str, ...]] = None
    item_choices: Optional[tuple] = None
    inherit: Optional[str] = None
    doc: str = ""


@dataclass(frozen=True)
class Section:
    """A mapping with declared keys (values: Key, Section or ListOf). ``None`` stands for the empty section."""

    keys: dict
    doc: str = ""


@dataclass(frozen=True)
class ListOf:
    """A list of sections (e.g. the optimizer's parameter groups)."""

    item: Section
    default: Any = field(default_factory=list)
    nullable: bool = True


_INT = (int,)
_FLOAT = (float,)  # ints accepted too
_NUM = (int, float)
_BOOL = (bool,)
_STR = (str,)
_LIST = (list,)
_DICT = (dict,)


def _fixed(value, doc=""):
    """A key of the published release that we accept with its one supported value."""
    return Key(value, (type(value),) if value is not None else (), nullable=value is None, choices=(value,), doc=doc)


def _int_list(default, nullable=False, length=None, doc=""):
    return Key(list(default) if default is not None else None, _LIST, nullable=nullable, items=_INT, length=length,
               doc=doc)


# ------------------------------------------------------------------------------------------------
# sections that build classes (constructor arguments, constructor defaults)

HGNETV2 = Section({
    "name": Key("B0", _STR, choices=("B0", "B1", "B2", "B3", "B4", "B5", "B6")),
    "use_lab": Key(False, _BOOL),
    "return_idx": _int_list((1, 2, 3)),
    "freeze_stem_only": Key(True, _BOOL),
    "freeze_at": Key(-1, _INT),
    "freeze_norm": Key(False, _BOOL),
    "pretrained": Key(False, _BOOL, doc="load the ImageNet stage-1 weights from local_model_dir"),
    "local_model_dir": Key("weight/hgnetv2/", _STR),
})

HYBRID_ENCODER = Section({
    "in_channels": _int_list((512, 1024, 2048)),
    "feat_strides": _int_list((8, 16, 32)),
    "hidden_dim": Key(256, _INT),
    "nhead": Key(8, _INT),
    "dim_feedforward": Key(1024, _INT),
    "dropout": Key(0.0, _FLOAT),
    "enc_act": Key("gelu", _STR, choices=("gelu", "relu")),
    "use_encoder_idx": _int_list((2,)),
    "num_encoder_layers": Key(1, _INT),
    "pe_temperature": Key(10000, _NUM),
    "expansion": Key(1.0, _FLOAT),
    "depth_mult": Key(1.0, _FLOAT),
    "act": Key("silu", _STR, choices=("silu",), doc="activation of the CCFF blocks (SiLU, as published)"),
    "eval_spatial_size": Key(None, _LIST, nullable=True, items=_INT, length=2, inherit="eval_spatial_size"),
})

DFINE_TRANSFORMER = Section({
    "num_classes": Key(80, _INT, inherit="num_classes"),
    "hidden_dim": Key(256, _INT),
    "num_queries": Key(300, _INT),
    "feat_channels": _int_list((512, 1024, 2048)),
    "feat_strides": _int_list((8, 16, 32)),
    "num_levels": Key(3, _INT),
    "num_points": _int_list((3, 6, 3)),
    "nhead": Key(8, _INT),
    "num_layers": Key(6, _INT),
    "dim_feedforward": Key(1024, _INT),
    "dropout": Key(0.0, _FLOAT),
    "activation": Key("relu", _STR, choices=("relu",), doc="decoder FFN activation (ReLU, as published)"),
    "num_denoising": Key(100, _INT),
    "label_noise_ratio": Key(0.5, _FLOAT),
    "box_noise_scale": Key(1.0, _FLOAT),
    "learn_query_content": Key(False, _BOOL, choices=(False,)),
    "eval_spatial_size": Key(None, _LIST, nullable=True, items=_INT, length=2, inherit="eval_spatial_size"),
    "eval_idx": Key(-1, _INT),
    "eps": Key(1e-2, _FLOAT),
    "aux_loss": Key(True, _BOOL),
    "cross_attn_method": Key("default", _STR, choices=("default", "discrete"),
                             doc="'discrete': nearest-cell sampling (a gather, no GridSample), offsets frozen"),
    "query_select_method": Key("default", _STR, choices=("default",)),
    "reg_max": Key(32, _INT),
    "reg_scale": Key(4.0, _NUM, doc="an int gives an int64 reg_scale tensor, as the release"),
    "up": Key(0.5, _FLOAT),
    "layer_scale": Key(1, _NUM, choices=(1,)),
    "mlp_act": Key("relu", _STR, choices=("relu",)),
})

DFINE_POSTPROCESSOR = Section({
    "num_classes": Key(80, _INT, inherit="num_classes"),
    "use_focal_loss": Key(True, _BOOL, choices=(True,), inherit="use_focal_loss"),
    "num_top_queries": Key(300, _INT),
    "remap_mscoco_category": Key(False, _BOOL, inherit="remap_mscoco_category"),
})

LOSS_WEIGHT_KEYS = ("loss_vfl", "loss_bbox", "loss_giou", "loss_fgl", "loss_ddf")
COST_WEIGHT_KEYS = ("cost_class", "cost_bbox", "cost_giou")

HUNGARIAN_MATCHER = Section({
    "type": _fixed("HungarianMatcher"),
    "weight_dict": Key(None, _DICT, nullable=True, keys=COST_WEIGHT_KEYS),
    "alpha": Key(0.25, _FLOAT),
    "gamma": Key(2.0, _FLOAT),
    "use_focal_loss": Key(True, _BOOL, choices=(True,), inherit="use_focal_loss"),
})

DFINE_CRITERION = Section({
    "type": _fixed("DFINECriterion"),
    "weight_dict": Key(None, _DICT, nullable=True, keys=LOSS_WEIGHT_KEYS),
    "losses": Key(["vfl", "boxes", "local"], _LIST, items=_STR, item_choices=("vfl", "boxes", "local")),
    "alpha": Key(0.75, _FLOAT),
    "gamma": Key(2.0, _FLOAT),
    "num_classes": Key(80, _INT, inherit="num_classes"),
    "reg_max": Key(32, _INT),
    "boxes_weight_format": _fixed(None),
    "share_matched_indices": _fixed(False),
    "matcher": HUNGARIAN_MATCHER,
})

# ------------------------------------------------------------------------------------------------
# data

_RANGE = dict(types=_LIST, items=_FLOAT, length=2)
_FILL = (int, float, list, dict)
# The ops a `transforms.ops` list may hold ({type: NAME, <parameter>: value}), each with its parameters: the
# keyword arguments of its constructor in dfine.data.transforms.OPS (torchvision v2's where the op is v2's),
# with their defaults; a Key without default and not nullable is required. tests/data/test_transform_ops.py
# checks that these agree with the constructors.
TRANSFORM_OPS = {
    "RandomPhotometricDistort": Section({
        "brightness": Key([0.875, 1.125], **_RANGE), "contrast": Key([0.5, 1.5], **_RANGE),
        "saturation": Key([0.5, 1.5], **_RANGE), "hue": Key([-0.05, 0.05], **_RANGE), "p": Key(0.5, _FLOAT),
    }, doc="v2.RandomPhotometricDistort"),
    "RandomZoomOut": Section({
        "fill": Key(0, _FILL, nullable=True), "side_range": Key([1.0, 4.0], **_RANGE), "p": Key(0.5, _FLOAT),
    }, doc="v2.RandomZoomOut"),
    "RandomIoUCrop": Section({
        "min_scale": Key(0.3, _FLOAT), "max_scale": Key(1.0, _FLOAT), "min_aspect_ratio": Key(0.5, _FLOAT),
        "max_aspect_ratio": Key(2.0, _FLOAT), "sampler_options": Key(None, _LIST, nullable=True, items=_FLOAT),
        "trials": Key(40, _INT), "p": Key(1.0, _FLOAT, doc="applied with probability p (published)"),
    }, doc="v2.RandomIoUCrop with p; skipped on images without boxes"),
    "SanitizeBoundingBoxes": Section({
        "min_size": Key(1.0, _FLOAT), "min_area": Key(1.0, _FLOAT),
    }, doc="v2.SanitizeBoundingBoxes; labels, area and iscrowd are dropped with their boxes"),
    "RandomHorizontalFlip": Section({"p": Key(0.5, _FLOAT)}, doc="v2.RandomHorizontalFlip"),
    "Resize": Section({
        "size": Key(None, _INT + _LIST, items=_INT, doc="[H, W]; an integer means a square"),
        "interpolation": Key("bilinear", _STR, choices=("nearest", "nearest-exact", "bilinear", "bicubic")),
        "max_size": Key(None, _INT, nullable=True), "antialias": Key(True, _BOOL),
    }, doc="v2.Resize; its size is the image size"),
    "RandomCrop": Section({
        "size": Key(None, _INT + _LIST, items=_INT), "padding": Key(None, _INT + _LIST, nullable=True, items=_INT),
        "pad_if_needed": Key(False, _BOOL), "fill": Key(0, _FILL, nullable=True),
        "padding_mode": Key("constant", _STR, choices=("constant", "edge", "reflect", "symmetric")),
    }, doc="v2.RandomCrop"),
    "Normalize": Section({
        "mean": Key(None, _LIST, items=_FLOAT), "std": Key(None, _LIST, items=_FLOAT), "inplace": Key(False, _BOOL),
    }, doc="v2.Normalize (after ConvertPILImage; the published models take [0, 1] input without it)"),
    "EmptyTransform": Section({}, doc="no-op"),
    "ConvertPILImage": Section({
        "dtype": Key("float32", _STR, choices=("float32",)), "scale": Key(True, _BOOL, doc="divide by 255"),
    }, doc="to a float image; implied at the end when absent"),
    "ConvertBoxes": Section({
        "fmt": Key("cxcywh", _STR, choices=("cxcywh",)), "normalize": Key(True, _BOOL, choices=(True,)),
    }, doc="boxes to normalised cxcywh (what the loss reads); the last op; implied at the end when absent"),
    "Mosaic": Section({
        "output_size": Key(320, _INT, doc="tile side; the canvas is twice that"),
        "rotation_range": Key(0.0, _FLOAT, doc="degrees, +-"), "translation_range": Key([0.1, 0.1], **_RANGE),
        "scaling_range": Key([0.5, 1.5], **_RANGE), "probability": Key(1.0, _FLOAT), "fill_value": Key(0, _INT),
    }, doc="4 images on one canvas, then a random affine (ours, after DEIM)"),
    "MixUp": Section({
        "probability": Key(0.5, _FLOAT), "ratio_range": Key([0.45, 0.55], **_RANGE, doc="weight of this image"),
    }, doc="blend with another image, union of the boxes (ours, after DEIM)"),
}
# ops switched off from `policy.epoch` on, as published
PUBLISHED_POLICY_OPS = ("RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCrop")



def _dataloader(train: bool) -> Section:
    transforms = {
        "type": _fixed("Compose"),
        "ops": Key(None, _LIST, nullable=True,
                   doc="the pipeline, [{type: NAME, <parameter>: value}] (TRANSFORM_OPS); ~: the published one"),
    }
    collate = {"type": _fixed("BatchImageCollateFunction")}
    if train:
        transforms["policy"] = Section({
            "name": _fixed("stop_epoch"),
            "epoch": Key(None, _INT, nullable=True, doc="from this epoch on the policy ops are skipped"),
            "ops": Key(list(PUBLISHED_POLICY_OPS), _LIST, items=_STR, item_choices=tuple(TRANSFORM_OPS),
                       doc="types of the ops skipped from `epoch` on"),
        })
        collate.update({
            "base_size": Key(None, _INT + _LIST, nullable=True, items=_INT,
                             doc="multi-scale base size (default: the Resize size)"),
            "base_size_repeat": Key(None, _INT, nullable=True, doc="None: no multi-scale"),
            "stop_epoch": Key(None, _INT, nullable=True, doc="multi-scale stop and start of training stage 2"),
            "ema_restart_decay": Key(None, _FLOAT, nullable=True, doc="EMA decay of stage 2 (default: ema.decay)"),
        })
    return Section({
        "type": _fixed("DataLoader"),
        "dataset": Section({
            "type": _fixed("CocoDetection"),
            "img_folder": Key(None, _STR, nullable=True),
            "ann_file": Key(None, _STR, nullable=True),
            "return_masks": _fixed(False),
            "category_map": Key(None, _STR, nullable=True, choices=(None, "contiguous", "mscoco", "identity"),
                                doc="ours: how category ids map to labels (default from remap_mscoco_category)"),
            "transforms": Section(transforms),
        }),
        "shuffle": Key(train, _BOOL),
        "num_workers": Key(0, _INT),
        "drop_last": Key(train, _BOOL),
        "collate_fn": Section(collate),
        "total_batch_size": Key(None, _INT, nullable=True,
                                doc="images per optimizer step over all processes and accumulate_steps (default 8 "
                                    "per process and batch)"),
        "batch_size": Key(None, _INT, nullable=True,
                          doc="ours: per process and batch (before accumulation); wins over total_batch_size"),
        "augment": Key(train, _BOOL, doc="ours: apply the train augmentations"),
        "pin_memory": Key(False, _BOOL),
    })


# ------------------------------------------------------------------------------------------------
# the whole config

SCHEMA = Section({
    # published top level
    "task": _fixed("detection"),
    "model": _fixed("DFINE"),
    "criterion": _fixed("DFINECriterion"),
    "postprocessor": _fixed("DFINEPostProcessor"),
    "use_focal_loss": Key(True, _BOOL, choices=(True,)),
    "eval_spatial_size": Key(None, _LIST, nullable=True, items=_INT, length=2, doc="[H, W] of the model input"),
    "num_classes": Key(80, _INT),
    "remap_mscoco_category": Key(False, _BOOL),
    "evaluator": Section({
        "type": _fixed("CocoEvaluator"),
        "iou_types": Key(["bbox"], _LIST, items=_STR, choices=(["bbox"],)),
        # ours: the per-class analysis written at each evaluation (dfine.data.coco_analysis)
        "confusion_score_threshold": Key(0.5, _FLOAT, doc="score a detection needs to enter the confusion matrix"),
        "confusion_iou_threshold": Key(0.5, _FLOAT, doc="IoU at which a detection matches a box in the confusion matrix"),
        "plots": Key("last", _STR, choices=("last", "every", "none"),
                     doc="precision-recall and confusion PNGs: at the last evaluation of training (and --test-only), "
                         "at every evaluation, or never"),
    }),
    "DFINE": Section({
        "backbone": _fixed("HGNetv2"),
        "encoder": _fixed("HybridEncoder"),
        "decoder": _fixed("DFINETransformer"),
    }),
    "HGNetv2": HGNETV2,
    "HybridEncoder": HYBRID_ENCODER,
    "DFINETransformer": DFINE_TRANSFORMER,
    "DFINEPostProcessor": DFINE_POSTPROCESSOR,
    "DFINECriterion": DFINE_CRITERION,
    "train_dataloader": _dataloader(True),
    "val_dataloader": _dataloader(False),
    # runtime
    "print_freq": Key(100, _INT, nullable=True),
    "output_dir": Key(None, _STR, nullable=True, doc="default ./output"),
    "checkpoint_freq": Key(12, _INT, nullable=True, doc="0/None: no periodic checkpoints"),
    "sync_bn": Key(False, _BOOL),
    "find_unused_parameters": Key(False, _BOOL),
    "use_amp": Key(False, _BOOL),
    "amp_dtype": Key(None, _STR, nullable=True, choices=(None, "bfloat16", "float16"),
                     doc="autocast dtype of use_amp; null: bfloat16 where the device has it natively (CPU, GPUs "
                         "of compute capability 8.0+), else float16"),
    "scaler": Section({
        "type": _fixed("GradScaler"),
        "enabled": Key(True, _BOOL, doc="loss scaling of float16 AMP (bfloat16 needs none)"),
    }),
    "use_ema": Key(False, _BOOL),
    "ema": Section({
        "type": _fixed("ModelEMA"),
        "decay": Key(0.9999, _FLOAT),
        "warmups": Key(1000, _INT),
        "start": Key(0, _INT),
    }),
    "ops_backend": Key("auto", _STR, choices=tuple(BACKENDS)),
    "epochs": Key(1, _INT),
    "clip_max_norm": Key(0.0, _FLOAT, nullable=True),
    "optimizer": Section({
        "type": _fixed("AdamW"),
        "params": ListOf(Section({
            "params": Key(None, _STR, doc="regex of parameter names (re.search)"),
            "lr": Key(None, _FLOAT, nullable=True),
            "weight_decay": Key(None, _FLOAT, nullable=True),
            "betas": Key(None, _LIST, nullable=True, items=_FLOAT, length=2),
            "eps": Key(None, _FLOAT, nullable=True),
        })),
        "lr": Key(1e-4, _FLOAT),
        "betas": Key([0.9, 0.999], _LIST, items=_FLOAT, length=2),
        "weight_decay": Key(1e-4, _FLOAT),
    }),
    "lr_scheduler": Section({
        "type": _fixed("MultiStepLR"),
        "milestones": Key([], _LIST, items=_INT, doc="epochs; none: constant LR"),
        "gamma": Key(0.1, _FLOAT),
    }),
    "lr_warmup_scheduler": Section({
        "type": _fixed("LinearWarmup"),
        "warmup_duration": Key(0, _INT, doc="optimizer steps"),
    }),
    # ours
    "eval_freq": Key(1, _INT, nullable=True, doc="epochs between evaluations"),
    "max_nonfinite_steps": Key(20, _INT, doc="consecutive non-finite losses before training stops"),
    "accumulate_steps": Key(1, _INT, doc="batches whose gradients make one optimizer step (gradient accumulation); "
                                         "total_batch_size counts all of them"),
    "batchnorm_eval": Key(False, _BOOL, doc="BatchNorm in eval mode while training"),
    "seed": Key(0, _INT),
    "device": Key(None, _STR, nullable=True, doc="default: cuda if available, else cpu"),
    "channels_last": Key(None, _BOOL + _STR, nullable=True, choices=(None, True, False, "auto"),
                         doc="default auto: on for the CPU"),
    "cpu_retain_freed_memory": Key(True, _BOOL),
})

# top-level keys that class sections take when they do not set them
INHERITED = ("num_classes", "eval_spatial_size", "use_focal_loss", "remap_mscoco_category")
