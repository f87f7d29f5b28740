"""Box AP with pycocotools, each test image detected once whatever the launch mode.

Every process detects its contiguous share of the test images (moco.distributed's
shard_range: each image in exactly one share), one image at a time so that no image's
detections depend on the others in its batch; process 0 gathers the shares and scores
them with pycocotools' COCOeval, as torchvision's detection references do.
"""

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from detection.datasets import DetectionSet, collate
from moco.distributed import (
    DistEnv,
    all_gather_rows,
    broadcast_object,
    get_world_size,
    ignore_stop_signals,
    shard_range,
)
from moco.utils import UsageError

# COCOeval.stats[:6]: AP over IoU 0.5:0.95, AP at IoU 0.5 and 0.75, AP of small,
# medium and large objects (in %)
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def require_pycocotools() -> None:
    """A one-line UsageError when the evaluator is not installed."""
    try:
        import pycocotools.cocoeval  # noqa: F401
    except ImportError:
        raise UsageError(
            "this route computes AP with pycocotools, which is not installed: "
            "pip install -r detection/requirements.txt"
        ) from None


@torch.no_grad()
def detect(model, dataset: DetectionSet, indices: range, device, workers: int):
    """
    Rows (image id, x, y, w, h, score, category id) of the detections of the images
    `indices` of `dataset`, in float64 on `device`.
    """
    loader = DataLoader(
        Subset(dataset, indices),
        batch_size=1,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        worker_init_fn=ignore_stop_signals,
    )
    rows = [torch.zeros(0, 7, dtype=torch.float64)]
    for images, targets in loader:
        out = model([images[0].to(device, non_blocking=True)])[0]
        boxes = out["boxes"].double().cpu()
        boxes[:, 2:] -= boxes[:, :2]  # (x0, y0, x1, y1) -> (x, y, w, h)
        n = boxes.shape[0]
        categories = [dataset.category_id(c) for c in out["labels"].tolist()]
        rows.append(
            torch.cat(
                [
                    torch.full(
                        (n, 1), float(targets[0]["image_id"]), dtype=torch.float64
                    ),
                    boxes,
                    out["scores"].double().cpu().view(n, 1),
                    torch.tensor(categories, dtype=torch.float64).view(n, 1),
                ],
                dim=1,
            )
        )
    return torch.cat(rows).to(device)


def coco_ap(ground_truth: dict, detections: np.ndarray, image_ids: list) -> dict:
    """COCOeval's box AP (%) of `detections` (rows as detect's) on `image_ids`."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO()
    gt.dataset = ground_truth
    gt.createIndex()
    if len(detections) == 0:  # loadRes refuses an empty list
        return {name: 0.0 for name in METRICS[:3]}
    evaluator = COCOeval(gt, gt.loadRes(detections), "bbox")
    evaluator.params.imgIds = image_ids
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    # -1: no ground truth of that size
    return {n: 100 * float(v) for n, v in zip(METRICS, evaluator.stats[:6]) if v >= 0}


def evaluate(model, dataset: DetectionSet, env: DistEnv, workers: int) -> dict:
    """
    Box AP of `model` (not wrapped in DistributedDataParallel) on every image of
    `dataset`, the same on every process: AP, AP50, AP75 (and APs, APm, APl where the
    ground truth has objects of that size), and the number of images.
    """
    if get_world_size() > 1:
        # BatchNorm statistics not synchronised (the CPU) differ between processes:
        # every process detects with process 0's model
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
    model.eval()
    share = shard_range(len(dataset), env.rank, env.world_size)
    rows = all_gather_rows(detect(model, dataset, share, env.device, workers))
    done = all_gather_rows(
        torch.tensor(list(share), dtype=torch.int64, device=env.device)
    )
    assert sorted(done.tolist()) == list(range(len(dataset))), "an image twice or never"
    stats = None
    if env.is_main:
        ids = [dataset.image_id(i) for i in range(len(dataset))]
        stats = coco_ap(dataset.ground_truth(), rows.cpu().numpy(), ids)
        stats["images"] = len(dataset)
    return broadcast_object(stats)
