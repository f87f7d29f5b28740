"""Transfer to detection: checkpoint conversion for detectron2 and torchvision."""
