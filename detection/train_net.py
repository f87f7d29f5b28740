#!/usr/bin/env python
"""
Fine-tune a converted MoCo backbone for detection with detectron2 (Pascal VOC, COCO):

    python train_net.py --config-file configs/pascal_voc_R_50_C4_24k_moco.yaml \
        --num-gpus 8 MODEL.WEIGHTS ./output.pkl

detectron2's command line (--num-gpus, --resume, --eval-only, KEY VALUE overrides).
The *_moco.yaml configs need MODEL.WEIGHTS, a file written by
convert-pretrain-to-detectron2.py. See detection/README.md.
"""

import os
import sys

try:
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.data import MetadataCatalog
    from detectron2.engine import (
        DefaultTrainer,
        default_argument_parser,
        default_setup,
        launch,
    )
    from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
    from detectron2.layers import get_norm
    from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads
except ModuleNotFoundError as e:
    if e.name != "detectron2":  # an installed detectron2 that is broken: show why
        raise
    sys.exit(
        "error: detectron2 is not installed; install it with "
        "pip install 'git+https://github.com/facebookresearch/detectron2.git' "
        "(see detection/README.md)"
    )


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """The C4 ROI head with an extra normalization after res5, as in the MoCo paper."""

    @classmethod
    def _build_res5_block(cls, cfg):
        res5, out_channels = super()._build_res5_block(cfg)
        res5.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
        return res5, out_channels


class Trainer(DefaultTrainer):
    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        evaluator_type = MetadataCatalog.get(dataset_name).evaluator_type
        if evaluator_type == "coco":
            return COCOEvaluator(dataset_name, output_dir=output_folder)
        if evaluator_type == "pascal_voc":
            return PascalVOCDetectionEvaluator(dataset_name)
        raise ValueError(f"no evaluator for {dataset_name!r} (type {evaluator_type!r})")


def build_cfg(args):
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    return cfg


def check_weights(cfg, args):
    """
    The *_moco.yaml configs name no weights: say so before any process starts, not
    after the model is built. A resumed run reads its last checkpoint instead.
    """
    weights = cfg.MODEL.WEIGHTS
    if "://" in weights or os.path.isfile(weights):
        return
    if args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")):
        return
    sys.exit(
        f"error: MODEL.WEIGHTS {weights!r} is not a file; convert a MoCo checkpoint "
        "with convert-pretrain-to-detectron2.py and pass MODEL.WEIGHTS output.pkl"
    )


def setup(args):
    cfg = build_cfg(args)
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)

    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return Trainer.test(cfg, model)

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    check_weights(build_cfg(args), args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
