"""VM-UNet: a U-shaped network built only from Visual State Space (VSS) blocks.

Ruan, J., Li, J., Xiang, S. (2024). "VM-UNet: Vision Mamba UNet for Medical Image
Segmentation". arXiv:2402.02491. The layer shapes, the initialisation and the default
configuration follow the authors' repository (JCruan519/VM-UNet), so that
``VMUNet()`` has the 27,427,561 parameters reported there and in AbscessHeNe's Table I
(27.43 M, 4.11 G FLOPs).

Layout: tensors between blocks are channel-last ``[B, H, W, C]`` as in the reference.

- 4x4 patch embedding (strided convolution + LayerNorm) to ``dims[0]`` channels at H/4.
- Encoder: ``len(depths)`` stages of VSS blocks; every stage but the last ends with
  patch merging (2x2 neighbourhood -> LayerNorm -> linear 4C -> 2C).
- Decoder: stages of VSS blocks mirrored; every stage but the first starts with patch
  expanding (linear C -> 2C, pixel shuffle 2x2 -> C/2, LayerNorm) of the sum of the
  previous output and the skip connection.
- Final 4x patch expanding (linear C -> 4C, pixel shuffle 4x4 -> C/4, LayerNorm) and a
  1x1 convolution to ``num_classes`` logits.

The selective scan of the SS2D module runs through :func:`models.scan.selective_scan`,
which picks the CUDA kernel of mamba-ssm, or on the CPU the Numba autograd scan (training)
or the PyTorch chunked scan. CPU inference (no autograd) takes a fused path
(:meth:`SS2D._forward_cpu_inference`): oneDNN matmuls (with the residual add as a post-op),
the depth-wise convolution with its SiLU as a oneDNN post-op, and the four-direction Numba
kernel (:func:`models.scan.four_direction_scan_numba`) that reads the feature map and the
x-projection output in place and applies the output LayerNorm and SiLU(z) gate; no
permuted, stacked or flipped copies.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import DropPath, trunc_normal_
from torch import nn

from models.scan import OutputGate, choose_backend, four_direction_scan_numba, log_backend, selective_scan

__all__ = ["SS2D", "VMUNet", "VSSBlock"]

NUM_SCAN_DIRECTIONS = 4
_ONEDNN = torch.backends.mkldnn.is_available()


def _onednn_inference(features: torch.Tensor) -> bool:
    """Whether oneDNN's fused CPU operators serve ``features``: float32 on the CPU, no autograd.

    oneDNN's matmuls run the AVX-512 kernels on AMD as on Intel CPUs (MKL's ``sgemm``
    behind ``F.linear`` does not: about half the speed on the AMD EPYC this was measured on).
    """
    return _ONEDNN and features.device.type == "cpu" and features.dtype == torch.float32 and not torch.is_grad_enabled()


def _observed(*modules: nn.Module) -> bool:
    """Whether forward hooks watch one of ``modules`` (thop's MAC counters, feature
    extractors): the fused inference code then calls them as modules, so the hooks see them."""
    return any(module._forward_hooks or module._forward_pre_hooks for module in modules)


def _matmul(features: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``features @ weight.T`` (plus ``residual``): oneDNN for CPU inference, else ``F.linear``."""
    if _onednn_inference(features):
        if residual is None:
            return torch.ops.mkldnn._linear_pointwise(features, weight, None, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(features, residual, weight, None, "add")
    out = F.linear(features, weight)
    return out if residual is None else residual + out


def _linear(features: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer(features)`` for a bias-free linear layer, through :func:`_matmul` unless observed."""
    return layer(features) if _observed(layer) else _matmul(features, layer.weight)


def _depthwise_conv_silu(conv: nn.Conv2d, features: torch.Tensor) -> torch.Tensor:
    """``SiLU(conv(x))`` of channel-last features [B, H, W, C] -> [B, H, W, C] (contiguous).

    The permuted view is a channels-last NCHW tensor, so no copy is made; for CPU
    inference oneDNN applies the SiLU as a post-op of the convolution.
    """
    images = features.permute(0, 3, 1, 2)
    if _onednn_inference(features):
        out = torch.ops.mkldnn._convolution_pointwise(
            images, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups, "swish", [], ""
        )
    else:
        out = F.silu(conv(images))
    return out.permute(0, 2, 3, 1).contiguous()


class PatchEmbed2D(nn.Module):
    """Non-overlapping ``patch_size`` x ``patch_size`` patches -> ``embed_dim`` channels, channel-last."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int = 4) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] -> [B, H/p, W/p, embed_dim]."""
        return self.norm(self.proj(images).permute(0, 2, 3, 1))


class PatchMerging2D(nn.Module):
    """Halve the resolution and double the channels: 2x2 neighbours -> LayerNorm -> Linear(4C, 2C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, H, W, C] -> [B, H/2, W/2, 2C] (odd trailing rows/columns are dropped)."""
        height, width = features.shape[1] // 2 * 2, features.shape[2] // 2 * 2
        features = features[:, :height, :width]
        # Order as in the reference: (even, even), (odd, even), (even, odd), (odd, odd).
        merged = torch.cat(
            [features[:, 0::2, 0::2], features[:, 1::2, 0::2], features[:, 0::2, 1::2], features[:, 1::2, 1::2]],
            dim=-1,
        )
        return _linear(self.norm(merged), self.reduction)


def _pixel_shuffle_last(features: torch.Tensor, scale: int) -> torch.Tensor:
    """Channel-last pixel shuffle: [B, H, W, s*s*C] -> [B, s*H, s*W, C] (channel index = (p1, p2, c))."""
    batch, height, width, channels = features.shape
    out_channels = channels // (scale * scale)
    features = features.view(batch, height, width, scale, scale, out_channels)
    return features.permute(0, 1, 3, 2, 4, 5).reshape(batch, height * scale, width * scale, out_channels)


class PatchExpand2D(nn.Module):
    """Upsample by ``scale`` from ``in_dim`` channels: Linear(in_dim, scale*in_dim) -> shuffle -> LayerNorm.

    The linear layer makes ``scale * in_dim`` channels, shuffled into ``scale x scale``
    pixels of ``in_dim // scale`` channels: ``in_dim // 2`` for the decoder's 2x expanding,
    ``in_dim // 4`` for the final 4x expanding (as in the reference).
    """

    def __init__(self, in_dim: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.expand = nn.Linear(in_dim, scale * in_dim, bias=False)
        self.norm = nn.LayerNorm(in_dim // scale)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, H, W, C] -> [B, s*H, s*W, C/s]."""
        return self.norm(_pixel_shuffle_last(_linear(features, self.expand), self.scale))


class SS2D(nn.Module):
    """2D selective scan module (VMamba's SS2D as used in VM-UNet).

    in-projection to ``2 * d_inner`` (branch x and gate z) -> 3x3 depth-wise convolution
    -> SiLU -> selective scan along four directions (row-major, column-major and both
    reversed) with input-dependent dt, B, C -> sum of the four -> LayerNorm -> gate with
    SiLU(z) -> out-projection.

    Args:
        d_model: Channels in and out.
        d_state: State size N of the SSM per channel.
        d_conv: Kernel size of the depth-wise convolution.
        expand: ``d_inner = expand * d_model``.
        dt_rank: Rank of the dt projection; ``None`` means ``ceil(d_model / 16)``.
        dt_min: Smallest initial step size.
        dt_max: Largest initial step size.
        dt_init_floor: Floor of the initial step size.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 3,
        expand: int = 2,
        dt_rank: int | None = None,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank is None else dt_rank
        directions = NUM_SCAN_DIRECTIONS

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv2d = nn.Conv2d(
            self.d_inner, self.d_inner, kernel_size=d_conv, padding=(d_conv - 1) // 2, groups=self.d_inner, bias=True
        )
        self.act = nn.SiLU()

        # Per direction: x -> (dt_low_rank, B, C), and dt_low_rank -> dt per channel.
        # nn.Linear's default init, as in the reference (raw parameters escape VMUNet's trunc-normal init)
        x_proj_bound = 1.0 / math.sqrt(self.d_inner)
        self.x_proj_weight = nn.Parameter(
            torch.empty(directions, self.dt_rank + 2 * d_state, self.d_inner).uniform_(-x_proj_bound, x_proj_bound)
        )
        dt_std = self.dt_rank**-0.5
        self.dt_projs_weight = nn.Parameter(
            torch.empty(directions, self.d_inner, self.dt_rank).uniform_(-dt_std, dt_std)
        )
        # dt bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max] (Mamba's init).
        initial_dt = torch.exp(
            torch.rand(directions, self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        self.dt_projs_bias = nn.Parameter(initial_dt + torch.log(-torch.expm1(-initial_dt)))
        # S4D-real init: A[d, n] = -(n + 1), stored as log(-A); D = 1.
        a_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(directions * self.d_inner, 1)
        self.A_logs = nn.Parameter(a_log)
        self.Ds = nn.Parameter(torch.ones(directions * self.d_inner))
        self.A_logs._no_weight_decay = True  # type: ignore[attr-defined]
        self.Ds._no_weight_decay = True  # type: ignore[attr-defined]

        self.out_norm = nn.LayerNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def _scan_four_directions(self, features: torch.Tensor) -> torch.Tensor:
        """Selective scan of [B, D, H, W] features along four directions, summed -> [B, D, H*W] (row-major)."""
        batch, channels, height, width = features.shape
        length = height * width
        directions = NUM_SCAN_DIRECTIONS
        row_major = features.reshape(batch, channels, length)
        column_major = features.transpose(2, 3).reshape(batch, channels, length)
        forward_pair = torch.stack([row_major, column_major], dim=1)
        sequences = torch.cat([forward_pair, forward_pair.flip(-1)], dim=1).contiguous()  # [B, 4, D, L]

        projected = torch.einsum("bkdl,kcd->bkcl", sequences, self.x_proj_weight)
        dt_low_rank, b_state, c_state = torch.split(projected, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dt = torch.einsum("bkrl,kdr->bkdl", dt_low_rank, self.dt_projs_weight)

        scanned = selective_scan(
            sequences.float().reshape(batch, directions * channels, length),
            dt.float().reshape(batch, directions * channels, length),
            -torch.exp(self.A_logs.float()),
            b_state.float().contiguous(),
            c_state.float().contiguous(),
            self.Ds.float(),
            delta_bias=self.dt_projs_bias.float().reshape(-1),
            delta_softplus=True,
        ).view(batch, directions, channels, length)

        reversed_back = scanned[:, 2:4].flip(-1)
        row_sum = scanned[:, 0] + reversed_back[:, 0]
        column_sum = scanned[:, 1] + reversed_back[:, 1]
        column_sum = column_sum.view(batch, channels, width, height).transpose(2, 3).reshape(batch, channels, length)
        return row_sum + column_sum

    def _forward_cpu_inference(self, tokens: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """CPU inference path of :meth:`forward` (same result, no autograd), channel-last throughout.

        The in-projection runs as two matmuls (x and z halves) so that both come out
        contiguous, the depth-wise convolution carries the SiLU as a oneDNN post-op, the
        x-projection is computed once per position (a projection commutes with the
        reordering of the positions) and read by the Numba kernel where it lies, the
        kernel walks the four scan orders itself (no stacked, transposed or flipped copies),
        applies the low-rank dt projection, and gates the sum (``LayerNorm * SiLU(z)``) in
        one pass; the out-projection adds the residual as a oneDNN post-op.
        """
        directions, channels = NUM_SCAN_DIRECTIONS, self.d_inner
        branch = _matmul(tokens, self.in_proj.weight[:channels])
        gate = _matmul(tokens, self.in_proj.weight[channels:])
        branch = _depthwise_conv_silu(self.conv2d, branch)
        projections = _matmul(branch, self.x_proj_weight.view(-1, channels))
        with torch.profiler.record_function("selective_scan_numba"):
            gated = four_direction_scan_numba(
                branch,
                projections,
                self.dt_projs_weight,
                -torch.exp(self.A_logs).view(directions, channels, self.d_state),
                self.Ds.view(directions, channels),
                self.dt_projs_bias,
                delta_softplus=True,
                gate=OutputGate(gate, self.out_norm.weight, self.out_norm.bias, self.out_norm.eps),
            )
        return _matmul(gated, self.out_proj.weight, residual=residual)

    def forward(self, tokens: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """[B, H, W, d_model] -> [B, H, W, d_model], plus ``residual`` when given."""
        batch, height, width, _ = tokens.shape
        needs_grad = torch.is_grad_enabled() and (tokens.requires_grad or self.A_logs.requires_grad)
        backend = choose_backend(tokens.device, needs_grad)
        if backend == "numba" and not _observed(self.in_proj, self.conv2d, self.act, self.out_norm, self.out_proj):
            log_backend(backend, tokens.device)
            return self._forward_cpu_inference(tokens, residual)
        branch, gate = self.in_proj(tokens).chunk(2, dim=-1)
        branch = self.act(self.conv2d(branch.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)))
        scanned = self._scan_four_directions(branch)  # [B, D, L]
        scanned = scanned.transpose(1, 2).reshape(batch, height, width, self.d_inner)
        out = self.out_proj(self.out_norm(scanned) * F.silu(gate))
        return out if residual is None else residual + out


class VSSBlock(nn.Module):
    """Visual State Space block: ``x + DropPath(SS2D(LayerNorm(x)))``.

    Args:
        dim: Channels.
        drop_path: Stochastic-depth probability of this block.
        d_state: SSM state size.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, d_state: int = 16) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = SS2D(d_model=dim, d_state=d_state)
        self.drop_path = DropPath(drop_path)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, H, W, C] -> [B, H, W, C]."""
        normed = self.ln_1(tokens)
        if self.training:
            return tokens + self.drop_path(self.self_attention(normed))
        return self.self_attention(normed, residual=tokens)  # DropPath is the identity in eval mode


class EncoderStage(nn.Module):
    """VSS blocks followed by an optional patch merging."""

    def __init__(self, dim: int, drop_paths: Sequence[float], d_state: int, downsample: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([VSSBlock(dim, rate, d_state) for rate in drop_paths])
        self.downsample = PatchMerging2D(dim) if downsample else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens)
        return self.downsample(tokens) if self.downsample is not None else tokens


class DecoderStage(nn.Module):
    """Optional patch expanding (from ``2 * dim`` channels) followed by VSS blocks."""

    def __init__(self, dim: int, drop_paths: Sequence[float], d_state: int, upsample: bool) -> None:
        super().__init__()
        self.upsample = PatchExpand2D(2 * dim, scale=2) if upsample else None
        self.blocks = nn.ModuleList([VSSBlock(dim, rate, d_state) for rate in drop_paths])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.upsample is not None:
            tokens = self.upsample(tokens)
        for block in self.blocks:
            tokens = block(tokens)
        return tokens


class VMUNet(nn.Module):
    """VM-UNet (Ruan et al. 2024, "VM-UNet: Vision Mamba UNet for Medical Image Segmentation").

    ``VMUNet()`` builds the configuration of the authors' repository used in
    AbscessHeNe's Table I: 3 input channels, 1 class, encoder depths [2, 2, 2, 2], decoder
    depths [2, 2, 2, 1], dims [96, 192, 384, 768], d_state 16, drop-path 0.2 — 27,427,561
    parameters. Input height and width must be multiples of ``4 * 2**(len(depths) - 1)``
    (32 for four stages).

    Args:
        input_channels: Channels of the input image (a 1-channel input is repeated to 3
            only when ``input_channels == 3``, as in the reference).
        num_classes: Output channels (logits).
        depths: VSS blocks per encoder stage.
        depths_decoder: VSS blocks per decoder stage (deepest first).
        dims: Channels per stage, or the first stage's channels (doubled per stage).
        d_state: SSM state size.
        drop_path_rate: Largest stochastic-depth rate (linear ramp over the encoder blocks,
            reversed ramp over the decoder blocks).
        patch_size: Patch size of the embedding (and of the final expanding).

    Attributes:
        config: The keyword arguments that rebuild this network (stored in checkpoints).
        size_multiple: Input height and width must be multiples of this.
    """

    def __init__(
        self,
        input_channels: int = 3,
        num_classes: int = 1,
        depths: Sequence[int] = (2, 2, 2, 2),
        depths_decoder: Sequence[int] = (2, 2, 2, 1),
        dims: Sequence[int] | int = (96, 192, 384, 768),
        d_state: int = 16,
        drop_path_rate: float = 0.2,
        patch_size: int = 4,
    ) -> None:
        super().__init__()
        depths = list(depths)
        depths_decoder = list(depths_decoder)
        num_stages = len(depths)
        if isinstance(dims, int):
            dims = [dims * 2**stage for stage in range(num_stages)]
        dims = list(dims)
        if len(dims) != num_stages or len(depths_decoder) != num_stages:
            raise ValueError(
                f"depths ({depths}), depths_decoder ({depths_decoder}) and dims ({dims}) must have the same length"
            )
        for previous, following in itertools.pairwise(dims):
            if following != 2 * previous:
                raise ValueError(f"dims must double from stage to stage (patch merging), got {dims}")
        if dims[0] % patch_size != 0:
            raise ValueError(f"dims[0]={dims[0]} must be divisible by patch_size={patch_size}")
        self.config = {
            "input_channels": input_channels,
            "num_classes": num_classes,
            "depths": depths,
            "depths_decoder": depths_decoder,
            "dims": dims,
            "d_state": d_state,
            "drop_path_rate": drop_path_rate,
            "patch_size": patch_size,
        }
        self.input_channels = input_channels
        self.num_classes = num_classes
        self.dims = dims
        self.patch_size = patch_size
        self.size_multiple = patch_size * 2 ** (num_stages - 1)

        encoder_rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        decoder_rates = torch.linspace(0, drop_path_rate, sum(depths_decoder)).tolist()[::-1]
        dims_decoder = dims[::-1]

        self.patch_embed = PatchEmbed2D(input_channels, dims[0], patch_size)
        self.layers = nn.ModuleList()
        for stage, depth in enumerate(depths):
            start = sum(depths[:stage])
            self.layers.append(
                EncoderStage(dims[stage], encoder_rates[start : start + depth], d_state, stage < num_stages - 1)
            )
        self.layers_up = nn.ModuleList()
        for stage, depth in enumerate(depths_decoder):
            start = sum(depths_decoder[:stage])
            self.layers_up.append(
                DecoderStage(dims_decoder[stage], decoder_rates[start : start + depth], d_state, stage > 0)
            )
        self.final_up = PatchExpand2D(dims[0], scale=patch_size)
        self.final_conv = nn.Conv2d(dims[0] // patch_size, num_classes, kernel_size=1)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Reference init: truncated-normal linear weights (std 0.02, cut at +-2 as timm's
        ``trunc_normal_`` of the reference, whose arguments MONAI's shares), zero biases, unit
        LayerNorms."""
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def _check_input(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {tuple(images.shape)}")
        if images.shape[1] == 1 and self.input_channels == 3:
            images = images.repeat(1, 3, 1, 1)
        if images.shape[1] != self.input_channels:
            raise ValueError(f"expected {self.input_channels} input channels, got {images.shape[1]}")
        height, width = images.shape[-2:]
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(f"input height and width must be multiples of {self.size_multiple}, got {height}x{width}")
        return images

    def forward_with_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass giving both the logits and the deepest encoder features.

        Args:
            images: [B, input_channels, H, W].

        Returns:
            ``(logits [B, num_classes, H, W], features [B, dims[-1], H/32, W/32])`` where
            the features are the output of the last encoder stage (bottleneck, before the
            decoder), channel-first.
        """
        tokens = self.patch_embed(self._check_input(images))
        skips = []
        for stage in self.layers:
            skips.append(tokens)
            tokens = stage(tokens)
        deepest = tokens
        for index, stage in enumerate(self.layers_up):
            tokens = stage(tokens if index == 0 else tokens + skips[-index])
        logits = self.final_conv(self.final_up(tokens).permute(0, 3, 1, 2))
        return logits, deepest.permute(0, 3, 1, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, input_channels, H, W] -> logits [B, num_classes, H, W]."""
        return self.forward_with_features(images)[0]
