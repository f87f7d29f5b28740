"""Transfer to detection: the detectron2 converter and route, and the torchvision route."""
