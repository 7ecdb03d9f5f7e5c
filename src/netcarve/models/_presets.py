"""Preprocessing presets shared by the zoo: ``x = (raw * scale - mean) / std`` channel-wise."""

# CIFAR-10 train-set statistics
CIFAR_PREPROCESS = {"scale": 1 / 255, "mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}
# ImageNet statistics, as the akamaster CIFAR ResNets were trained with
IMAGENET_PREPROCESS = {"scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
