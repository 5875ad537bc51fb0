"""The published numbers the report compares with, each with its source.

Only numbers the source documents (``../shared/seeds/``) or the cited papers print are
here; a cell a paper does not publish is ``None`` and the report says so. Accuracies
and rates are fractions in [0, 1] (the papers print percentages).
"""

from __future__ import annotations

FNC_CIFAR10 = {
    "source": "seed 000, section 'Others': a third-party re-run of the FNC authors' code on CIFAR-10 "
              "(their CIFAR-10 numbers are not printed in the seed documents)",
    "clean_accuracy": 0.7887,
    "advp": 0.6998,
    "lavan": 0.7082,
    "setting": "ResNet-110 (the authors' CIFAR-10 model), 30 patch epochs optimised on the test set",
}

FNC_IMAGENET = {
    "source": "Yu et al., ICCV 2021, Table 2 (ImageNet: ResNet-50, Inception-V3, MobileNet-V2); its numbers are "
              "not printed in the seed documents, so none is filled in here",
    "clean_accuracy": None,
    "advp": None,
    "lavan": None,
    "setting": "the authors' patch size, target and schedule on ImageNet are not in the seeds either",
}

IFNR_RESNET50 = {
    "source": "Yu et al., ICCV 2021, Section 3, via seed 000: mean IFNR per stage of ResNet-50 on ImageNet",
    "stages": ["conv2_3", "conv3_4", "conv4_6", "conv5_3"],
    "values": [1.05, 1.80, 2.98, 3.39],
    "blocks": [3, 7, 13, 16],  # the same stages as bottleneck blocks of torchvision's resnet50 (3+4+6+3)
}

MADRY_CIFAR10 = {
    "source": "Madry et al., ICLR 2018, Table 2 (CIFAR-10, wide ResNet, PGD-7 training at eps 8/255)",
    "clean_accuracy": 0.873,
    "pgd20": 0.458,
    "setting": "a wide ResNet (MadryLab cifar10_challenge), trained far longer than a CPU profile",
}

MASK_FGSM = {
    "source": "Yu 2022, seed 002: DenseNet-161 on ImageNet, 10,000 test images",
    "l0": {"fgsm": 1.0, "jsma": 0.0452, "deepfool": 0.7437, "mask_fgsm": 0.03821},
    "ssim": {"fgsm": 0.978, "jsma": 0.991, "deepfool": 0.990, "mask_fgsm": 0.997},
}

BLURNET = {
    "source": "Raju and Lipasti 2019, slides (seed 001): 4-layer CNN on LISA (top 18 classes), RP2 on 40 stop signs",
    # our defended-model name (params/blurnet.yaml) -> the slides' row; None: not printed
    "table1": {  # black box: stickers made on the baseline; (row, accuracy, attack success rate)
        "none": ("Baseline", 1.0, 0.90),
        "input_blur3": ("Input filter 3x3", 1.0, 0.875),
        "input_blur5": ("Input filter 5x5", 1.0, 0.675),
        "blurnet3": ("3x3 filter on L1 feature maps", 1.0, 0.65),
        "blurnet5": ("5x5 filter on L1 feature maps", 0.875, 0.175),
    },
    # white box: (row, legitimate accuracy, average success rate, worst success rate, L2 distortion);
    # the conv rows are learned depthwise kernels with the L-inf penalty of weight alpha
    "table2": {
        "none": ("Baseline (alpha 0)", 0.91, 0.4918, 0.90, 0.207),
        "blurnet_learned3": ("3x3 conv, alpha 1e-5", 0.863, 0.30, 0.55, 0.201),
        "blurnet_learned5": ("5x5 conv, alpha 0.1", 0.863, 0.2411, 0.475, 0.189),
        "blurnet_learned7": ("7x7 conv, alpha 0.1", 0.87, 0.1161, 0.30, 0.203),
        "blurnet_tv4": ("TV, alpha 1e-4", 0.856, 0.0792, 0.175, 0.224),
        "blurnet_tv5": ("TV, alpha 1e-5", 0.823, 0.0847, 0.30, 0.199),
    },
}
