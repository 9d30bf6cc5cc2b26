"""Replica of the SAM2 grounding encoder that Sa2VA's Hugging Face remote code ships as ``sam2.py``.

Written for rl-seg's tests from a reading of the public file (bytedance/Sa2VA, ``projects/sa2va/hf/models/sam2.py``,
identical in every released family); no code is copied. What is the same as upstream, because it is the checkpoint
format or the behaviour checkpoints are used with:

- class names (``SAM2`` appears in the model's ``_no_split_modules``), attribute names, parameter and buffer names
  and shapes (``grounding_encoder.sam2_model.*`` of a Sa2VA state dict loads either way);
- the numerics and call flow of what Sa2VA runs: ``get_sam2_embeddings`` -> ``init_state``;
  ``language_embd_inference`` (under ``torch.autocast("cuda", bfloat16)``) -> ``add_language_embd`` per frame and
  object -> ``propagate_in_video`` (consolidation, memory encoding of the conditioning frames, masks bilinearly
  resized to the "video" resolution, which is ``image_size``); ``inject_language_embd``; ``preprocess_image``;
  ``forward_image``; ``_prepare_backbone_features``; ``_use_multimask``; Sa2VA's ``_forward_sam_heads`` (language
  embedding appended to the sparse prompts; the "no object" overwrite with -1024 is commented out upstream, so the
  logits are returned as the decoder made them);
- the quirks: CUDA is hard-coded (``init_state`` puts the state on ``cuda``, frames are moved with ``.cuda()``),
  ``preprocess_image`` defaults to bfloat16 (mean/std rounded to bfloat16 whatever the image dtype), the autocast
  region names ``cuda`` (a no-op with a warning on a CPU-only torch), ``propagate_in_video`` runs in inference mode
  (its masks are inference tensors), the FPN's top-down sum is float32 whatever the model dtype, the drop-path
  schedule calls ``.item()`` (a bare ``torch.device("meta")`` context fails; transformers' init context does not),
  importing the module silences ``FutureWarning`` process-wide, a second language prompt for the same frame and
  object fails an assertion, and an object without output on a consolidated frame reaches a method upstream never
  defined (AttributeError).

The one liberty is the size: ``SAM2(size="hiera_l")`` is upstream's hard-coded SAM2 Hiera-L (224.4M parameters);
``SAM2(size="tiny")`` is the same module tree (the same parameter names: same depths, block indices and window
sizes) with narrow widths, still at 1024 px input with 256 x 256 low-resolution logits, for tests. Branches the
Sa2VA paths above never reach (memory-conditioned tracking of later frames, box prompts, mask-as-output, hole
filling, non-overlap constraints) raise NotImplementedError naming themselves.
"""

import copy
import math
import warnings
from collections import OrderedDict
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.init import trunc_normal_

NO_OBJ_SCORE = -1024.0

# upstream does this at import, for every module of the process
warnings.simplefilter(action="ignore", category=FutureWarning)

#: What upstream's ``SAM2`` builders hard-code, per size. hiera_l: upstream's values (SAM2 Hiera-L). tiny: every depth,
#: block index and window size of hiera_l (so the parameter names are identical) with narrow widths: Hiera stages of
#: 8/16/32/64 channels (heads 1/2/4/8), SAM width (``d_model``) 32, memories 16 channels, memory-attention MLP 64.
#: The mask decoder's own sizes (8 heads, MLP 2048, IoU head 256) are hard-coded in ``_build_sam_heads`` for both,
#: as upstream hard-codes them there; at width 32 they cost little.
SIZES = {
    "hiera_l": dict(embed_dim=144, num_heads=2, stages=(2, 6, 36, 4), global_att_blocks=(23, 33, 43),
                    window_pos_embed_bkg_spatial_size=(7, 7), window_spec=(8, 4, 16, 8), d_model=256, mem_dim=64,
                    mem_attn_ffn=2048, head_mul=2.0),
    "tiny": dict(embed_dim=8, num_heads=1, head_mul=1.0, stages=(2, 6, 36, 4), global_att_blocks=(23, 33, 43),
                 window_pos_embed_bkg_spatial_size=(7, 7), window_spec=(8, 4, 16, 8), d_model=32, mem_dim=16,
                 mem_attn_ffn=64),
}

# upstream's SDPA backend flags (all on)
OLD_GPU, USE_FLASH_ATTN, MATH_KERNEL_ON = True, True, True


def _sdpa(q, k, v, dropout_p=0.0):
    # upstream opens the deprecated backend-selection context around every SAM attention call; kept so a torch
    # without it breaks here as it breaks there
    with torch.backends.cuda.sdp_kernel(enable_flash=USE_FLASH_ATTN,
                                        enable_math=(OLD_GPU and dropout_p > 0.0) or MATH_KERNEL_ON,
                                        enable_mem_efficient=OLD_GPU):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


def load_checkpoint_with_prefix(filename, prefix=None, map_location="cpu"):
    ckpt = torch.load(filename, map_location=map_location)
    state = ckpt.get("state_dict", ckpt.get("model", ckpt)) if isinstance(ckpt, dict) else ckpt
    if not prefix:
        return state
    prefix = prefix if prefix.endswith(".") else prefix + "."
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    assert state, f"{prefix} is not in the pretrained model"
    return state


def load_state_dict_to_model(model, state_dict):
    missing, unexpected = model.load_state_dict(state_dict)
    if missing or unexpected:
        print(missing or unexpected)
        raise RuntimeError()


# ------------------------------------------------------------------------------------------------ small pieces
class MLP(nn.Module):
    def __init__(self, input_dim, hidden_dim, output_dim, num_layers, activation=nn.ReLU, sigmoid_output=False):
        super().__init__()
        self.num_layers = num_layers
        widths = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.sigmoid_output = sigmoid_output
        self.act = activation()

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = self.act(x)
        return F.sigmoid(x) if self.sigmoid_output else x


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a B x C x H x W map."""

    def __init__(self, num_channels, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def get_clones(module, n):
    # deep copies: the layers start identical, as upstream's do
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))


# ------------------------------------------------------------------------------------------- position encodings
class PositionEmbeddingSine(nn.Module):
    """Normalised 2-D sine/cosine positions (DETR style); y features first, then x."""

    def __init__(self, num_pos_feats, temperature=10000, normalize=True, scale=None):
        super().__init__()
        assert num_pos_feats % 2 == 0
        if scale is not None and not normalize:
            raise ValueError("normalize should be True if scale is passed")
        self.num_pos_feats = num_pos_feats // 2
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.cache = {}  # keyed by (H, W) only: the first call's device and values are reused

    @torch.no_grad()
    def forward(self, x):
        key = (x.shape[-2], x.shape[-1])
        if key in self.cache:
            return self.cache[key][None].repeat(x.shape[0], 1, 1, 1)
        b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
        ys = torch.arange(1, h + 1, dtype=torch.float32, device=x.device).view(1, -1, 1).repeat(b, 1, w)
        xs = torch.arange(1, w + 1, dtype=torch.float32, device=x.device).view(1, 1, -1).repeat(b, h, 1)
        if self.normalize:
            ys = ys / (ys[:, -1:, :] + 1e-6) * self.scale
            xs = xs / (xs[:, :, -1:] + 1e-6) * self.scale
        freq = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        freq = self.temperature ** (2 * (freq // 2) / self.num_pos_feats)

        def interleave(v):
            v = v[..., None] / freq
            return torch.stack((v[..., 0::2].sin(), v[..., 1::2].cos()), dim=4).flatten(3)

        pos = torch.cat((interleave(ys), interleave(xs)), dim=3).permute(0, 3, 1, 2)
        self.cache[key] = pos[0]
        return pos


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of normalised (x, y) coordinates."""

    def __init__(self, num_pos_feats=64, scale=None):
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))
        self.first = True

    def _pe_encoding(self, coords):
        coords = (2 * coords - 1).to(self.positional_encoding_gaussian_matrix.dtype)
        if self.first:  # upstream moves the buffer to the coordinates' device once
            self.positional_encoding_gaussian_matrix = self.positional_encoding_gaussian_matrix.to(coords.device)
            self.first = False
        coords = 2 * math.pi * (coords @ self.positional_encoding_gaussian_matrix)
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size):
        h, w = size
        ones = torch.ones((h, w), device=self.positional_encoding_gaussian_matrix.device, dtype=torch.float32)
        ys = (ones.cumsum(dim=0) - 0.5) / h
        xs = (ones.cumsum(dim=1) - 0.5) / w
        return self._pe_encoding(torch.stack([xs, ys], dim=-1)).permute(2, 0, 1)

    def forward_with_coords(self, coords_input, image_size):
        coords = coords_input.clone()
        coords[:, :, 0] = coords[:, :, 0] / image_size[1]
        coords[:, :, 1] = coords[:, :, 1] / image_size[0]
        return self._pe_encoding(coords.to(torch.float))


def compute_axial_cis(dim, end_x, end_y, theta=10000.0):
    """Complex rotations for 2-D RoPE: the first half of the pairs rotate with x, the second with y."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 4)[: dim // 4].float() / dim))
    t = torch.arange(end_x * end_y, dtype=torch.float32)
    t_x, t_y = (t % end_x).float(), torch.div(t, end_x, rounding_mode="floor").float()
    angles_x, angles_y = torch.outer(t_x, freqs), torch.outer(t_y, freqs)
    return torch.cat([torch.polar(torch.ones_like(angles_x), angles_x),
                      torch.polar(torch.ones_like(angles_y), angles_y)], dim=-1)


def apply_rotary_enc(xq, xk, freqs_cis, repeat_freqs_k=False):
    q = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    assert freqs_cis.shape == (q.shape[-2], q.shape[-1])
    freqs = freqs_cis.view(*[1] * (q.ndim - 2), *freqs_cis.shape)
    q_out = torch.view_as_real(q * freqs).flatten(3).type_as(xq).to(xq.device)
    if xk.shape[-2] == 0:
        return q_out, xk
    k = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    if repeat_freqs_k:  # memories hold several frames of the same grid
        freqs = freqs.repeat(*[1] * (freqs.ndim - 2), k.shape[-2] // q.shape[-2], 1)
    return q_out, torch.view_as_real(k * freqs).flatten(3).type_as(xk).to(xk.device)


# --------------------------------------------------------------------------------------------- Hiera trunk
def window_partition(x, window_size):
    """B x H x W x C -> (B * windows) x ws x ws x C, zero-padding H and W up to multiples of ws."""
    b, h, w, c = x.shape
    ph, pw = -h % window_size, -w % window_size
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, c), (hp, wp)


def window_unpartition(windows, window_size, pad_hw, hw):
    hp, wp = pad_hw
    h, w = hw
    b = windows.shape[0] // (hp * wp // window_size // window_size)
    x = windows.view(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, hp, wp, -1)
    return x[:, :h, :w, :].contiguous() if hp > h or wp > w else x


class PatchEmbed(nn.Module):
    def __init__(self, kernel_size=(7, 7), stride=(4, 4), padding=(3, 3), in_chans=3, embed_dim=768):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel_size, stride=stride, padding=padding)

    def forward(self, x):
        return self.proj(x).permute(0, 2, 3, 1)


def do_pool(x, pool, norm=None):
    if pool is None:
        return x
    x = pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return norm(x) if norm else x


class MultiScaleAttention(nn.Module):
    def __init__(self, dim, dim_out, num_heads, q_pool=None):
        super().__init__()
        self.dim, self.dim_out, self.num_heads = dim, dim_out, num_heads
        self.scale = (dim_out // num_heads) ** -0.5
        self.q_pool = q_pool
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x):
        b, h, w, _ = x.shape
        q, k, v = torch.unbind(self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1), 2)
        if self.q_pool:  # stage change: queries are max-pooled, keys and values keep the finer grid
            q = do_pool(q.reshape(b, h, w, -1), self.q_pool)
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, self.num_heads, -1)
        x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(x.transpose(1, 2).reshape(b, h, w, -1))


class MultiScaleBlock(nn.Module):
    def __init__(self, dim, dim_out, num_heads, mlp_ratio=4.0, drop_path=0.0, norm_layer="LayerNorm",
                 q_stride=None, act_layer=nn.GELU, window_size=0):
        super().__init__()
        if drop_path > 0.0:
            raise NotImplementedError("MultiScaleBlock: drop_path > 0 (upstream's SAM2 builds Hiera with 0)")
        norm_layer = partial(getattr(nn, norm_layer), eps=1e-6) if isinstance(norm_layer, str) else norm_layer
        self.dim, self.dim_out = dim, dim_out
        self.norm1 = norm_layer(dim)
        self.window_size = window_size
        self.q_stride = q_stride
        self.pool = nn.MaxPool2d(kernel_size=q_stride, stride=q_stride, ceil_mode=False) if q_stride else None
        self.attn = MultiScaleAttention(dim, dim_out, num_heads=num_heads, q_pool=self.pool)
        self.drop_path = nn.Identity()
        self.norm2 = norm_layer(dim_out)
        self.mlp = MLP(dim_out, int(dim_out * mlp_ratio), dim_out, num_layers=2, activation=act_layer)
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x):
        shortcut = x
        x = self.norm1(x)
        if self.dim != self.dim_out:  # the residual is projected from the normed input and pooled like q
            shortcut = do_pool(self.proj(x), self.pool)
        window_size = self.window_size
        if window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, window_size)
        x = self.attn(x)
        if self.q_stride:  # windows shrank with the pooled queries
            window_size = self.window_size // self.q_stride[0]
            h, w = shortcut.shape[1:3]
            pad_hw = (h + -h % window_size, w + -w % window_size)
        if self.window_size > 0:
            x = window_unpartition(x, window_size, pad_hw, (h, w))
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Hiera(nn.Module):
    """Hierarchical ViT trunk: 4 stages, q-pooling at stage changes, windowed attention except in the global
    blocks, a background position embedding interpolated to the grid plus a tiled per-window one."""

    def __init__(self, embed_dim=96, num_heads=1, drop_path_rate=0.0, q_pool=3, q_stride=(2, 2),
                 stages=(2, 3, 16, 3), dim_mul=2.0, head_mul=2.0, window_pos_embed_bkg_spatial_size=(14, 14),
                 window_spec=(8, 4, 14, 7), global_att_blocks=(12, 16, 20), return_interm_layers=True):
        super().__init__()
        assert len(stages) == len(window_spec)
        self.window_spec = window_spec
        depth = sum(stages)
        self.q_stride = q_stride
        self.stage_ends = [sum(stages[:i]) - 1 for i in range(1, len(stages) + 1)]
        assert 0 <= q_pool <= len(self.stage_ends[:-1])
        self.q_pool_blocks = [end + 1 for end in self.stage_ends[:-1]][:q_pool]
        self.return_interm_layers = return_interm_layers
        self.patch_embed = PatchEmbed(embed_dim=embed_dim)
        self.global_att_blocks = global_att_blocks
        self.window_pos_embed_bkg_spatial_size = window_pos_embed_bkg_spatial_size
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *window_pos_embed_bkg_spatial_size))
        self.pos_embed_window = nn.Parameter(torch.zeros(1, embed_dim, window_spec[0], window_spec[0]))
        # upstream reads the stochastic-depth schedule with .item(): fails under a bare meta-device context
        drop_rates = [r.item() for r in torch.linspace(0, drop_path_rate, depth)]

        stage = 1
        self.blocks = nn.ModuleList()
        for i in range(depth):
            dim_out = embed_dim
            # the first block of a stage still uses the previous stage's window (it pools down into the new one)
            window_size = self.window_spec[stage - 1]
            if self.global_att_blocks is not None and i in self.global_att_blocks:
                window_size = 0
            if i - 1 in self.stage_ends:
                dim_out = int(embed_dim * dim_mul)
                num_heads = int(num_heads * head_mul)
                stage += 1
            self.blocks.append(MultiScaleBlock(dim=embed_dim, dim_out=dim_out, num_heads=num_heads,
                                               drop_path=drop_rates[i], window_size=window_size,
                                               q_stride=self.q_stride if i in self.q_pool_blocks else None))
            embed_dim = dim_out
        self.channel_list = ([self.blocks[i].dim_out for i in self.stage_ends[::-1]] if return_interm_layers
                             else [self.blocks[-1].dim_out])

    def _get_pos_embed(self, hw):
        pos = F.interpolate(self.pos_embed, size=hw, mode="bicubic")
        window = self.pos_embed_window
        pos = pos + window.tile([a // b for a, b in zip(pos.shape, window.shape)])
        return pos.permute(0, 2, 3, 1)

    def forward(self, x):
        x = self.patch_embed(x)
        x = x + self._get_pos_embed(x.shape[1:3])
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == self.stage_ends[-1] or (i in self.stage_ends and self.return_interm_layers):
                outputs.append(x.permute(0, 3, 1, 2))
        return outputs


class FpnNeck(nn.Module):
    """1x1 lateral convs to ``d_model``; top-down (nearest x2) sums only into ``fpn_top_down_levels``."""

    def __init__(self, position_encoding, d_model, backbone_channel_list, kernel_size=1, stride=1, padding=0,
                 fpn_interp_model="bilinear", fuse_type="sum", fpn_top_down_levels=None):
        super().__init__()
        self.position_encoding = position_encoding
        self.convs = nn.ModuleList()
        self.backbone_channel_list = backbone_channel_list
        for dim in backbone_channel_list:
            lateral = nn.Sequential()
            lateral.add_module("conv", nn.Conv2d(dim, d_model, kernel_size=kernel_size, stride=stride,
                                                 padding=padding))
            self.convs.append(lateral)
        self.fpn_interp_model = fpn_interp_model
        assert fuse_type in ("sum", "avg")
        self.fuse_type = fuse_type
        self.fpn_top_down_levels = list(range(len(self.convs)) if fpn_top_down_levels is None
                                        else fpn_top_down_levels)

    def forward(self, xs):
        assert len(xs) == len(self.convs)
        n = len(self.convs) - 1
        out, pos = [None] * len(xs), [None] * len(xs)
        prev = None
        for i in range(n, -1, -1):  # coarsest first
            lateral = self.convs[n - i](xs[i])
            if i in self.fpn_top_down_levels and prev is not None:
                # the upsampled path is float32 whatever the model dtype, so the sum is float32 too
                top_down = F.interpolate(prev.to(dtype=torch.float32), scale_factor=2.0, mode=self.fpn_interp_model,
                                         align_corners=None if self.fpn_interp_model == "nearest" else False,
                                         antialias=False)
                prev = lateral + top_down
                if self.fuse_type == "avg":
                    prev /= 2
            else:
                prev = lateral
            out[i] = prev
            pos[i] = self.position_encoding(prev).to(prev.dtype)
        return out, pos


class ImageEncoder(nn.Module):
    def __init__(self, trunk, neck, scalp=0):
        super().__init__()
        self.trunk, self.neck, self.scalp = trunk, neck, scalp
        assert trunk.channel_list == neck.backbone_channel_list, (trunk.channel_list, neck.backbone_channel_list)

    def forward(self, sample):
        features, pos = self.neck(self.trunk(sample))
        if self.scalp > 0:  # the coarsest level is dropped
            features, pos = features[: -self.scalp], pos[: -self.scalp]
        return {"vision_features": features[-1], "vision_pos_enc": pos, "backbone_fpn": features}


# ----------------------------------------------------------------------------------------------- attention
class Attention(nn.Module):
    """Multi-head attention whose projections may narrow the width (``downsample_rate``) or take another key width."""

    def __init__(self, embedding_dim, num_heads, downsample_rate=1, dropout=0.0, kv_in_dim=None):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.kv_in_dim = kv_in_dim if kv_in_dim is not None else embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        assert self.internal_dim % num_heads == 0, "num_heads must divide embedding_dim."
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(self.kv_in_dim, self.internal_dim)
        self.v_proj = nn.Linear(self.kv_in_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)
        self.dropout_p = dropout

    def _separate_heads(self, x, num_heads):
        b, n, c = x.shape
        return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)

    def _recombine_heads(self, x):
        b, h, n, c = x.shape
        return x.transpose(1, 2).reshape(b, n, h * c)

    def _project(self, q, k, v):
        return (self._separate_heads(self.q_proj(q), self.num_heads),
                self._separate_heads(self.k_proj(k), self.num_heads),
                self._separate_heads(self.v_proj(v), self.num_heads))

    def forward(self, q, k, v):
        q, k, v = self._project(q, k, v)
        out = _sdpa(q, k, v, self.dropout_p if self.training else 0.0)
        return self.out_proj(self._recombine_heads(out))


class RoPEAttention(Attention):
    """Attention with 2-D rotary positions on queries and (the first ``k - num_k_exclude_rope``) keys."""

    def __init__(self, *args, rope_theta=10000.0, rope_k_repeat=False, feat_sizes=(32, 32), **kwargs):
        super().__init__(*args, **kwargs)
        self.compute_cis = partial(compute_axial_cis, dim=self.internal_dim // self.num_heads, theta=rope_theta)
        self.freqs_cis = self.compute_cis(end_x=feat_sizes[0], end_y=feat_sizes[1])  # an attribute, not a buffer
        self.rope_k_repeat = rope_k_repeat

    def forward(self, q, k, v, num_k_exclude_rope=0):
        q, k, v = self._project(q, k, v)
        side = math.sqrt(q.shape[-2])
        self.freqs_cis = self.freqs_cis.to(q.device)
        if self.freqs_cis.shape[0] != q.shape[-2]:
            self.freqs_cis = self.compute_cis(end_x=side, end_y=side).to(q.device)
        if q.shape[-2] != k.shape[-2]:
            assert self.rope_k_repeat
        n_rope = k.size(-2) - num_k_exclude_rope
        q, k[:, :, :n_rope] = apply_rotary_enc(q, k[:, :, :n_rope], freqs_cis=self.freqs_cis,
                                               repeat_freqs_k=self.rope_k_repeat)
        out = _sdpa(q, k, v, self.dropout_p if self.training else 0.0)
        return self.out_proj(self._recombine_heads(out))


# ------------------------------------------------------------------------------------------ prompt encoder
class PromptEncoder(nn.Module):
    def __init__(self, embed_dim, image_embedding_size, input_image_size, mask_in_chans, activation=nn.GELU):
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.num_point_embeddings = 4  # negative, positive, box corner 1, box corner 2
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2), LayerNorm2d(mask_in_chans // 4), activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2), LayerNorm2d(mask_in_chans),
            activation(), nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1))
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self):
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points, labels, pad):
        points = points + 0.5  # pixel centres
        if pad:  # a "not a point" entry stands in for the missing box
            points = torch.cat([points, torch.zeros((points.shape[0], 1, 2), device=points.device)], dim=1)
            labels = torch.cat([labels, -torch.ones((labels.shape[0], 1), device=labels.device)], dim=1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        emb[labels == -1] = 0.0
        emb[labels == -1] += self.not_a_point_embed.weight
        for value in range(self.num_point_embeddings):
            emb[labels == value] += self.point_embeddings[value].weight
        return emb

    def _embed_boxes(self, boxes):
        raise NotImplementedError("PromptEncoder._embed_boxes: box prompts are not on Sa2VA's paths")

    def _embed_masks(self, masks):
        return self.mask_downscaling(masks)

    def forward(self, points, boxes, masks):
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        else:
            bs = masks.shape[0] if masks is not None else 1
        sparse = torch.empty((bs, 0, self.embed_dim), device=self.point_embeddings[0].weight.device)
        if points is not None:
            sparse = torch.cat([sparse, self._embed_points(*points, pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)
        if masks is not None:
            dense = self._embed_masks(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(bs, -1, *self.image_embedding_size)
        return sparse, dense


# -------------------------------------------------------------------------------------------- mask decoder
class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, tokens -> image, token MLP, image -> tokens (post-norm each)."""

    def __init__(self, embedding_dim, num_heads, mlp_dim=2048, activation=nn.ReLU, attention_downsample_rate=2,
                 skip_first_layer_pe=False):
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads,
                                                   downsample_rate=attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLP(embedding_dim, mlp_dim, embedding_dim, num_layers=2, activation=activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads,
                                                   downsample_rate=attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:  # first layer: the queries are the prompt embeddings, replaced not added to
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q=q, k=k, v=keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(q=k, k=q, v=queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth, embedding_dim, num_heads, mlp_dim, activation=nn.ReLU, attention_downsample_rate=2):
        super().__init__()
        self.depth, self.embedding_dim, self.num_heads, self.mlp_dim = depth, embedding_dim, num_heads, mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(embedding_dim=embedding_dim, num_heads=num_heads, mlp_dim=mlp_dim,
                                 activation=activation, attention_downsample_rate=attention_downsample_rate,
                                 skip_first_layer_pe=i == 0)
            for i in range(depth))
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding, image_pe, point_embedding):
        keys = image_embedding.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries=queries, keys=keys, query_pe=point_embedding, key_pe=key_pe)
        attn = self.final_attn_token_to_image(q=queries + point_embedding, k=keys + key_pe, v=keys)
        return self.norm_final_attn(queries + attn), keys


class MaskDecoder(nn.Module):
    """SAM2's mask decoder: object-score, IoU and 1 + ``num_multimask_outputs`` mask tokens in front of the prompt
    tokens; masks are hypernetwork products with the upscaled image embedding (plus the stride 4 and 8 features)."""

    def __init__(self, *, transformer_dim, transformer, num_multimask_outputs=3, activation=nn.GELU,
                 iou_head_depth=3, iou_head_hidden_dim=256, use_high_res_features=False,
                 iou_prediction_use_sigmoid=False, dynamic_multimask_via_stability=False,
                 dynamic_multimask_stability_delta=0.05, dynamic_multimask_stability_thresh=0.98,
                 pred_obj_scores=False, pred_obj_scores_mlp=False, use_multimask_token_for_obj_ptr=False):
        super().__init__()
        d = transformer_dim
        self.transformer_dim = d
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, d)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, d)
        self.pred_obj_scores = pred_obj_scores
        if pred_obj_scores:
            self.obj_score_token = nn.Embedding(1, d)
        self.use_multimask_token_for_obj_ptr = use_multimask_token_for_obj_ptr
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(d, d // 4, kernel_size=2, stride=2), LayerNorm2d(d // 4), activation(),
            nn.ConvTranspose2d(d // 4, d // 8, kernel_size=2, stride=2), activation())
        self.use_high_res_features = use_high_res_features
        if use_high_res_features:
            self.conv_s0 = nn.Conv2d(d, d // 8, kernel_size=1, stride=1)
            self.conv_s1 = nn.Conv2d(d, d // 4, kernel_size=1, stride=1)
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(d, d, d // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(d, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth,
                                       sigmoid_output=iou_prediction_use_sigmoid)
        if pred_obj_scores:
            self.pred_obj_score_head = MLP(d, d, 1, 3) if pred_obj_scores_mlp else nn.Linear(d, 1)
        self.dynamic_multimask_via_stability = dynamic_multimask_via_stability
        self.dynamic_multimask_stability_delta = dynamic_multimask_stability_delta
        self.dynamic_multimask_stability_thresh = dynamic_multimask_stability_thresh

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                multimask_output, repeat_image, high_res_features=None):
        masks, iou_pred, mask_tokens_out, object_score_logits = self.predict_masks(
            image_embeddings=image_embeddings, image_pe=image_pe, sparse_prompt_embeddings=sparse_prompt_embeddings,
            dense_prompt_embeddings=dense_prompt_embeddings, repeat_image=repeat_image,
            high_res_features=high_res_features)
        if multimask_output:
            masks, iou_pred = masks[:, 1:], iou_pred[:, 1:]
        elif self.dynamic_multimask_via_stability and not self.training:
            masks, iou_pred = self._dynamic_multimask_via_stability(masks, iou_pred)
        else:
            masks, iou_pred = masks[:, 0:1], iou_pred[:, 0:1]
        # the object pointer comes from the single-mask token unless multimask tokens are asked for
        sam_tokens_out = (mask_tokens_out[:, 1:] if multimask_output and self.use_multimask_token_for_obj_ptr
                          else mask_tokens_out[:, 0:1])
        return masks, iou_pred, sam_tokens_out, object_score_logits

    def predict_masks(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                      repeat_image, high_res_features=None):
        s = 1 if self.pred_obj_scores else 0
        fixed = [self.iou_token.weight, self.mask_tokens.weight]
        if self.pred_obj_scores:
            fixed.insert(0, self.obj_score_token.weight)
        n = sparse_prompt_embeddings.size(0)
        tokens = torch.cat((torch.cat(fixed, dim=0).unsqueeze(0).expand(n, -1, -1), sparse_prompt_embeddings), dim=1)
        if repeat_image:
            src = torch.repeat_interleave(image_embeddings, tokens.shape[0], dim=0)
        else:
            assert image_embeddings.shape[0] == tokens.shape[0]
            src = image_embeddings
        src = src + dense_prompt_embeddings
        assert image_pe.size(0) == 1, "image_pe should have size 1 in batch dim (from `get_dense_pe()`)"
        pos_src = torch.repeat_interleave(image_pe, tokens.shape[0], dim=0)
        b, c, h, w = src.shape
        # the transformer runs in the dtype of the dense positional encoding (the prompt encoder's buffer dtype)
        src, tokens = src.to(pos_src.dtype), tokens.to(pos_src.dtype)
        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, s, :]
        mask_tokens_out = hs[:, s + 1: s + 1 + self.num_mask_tokens, :]

        src = src.transpose(1, 2).view(b, c, h, w)
        if not self.use_high_res_features:
            upscaled = self.output_upscaling(src)
        else:
            dc1, ln1, act1, dc2, act2 = self.output_upscaling
            feat_s0, feat_s1 = high_res_features
            upscaled = act1(ln1(dc1(src) + feat_s1))
            upscaled = act2(dc2(upscaled) + feat_s0)
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
                               dim=1)
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        iou_pred = self.iou_prediction_head(iou_token_out)
        if self.pred_obj_scores:
            object_score_logits = self.pred_obj_score_head(hs[:, 0, :])
        else:
            object_score_logits = 10.0 * iou_pred.new_ones(iou_pred.shape[0], 1)
        return masks, iou_pred, mask_tokens_out, object_score_logits

    def _get_stability_scores(self, mask_logits):
        """IoU of the mask thresholded at +delta and at -delta (1 when both are empty)."""
        mask_logits = mask_logits.flatten(-2)
        delta = self.dynamic_multimask_stability_delta
        inner = torch.sum(mask_logits > delta, dim=-1).float()
        outer = torch.sum(mask_logits > -delta, dim=-1).float()
        return torch.where(outer > 0, inner / outer, 1.0)

    def _dynamic_multimask_via_stability(self, all_mask_logits, all_iou_scores):
        """Single-mask output, replaced by the best-IoU multimask output where the single mask is unstable."""
        multi_logits, multi_iou = all_mask_logits[:, 1:], all_iou_scores[:, 1:]
        best = torch.argmax(multi_iou, dim=-1)
        rows = torch.arange(multi_iou.size(0), device=all_iou_scores.device)
        best_logits, best_iou = multi_logits[rows, best].unsqueeze(1), multi_iou[rows, best].unsqueeze(1)
        single_logits, single_iou = all_mask_logits[:, 0:1], all_iou_scores[:, 0:1]
        stable = self._get_stability_scores(single_logits) >= self.dynamic_multimask_stability_thresh
        logits = torch.where(stable[..., None, None].expand_as(single_logits), single_logits, best_logits)
        ious = torch.where(stable.expand_as(single_iou), single_iou, best_iou)
        return logits, ious


# ------------------------------------------------------------------------------------ memory attention/encoder
class MemoryAttentionLayer(nn.Module):
    """Pre-norm self-attention, cross-attention to memories, feed-forward (video tracking; never reached by Sa2VA)."""

    def __init__(self, activation, cross_attention, d_model, dim_feedforward, dropout, pos_enc_at_attn,
                 pos_enc_at_cross_attn_keys, pos_enc_at_cross_attn_queries, self_attention):
        super().__init__()
        if activation != "relu":
            raise NotImplementedError(f"MemoryAttentionLayer: activation {activation!r} (upstream's SAM2 uses relu)")
        self.d_model, self.dim_feedforward, self.dropout_value = d_model, dim_feedforward, dropout
        self.self_attn = self_attention
        self.cross_attn_image = cross_attention
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)
        self.activation_str = activation
        self.activation = F.relu
        self.pos_enc_at_attn = pos_enc_at_attn
        self.pos_enc_at_cross_attn_queries = pos_enc_at_cross_attn_queries
        self.pos_enc_at_cross_attn_keys = pos_enc_at_cross_attn_keys

    def forward(self, tgt, memory, pos=None, query_pos=None, num_k_exclude_rope=0):
        x = self.norm1(tgt)
        qk = x + query_pos if self.pos_enc_at_attn else x
        tgt = tgt + self.dropout1(self.self_attn(qk, qk, v=x))
        kwds = {"num_k_exclude_rope": num_k_exclude_rope} if num_k_exclude_rope > 0 else {}
        x = self.norm2(tgt)
        x = self.cross_attn_image(q=x + query_pos if self.pos_enc_at_cross_attn_queries else x,
                                  k=memory + pos if self.pos_enc_at_cross_attn_keys else memory, v=memory, **kwds)
        tgt = tgt + self.dropout2(x)
        x = self.linear2(self.dropout(self.activation(self.linear1(self.norm3(tgt)))))
        return tgt + self.dropout3(x)


class MemoryAttention(nn.Module):
    def __init__(self, d_model, pos_enc_at_input, layer, num_layers, batch_first=True):
        super().__init__()
        self.d_model = d_model
        self.layers = get_clones(layer, num_layers)
        self.num_layers = num_layers
        self.norm = nn.LayerNorm(d_model)
        self.pos_enc_at_input = pos_enc_at_input
        self.batch_first = batch_first

    def forward(self, curr, memory, curr_pos=None, memory_pos=None, num_obj_ptr_tokens=0):
        """Sequence-first (HW x B x C) in and out."""
        if isinstance(curr, list):
            assert isinstance(curr_pos, list) and len(curr) == len(curr_pos) == 1
            curr, curr_pos = curr[0], curr_pos[0]
        assert curr.shape[1] == memory.shape[1], "Batch size must be the same for curr and memory"
        out = curr
        if self.pos_enc_at_input and curr_pos is not None:
            out = out + 0.1 * curr_pos
        if self.batch_first:
            out, curr_pos = out.transpose(0, 1), curr_pos.transpose(0, 1)
            memory, memory_pos = memory.transpose(0, 1), memory_pos.transpose(0, 1)
        for layer in self.layers:
            kwds = ({"num_k_exclude_rope": num_obj_ptr_tokens} if isinstance(layer.cross_attn_image, RoPEAttention)
                    else {})
            out = layer(tgt=out, memory=memory, pos=memory_pos, query_pos=curr_pos, **kwds)
        out = self.norm(out)
        return out.transpose(0, 1) if self.batch_first else out


class MaskDownSampler(nn.Module):
    """Strided convs (channels x stride^2 each) down to ``total_stride``, then a 1x1 conv to ``embed_dim``."""

    def __init__(self, embed_dim=256, kernel_size=4, stride=4, padding=0, total_stride=16, activation=nn.GELU):
        super().__init__()
        num_layers = int(math.log2(total_stride) // math.log2(stride))
        assert stride ** num_layers == total_stride
        self.encoder = nn.Sequential()
        cin = cout = 1
        for _ in range(num_layers):
            cout = cin * stride ** 2
            self.encoder.append(nn.Conv2d(cin, cout, kernel_size=kernel_size, stride=stride, padding=padding))
            self.encoder.append(LayerNorm2d(cout))
            self.encoder.append(activation())
            cin = cout
        self.encoder.append(nn.Conv2d(cout, embed_dim, kernel_size=1))

    def forward(self, x):
        return self.encoder(x)


class CXBlock(nn.Module):
    """ConvNeXt block: depthwise conv, channel LayerNorm, pointwise MLP (as Linear on channels-last), layer scale."""

    def __init__(self, dim, kernel_size=7, padding=3, drop_path=0.0, layer_scale_init_value=1e-6, use_dwconv=True):
        super().__init__()
        if drop_path > 0.0:
            raise NotImplementedError("CXBlock: drop_path > 0 (upstream's SAM2 builds the fuser with 0)")
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=kernel_size, padding=padding, groups=dim if use_dwconv else 1)
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.g_weight = (nn.Parameter(layer_scale_init_value * torch.ones(dim), requires_grad=True)
                         if layer_scale_init_value > 0 else None)
        self.drop_path = nn.Identity()

    def forward(self, x):
        y = self.norm(self.dwconv(x)).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.g_weight is not None:
            y = self.g_weight * y
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class Fuser(nn.Module):
    def __init__(self, layer, num_layers, dim=None, input_projection=False):
        super().__init__()
        self.proj = nn.Identity()
        self.layers = get_clones(layer, num_layers)
        if input_projection:
            assert dim is not None
            self.proj = nn.Conv2d(dim, dim, kernel_size=1)

    def forward(self, x):
        x = self.proj(x)
        for layer in self.layers:
            x = layer(x)
        return x


class MemoryEncoder(nn.Module):
    """Image features + downsampled mask -> fused memory features (``out_dim`` channels) and their positions."""

    def __init__(self, out_dim, mask_downsampler, fuser, position_encoding, in_dim=256):
        super().__init__()
        self.mask_downsampler = mask_downsampler
        self.pix_feat_proj = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.fuser = fuser
        self.position_encoding = position_encoding
        self.out_proj = nn.Identity() if out_dim == in_dim else nn.Conv2d(in_dim, out_dim, kernel_size=1)

    def forward(self, pix_feat, masks, skip_mask_sigmoid=False):
        if not skip_mask_sigmoid:
            masks = F.sigmoid(masks)
        masks = self.mask_downsampler(masks)
        x = self.pix_feat_proj(pix_feat.to(masks.device)) + masks
        x = self.out_proj(self.fuser(x))
        return {"vision_features": x, "vision_pos_enc": [self.position_encoding(x).to(x.dtype)]}


# ------------------------------------------------------------------------------------------------- SAM2 model
class SAM2Base_(nn.Module):
    """SAM2's model: image encoder, prompt encoder + mask decoder, memory attention and memory encoder."""

    def __init__(self, image_encoder, memory_attention, memory_encoder, num_maskmem=7, image_size=512,
                 backbone_stride=16, sigmoid_scale_for_mem_enc=1.0, sigmoid_bias_for_mem_enc=0.0,
                 binarize_mask_from_pts_for_mem_enc=False, use_mask_input_as_output_without_sam=False,
                 max_cond_frames_in_attn=-1, directly_add_no_mem_embed=False, use_high_res_features_in_sam=False,
                 multimask_output_in_sam=False, multimask_min_pt_num=1, multimask_max_pt_num=1,
                 multimask_output_for_tracking=False, use_multimask_token_for_obj_ptr=False,
                 iou_prediction_use_sigmoid=False, memory_temporal_stride_for_eval=1,
                 add_all_frames_to_correct_as_cond=False, non_overlap_masks_for_mem_enc=False,
                 use_obj_ptrs_in_encoder=False, max_obj_ptrs_in_encoder=16, add_tpos_enc_to_obj_ptrs=True,
                 proj_tpos_enc_in_obj_ptrs=False, only_obj_ptrs_in_the_past_for_eval=False, pred_obj_scores=False,
                 pred_obj_scores_mlp=False, fixed_no_obj_ptr=False, soft_no_obj_ptr=False,
                 use_mlp_for_obj_ptr_proj=False, sam_mask_decoder_extra_args=None, compile_image_encoder=False):
        super().__init__()
        if compile_image_encoder:
            raise NotImplementedError("SAM2Base_: compile_image_encoder (upstream's SAM2 builds with False)")
        self.image_encoder = image_encoder
        self.use_high_res_features_in_sam = use_high_res_features_in_sam
        self.num_feature_levels = 3 if use_high_res_features_in_sam else 1
        self.use_obj_ptrs_in_encoder = use_obj_ptrs_in_encoder
        self.max_obj_ptrs_in_encoder = max_obj_ptrs_in_encoder
        if use_obj_ptrs_in_encoder:
            self.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)
        self.add_tpos_enc_to_obj_ptrs = add_tpos_enc_to_obj_ptrs
        if proj_tpos_enc_in_obj_ptrs:
            assert add_tpos_enc_to_obj_ptrs
        self.proj_tpos_enc_in_obj_ptrs = proj_tpos_enc_in_obj_ptrs
        self.only_obj_ptrs_in_the_past_for_eval = only_obj_ptrs_in_the_past_for_eval

        self.memory_attention = memory_attention
        self.hidden_dim = memory_attention.d_model
        self.memory_encoder = memory_encoder
        self.mem_dim = self.hidden_dim
        if hasattr(memory_encoder, "out_proj") and hasattr(memory_encoder.out_proj, "weight"):
            self.mem_dim = memory_encoder.out_proj.weight.shape[0]  # memories are compressed
        self.num_maskmem = num_maskmem
        self.maskmem_tpos_enc = nn.Parameter(torch.zeros(num_maskmem, 1, 1, self.mem_dim))
        trunc_normal_(self.maskmem_tpos_enc, std=0.02)
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, self.hidden_dim))
        self.no_mem_pos_enc = nn.Parameter(torch.zeros(1, 1, self.hidden_dim))
        trunc_normal_(self.no_mem_embed, std=0.02)
        trunc_normal_(self.no_mem_pos_enc, std=0.02)
        self.directly_add_no_mem_embed = directly_add_no_mem_embed
        self.sigmoid_scale_for_mem_enc = sigmoid_scale_for_mem_enc
        self.sigmoid_bias_for_mem_enc = sigmoid_bias_for_mem_enc
        self.binarize_mask_from_pts_for_mem_enc = binarize_mask_from_pts_for_mem_enc
        self.non_overlap_masks_for_mem_enc = non_overlap_masks_for_mem_enc
        self.memory_temporal_stride_for_eval = memory_temporal_stride_for_eval
        self.use_mask_input_as_output_without_sam = use_mask_input_as_output_without_sam
        self.multimask_output_in_sam = multimask_output_in_sam
        self.multimask_min_pt_num = multimask_min_pt_num
        self.multimask_max_pt_num = multimask_max_pt_num
        self.multimask_output_for_tracking = multimask_output_for_tracking
        self.use_multimask_token_for_obj_ptr = use_multimask_token_for_obj_ptr
        self.iou_prediction_use_sigmoid = iou_prediction_use_sigmoid

        self.image_size = image_size
        self.backbone_stride = backbone_stride
        self.sam_mask_decoder_extra_args = sam_mask_decoder_extra_args
        self.pred_obj_scores = pred_obj_scores
        self.pred_obj_scores_mlp = pred_obj_scores_mlp
        self.fixed_no_obj_ptr = fixed_no_obj_ptr
        self.soft_no_obj_ptr = soft_no_obj_ptr
        if fixed_no_obj_ptr:
            assert pred_obj_scores and use_obj_ptrs_in_encoder
        if pred_obj_scores and use_obj_ptrs_in_encoder:
            self.no_obj_ptr = nn.Parameter(torch.zeros(1, self.hidden_dim))
            trunc_normal_(self.no_obj_ptr, std=0.02)
        self.use_mlp_for_obj_ptr_proj = use_mlp_for_obj_ptr_proj
        self._build_sam_heads()
        self.add_all_frames_to_correct_as_cond = add_all_frames_to_correct_as_cond
        self.max_cond_frames_in_attn = max_cond_frames_in_attn

    @property
    def device(self):
        return next(self.parameters()).device

    def forward(self, *args, **kwargs):
        raise NotImplementedError("SAM2Base_.forward: use SAM2VideoPredictor's methods")

    def _build_sam_heads(self):
        self.sam_prompt_embed_dim = self.hidden_dim
        self.sam_image_embedding_size = self.image_size // self.backbone_stride
        side = self.sam_image_embedding_size
        self.sam_prompt_encoder = PromptEncoder(embed_dim=self.hidden_dim, image_embedding_size=(side, side),
                                                input_image_size=(self.image_size, self.image_size), mask_in_chans=16)
        self.sam_mask_decoder = MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=self.hidden_dim, mlp_dim=2048, num_heads=8),
            transformer_dim=self.hidden_dim, iou_head_depth=3, iou_head_hidden_dim=256,
            use_high_res_features=self.use_high_res_features_in_sam,
            iou_prediction_use_sigmoid=self.iou_prediction_use_sigmoid, pred_obj_scores=self.pred_obj_scores,
            pred_obj_scores_mlp=self.pred_obj_scores_mlp,
            use_multimask_token_for_obj_ptr=self.use_multimask_token_for_obj_ptr,
            **(self.sam_mask_decoder_extra_args or {}))
        if self.use_obj_ptrs_in_encoder:
            self.obj_ptr_proj = (MLP(self.hidden_dim, self.hidden_dim, self.hidden_dim, 3)
                                 if self.use_mlp_for_obj_ptr_proj else nn.Linear(self.hidden_dim, self.hidden_dim))
        else:
            self.obj_ptr_proj = nn.Identity()
        self.obj_ptr_tpos_proj = (nn.Linear(self.hidden_dim, self.mem_dim) if self.proj_tpos_enc_in_obj_ptrs
                                  else nn.Identity())

    def _use_mask_as_output(self, backbone_features, high_res_features, mask_inputs):
        raise NotImplementedError("SAM2Base_._use_mask_as_output: mask inputs are not on Sa2VA's paths")

    def forward_image(self, img_batch):
        backbone_out = self.image_encoder(img_batch)
        if self.use_high_res_features_in_sam:
            # the decoder's stride-4 and stride-8 projections are applied once here, not on every prompt
            backbone_out["backbone_fpn"][0] = self.sam_mask_decoder.conv_s0(backbone_out["backbone_fpn"][0])
            backbone_out["backbone_fpn"][1] = self.sam_mask_decoder.conv_s1(backbone_out["backbone_fpn"][1])
        return backbone_out

    def _prepare_backbone_features(self, backbone_out):
        """The last ``num_feature_levels`` levels, flattened to HW x B x C, with their positions and sizes."""
        backbone_out = backbone_out.copy()
        assert len(backbone_out["backbone_fpn"]) == len(backbone_out["vision_pos_enc"])
        assert len(backbone_out["backbone_fpn"]) >= self.num_feature_levels
        maps = backbone_out["backbone_fpn"][-self.num_feature_levels:]
        pos = backbone_out["vision_pos_enc"][-self.num_feature_levels:]
        feat_sizes = [(x.shape[-2], x.shape[-1]) for x in pos]
        return (backbone_out, [x.flatten(2).permute(2, 0, 1) for x in maps],
                [x.flatten(2).permute(2, 0, 1) for x in pos], feat_sizes)

    def _prepare_memory_conditioned_features(self, frame_idx, is_init_cond_frame, current_vision_feats,
                                             current_vision_pos_embeds, feat_sizes, output_dict, num_frames,
                                             track_in_reverse=False):
        b, c = current_vision_feats[-1].size(1), self.hidden_dim
        h, w = feat_sizes[-1]
        if self.num_maskmem == 0:
            return current_vision_feats[-1].permute(1, 2, 0).view(b, c, h, w)
        if not is_init_cond_frame:
            raise NotImplementedError("SAM2Base_._prepare_memory_conditioned_features: tracking a frame that is not "
                                      "a conditioning frame (memories of earlier frames) is not on Sa2VA's paths")
        if not self.directly_add_no_mem_embed:
            raise NotImplementedError("SAM2Base_._prepare_memory_conditioned_features: directly_add_no_mem_embed="
                                      "False (upstream's SAM2 builds with True)")
        # a conditioning frame has no memories: the "no memory" embedding is added instead
        return (current_vision_feats[-1] + self.no_mem_embed).permute(1, 2, 0).view(b, c, h, w)

    def _encode_new_memory(self, current_vision_feats, feat_sizes, pred_masks_high_res, is_mask_from_pts):
        b, c = current_vision_feats[-1].size(1), self.hidden_dim
        h, w = feat_sizes[-1]
        pix_feat = current_vision_feats[-1].permute(1, 2, 0).view(b, c, h, w)
        if self.non_overlap_masks_for_mem_enc and not self.training:
            pred_masks_high_res = self._apply_non_overlapping_constraints(pred_masks_high_res)
        if self.binarize_mask_from_pts_for_mem_enc and is_mask_from_pts and not self.training:
            mask_for_mem = (pred_masks_high_res > 0).float()
        else:
            mask_for_mem = torch.sigmoid(pred_masks_high_res)
        if self.sigmoid_scale_for_mem_enc != 1.0:
            mask_for_mem = mask_for_mem * self.sigmoid_scale_for_mem_enc
        if self.sigmoid_bias_for_mem_enc != 0.0:
            mask_for_mem = mask_for_mem + self.sigmoid_bias_for_mem_enc
        out = self.memory_encoder(pix_feat, mask_for_mem, skip_mask_sigmoid=True)
        return out["vision_features"], out["vision_pos_enc"]

    def _use_multimask(self, is_init_cond_frame, point_inputs):
        num_pts = 0 if point_inputs is None else point_inputs["point_labels"].size(1)
        return (self.multimask_output_in_sam and (is_init_cond_frame or self.multimask_output_for_tracking)
                and self.multimask_min_pt_num <= num_pts <= self.multimask_max_pt_num)

    def _apply_non_overlapping_constraints(self, pred_masks):
        raise NotImplementedError("SAM2Base_._apply_non_overlapping_constraints: off in upstream's SAM2")


class SAM2Base(SAM2Base_):
    """Sa2VA's extension: a language embedding joins the SAM prompts."""

    def track_step(self, frame_idx, is_init_cond_frame, current_vision_feats, current_vision_pos_embeds, feat_sizes,
                   point_inputs, mask_inputs, output_dict, num_frames, track_in_reverse=False, run_mem_encoder=True,
                   prev_sam_mask_logits=None, language_embd=None):
        current_out = {"point_inputs": point_inputs, "mask_inputs": mask_inputs}
        high_res_features = None
        if len(current_vision_feats) > 1:
            high_res_features = [x.permute(1, 2, 0).view(x.size(1), x.size(2), *s)
                                 for x, s in zip(current_vision_feats[:-1], feat_sizes[:-1])]
        if mask_inputs is not None and self.use_mask_input_as_output_without_sam:
            pix_feat = current_vision_feats[-1].permute(1, 2, 0).view(-1, self.hidden_dim, *feat_sizes[-1])
            sam_outputs = self._use_mask_as_output(pix_feat, high_res_features, mask_inputs)
        else:
            pix_feat_with_mem = self._prepare_memory_conditioned_features(
                frame_idx=frame_idx, is_init_cond_frame=is_init_cond_frame,
                current_vision_feats=current_vision_feats[-1:], current_vision_pos_embeds=current_vision_pos_embeds[-1:],
                feat_sizes=feat_sizes[-1:], output_dict=output_dict, num_frames=num_frames,
                track_in_reverse=track_in_reverse)
            if prev_sam_mask_logits is not None:
                # previous logits are only meant to refine clicks: a second language prompt fails here upstream
                assert point_inputs is not None and mask_inputs is None
                mask_inputs = prev_sam_mask_logits
            sam_outputs = self._forward_sam_heads(
                backbone_features=pix_feat_with_mem, point_inputs=point_inputs, mask_inputs=mask_inputs,
                high_res_features=high_res_features,
                multimask_output=self._use_multimask(is_init_cond_frame, point_inputs), language_embd=language_embd)
        _, _, _, low_res_masks, high_res_masks, obj_ptr, _ = sam_outputs
        current_out["pred_masks"] = low_res_masks
        current_out["pred_masks_high_res"] = high_res_masks
        current_out["obj_ptr"] = obj_ptr
        current_out["maskmem_features"] = current_out["maskmem_pos_enc"] = None
        if run_mem_encoder and self.num_maskmem > 0:
            current_out["maskmem_features"], current_out["maskmem_pos_enc"] = self._encode_new_memory(
                current_vision_feats=current_vision_feats, feat_sizes=feat_sizes,
                pred_masks_high_res=high_res_masks, is_mask_from_pts=point_inputs is not None)
        return current_out

    def _forward_sam_heads(self, backbone_features, point_inputs=None, mask_inputs=None, high_res_features=None,
                           multimask_output=False, language_embd=None):
        """Prompt encoder (+ the language embedding as extra sparse tokens) and mask decoder on B x C x H x W
        features: (low-res multimasks, their bilinear upsampling to ``image_size``, IoUs, the best low-res mask,
        its upsampling, the object pointer, object-score logits)."""
        b, device = backbone_features.size(0), backbone_features.device
        assert backbone_features.size(1) == self.sam_prompt_embed_dim
        assert backbone_features.size(2) == self.sam_image_embedding_size
        assert backbone_features.size(3) == self.sam_image_embedding_size
        if point_inputs is not None:
            coords, labels = point_inputs["point_coords"], point_inputs["point_labels"]
            assert coords.size(0) == b and labels.size(0) == b
        else:  # an empty point (label -1) stands in
            coords = torch.zeros(b, 1, 2, device=device)
            labels = -torch.ones(b, 1, dtype=torch.int32, device=device)
        mask_prompt = None
        if mask_inputs is not None:
            assert len(mask_inputs.shape) == 4 and mask_inputs.shape[:2] == (b, 1)
            mask_prompt = mask_inputs
            if mask_inputs.shape[-2:] != self.sam_prompt_encoder.mask_input_size:
                mask_prompt = F.interpolate(mask_inputs.float(), size=self.sam_prompt_encoder.mask_input_size,
                                            align_corners=False, mode="bilinear", antialias=True)
        sparse, dense = self.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=mask_prompt)
        if language_embd is not None:  # B x N x C, no dtype reconciliation (torch.cat promotes)
            assert sparse.size(0) == language_embd.size(0) and sparse.size(2) == language_embd.size(2)
            sparse = torch.cat([sparse, language_embd], dim=1)
        low_res_multimasks, ious, sam_output_tokens, object_score_logits = self.sam_mask_decoder(
            image_embeddings=backbone_features, image_pe=self.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask_output,
            repeat_image=False, high_res_features=high_res_features)
        if self.pred_obj_scores:
            # Sa2VA leaves the "no object" overwrite (every logit -> NO_OBJ_SCORE) commented out: only the object
            # pointer below uses the score
            is_obj_appearing = object_score_logits > 0
        dtype = low_res_multimasks.dtype  # the low-res masks keep the decoder's dtype; upsampling runs in float32
        high_res_multimasks = F.interpolate(low_res_multimasks.float(), size=(self.image_size, self.image_size),
                                            mode="bilinear", align_corners=False).to(dtype)
        sam_output_token = sam_output_tokens[:, 0]
        if multimask_output:
            best = torch.argmax(ious, dim=-1)
            rows = torch.arange(b, device=device)
            low_res_masks = low_res_multimasks[rows, best].unsqueeze(1)
            high_res_masks = high_res_multimasks[rows, best].unsqueeze(1)
            if sam_output_tokens.size(1) > 1:
                sam_output_token = sam_output_tokens[rows, best]
        else:
            low_res_masks, high_res_masks = low_res_multimasks, high_res_multimasks
        obj_ptr = self.obj_ptr_proj(sam_output_token)
        if self.pred_obj_scores:
            if self.soft_no_obj_ptr:
                raise NotImplementedError("SAM2Base._forward_sam_heads: soft_no_obj_ptr (off in upstream's SAM2)")
            appearing = is_obj_appearing.float()
            if self.fixed_no_obj_ptr:
                obj_ptr = appearing * obj_ptr
            obj_ptr = obj_ptr + (1 - appearing) * self.no_obj_ptr
        return (low_res_multimasks, high_res_multimasks, ious, low_res_masks, high_res_masks, obj_ptr,
                object_score_logits)


# ------------------------------------------------------------------------------------ video predictor (state)
def _obj_id_to_idx(inference_state, obj_id):
    idx = inference_state["obj_id_to_idx"].get(obj_id)
    if idx is not None:
        return idx
    if inference_state["tracking_has_started"]:
        raise RuntimeError(f"Cannot add new object id {obj_id} after tracking starts. All existing object ids: "
                           f"{inference_state['obj_ids']}. Please call 'reset_state' to restart from scratch.")
    idx = len(inference_state["obj_id_to_idx"])
    inference_state["obj_id_to_idx"][obj_id] = idx
    inference_state["obj_idx_to_id"][idx] = obj_id
    inference_state["obj_ids"] = list(inference_state["obj_id_to_idx"])
    inference_state["point_inputs_per_obj"][idx] = {}
    inference_state["mask_inputs_per_obj"][idx] = {}
    for key in ("output_dict_per_obj", "temp_output_dict_per_obj"):
        inference_state[key][idx] = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    return idx


def _get_maskmem_pos_enc(inference_state, current_out):
    """The memory positions are the same for every frame and object: one copy is kept in the state's constants."""
    out_pos = current_out["maskmem_pos_enc"]
    if out_pos is None:
        return None
    constants = inference_state["constants"]
    if "maskmem_pos_enc" not in constants:
        assert isinstance(out_pos, list)
        constants["maskmem_pos_enc"] = [x[0:1].clone() for x in out_pos]
    return [x.expand(out_pos[0].size(0), -1, -1, -1) for x in constants["maskmem_pos_enc"]]


def _get_obj_num(inference_state):
    return len(inference_state["obj_idx_to_id"])


class SAM2VideoPredictor(SAM2Base):
    """The inference-state machinery Sa2VA drives: every prompted frame is a conditioning frame."""

    def __init__(self, fill_hole_area=0, non_overlap_masks=False, clear_non_cond_mem_around_input=False,
                 clear_non_cond_mem_for_multi_obj=False, **kwargs):
        super().__init__(**kwargs)
        self.fill_hole_area = fill_hole_area
        self.non_overlap_masks = non_overlap_masks
        self.clear_non_cond_mem_around_input = clear_non_cond_mem_around_input
        self.clear_non_cond_mem_for_multi_obj = clear_non_cond_mem_for_multi_obj

    def init_state(self, images):
        """A fresh state for a stack of preprocessed frames (N x 3 x S x S); no features are computed yet."""
        return {
            "images": images, "num_frames": len(images), "offload_video_to_cpu": False,
            "offload_state_to_cpu": False,
            # the "video" is the square model input: masks come back at image_size x image_size
            "video_height": self.image_size, "video_width": self.image_size,
            "device": torch.device("cuda"), "storage_device": torch.device("cuda"),  # hard-coded upstream
            "point_inputs_per_obj": {}, "mask_inputs_per_obj": {}, "cached_features": {}, "constants": {},
            "obj_id_to_idx": OrderedDict(), "obj_idx_to_id": OrderedDict(), "obj_ids": [],
            "output_dict": {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}},
            "output_dict_per_obj": {}, "temp_output_dict_per_obj": {},
            "consolidated_frame_inds": {"cond_frame_outputs": set(), "non_cond_frame_outputs": set()},
            "tracking_has_started": False, "frames_already_tracked": {},
        }

    def _get_image_feature(self, inference_state, frame_idx, batch_size):
        image, backbone_out = inference_state["cached_features"].get(frame_idx, (None, None))
        if backbone_out is None:
            image = inference_state["images"][frame_idx].cuda().unsqueeze(0)
            backbone_out = self.forward_image(image)
            inference_state["cached_features"] = {frame_idx: (image, backbone_out)}  # the latest frame only
        expanded = {"backbone_fpn": [x.expand(batch_size, -1, -1, -1) for x in backbone_out["backbone_fpn"]],
                    "vision_pos_enc": [x.expand(batch_size, -1, -1, -1) for x in backbone_out["vision_pos_enc"]]}
        return (image.expand(batch_size, -1, -1, -1),) + self._prepare_backbone_features(expanded)

    def _run_single_frame_inference(self, inference_state, output_dict, frame_idx, batch_size, is_init_cond_frame,
                                    point_inputs, mask_inputs, reverse, run_mem_encoder, prev_sam_mask_logits=None,
                                    language_embd=None):
        _, _, feats, pos, sizes = self._get_image_feature(inference_state, frame_idx, batch_size)
        assert point_inputs is None or mask_inputs is None
        current_out = self.track_step(
            frame_idx=frame_idx, is_init_cond_frame=is_init_cond_frame, current_vision_feats=feats,
            current_vision_pos_embeds=pos, feat_sizes=sizes, point_inputs=point_inputs, mask_inputs=mask_inputs,
            output_dict=output_dict, num_frames=inference_state["num_frames"], track_in_reverse=reverse,
            run_mem_encoder=run_mem_encoder, prev_sam_mask_logits=prev_sam_mask_logits, language_embd=language_embd)
        storage_device = inference_state["storage_device"]
        maskmem_features = current_out["maskmem_features"]
        if maskmem_features is not None:  # memories are stored in bfloat16
            maskmem_features = maskmem_features.to(torch.bfloat16).to(storage_device, non_blocking=True)
        pred_masks_gpu = current_out["pred_masks"]
        if self.fill_hole_area > 0:
            raise NotImplementedError("SAM2VideoPredictor: fill_hole_area > 0 (upstream compiles a CUDA kernel "
                                      "fetched at run time; off in its SAM2)")
        compact = {"maskmem_features": maskmem_features,
                   "maskmem_pos_enc": _get_maskmem_pos_enc(inference_state, current_out),
                   "pred_masks": pred_masks_gpu.to(storage_device, non_blocking=True),
                   "obj_ptr": current_out["obj_ptr"]}
        return compact, pred_masks_gpu

    def _consolidate_temp_output_across_obj(self, inference_state, frame_idx, is_cond, run_mem_encoder,
                                            consolidate_at_video_res=False):
        """One output for all objects on a frame: masks at low resolution (NO_OBJ_SCORE where an object has
        none), object pointers, and, with ``run_mem_encoder``, the memory of the upsampled masks."""
        batch_size = _get_obj_num(inference_state)
        storage_key = "cond_frame_outputs" if is_cond else "non_cond_frame_outputs"
        if consolidate_at_video_res:
            assert not run_mem_encoder, "memory encoder cannot run at video resolution"
            height, width, mask_key = inference_state["video_height"], inference_state["video_width"], \
                "pred_masks_video_res"
        else:
            height = width = self.image_size // 4
            mask_key = "pred_masks"
        out = {"maskmem_features": None, "maskmem_pos_enc": None,
               mask_key: torch.full((batch_size, 1, height, width), NO_OBJ_SCORE, dtype=torch.float32,
                                    device=inference_state["storage_device"]),
               "obj_ptr": torch.full((batch_size, self.hidden_dim), NO_OBJ_SCORE, dtype=torch.float32,
                                     device=inference_state["device"])}
        for obj_idx in range(batch_size):
            obj_out = inference_state["temp_output_dict_per_obj"][obj_idx][storage_key].get(frame_idx)
            per_obj = inference_state["output_dict_per_obj"][obj_idx]
            if obj_out is None:
                obj_out = per_obj["cond_frame_outputs"].get(frame_idx)
            if obj_out is None:
                obj_out = per_obj["non_cond_frame_outputs"].get(frame_idx)
            if obj_out is None:
                if run_mem_encoder:
                    # upstream calls a method it never defines here: AttributeError, as there
                    out["obj_ptr"][obj_idx: obj_idx + 1] = self._get_empty_mask_ptr(inference_state, frame_idx)
                continue
            target = out[mask_key]
            mask = obj_out["pred_masks"]
            if mask.shape[-2:] != target.shape[-2:]:
                mask = F.interpolate(mask, size=target.shape[-2:], mode="bilinear", align_corners=False)
            target[obj_idx: obj_idx + 1] = mask
            out["obj_ptr"][obj_idx: obj_idx + 1] = obj_out["obj_ptr"]
        if run_mem_encoder:
            high_res_masks = F.interpolate(out["pred_masks"].to(inference_state["device"], non_blocking=True),
                                           size=(self.image_size, self.image_size), mode="bilinear",
                                           align_corners=False)
            if self.non_overlap_masks_for_mem_enc:
                high_res_masks = self._apply_non_overlapping_constraints(high_res_masks)
            out["maskmem_features"], out["maskmem_pos_enc"] = self._run_memory_encoder(
                inference_state=inference_state, frame_idx=frame_idx, batch_size=batch_size,
                high_res_masks=high_res_masks, is_mask_from_pts=True)
        return out

    def _get_orig_video_res_output(self, inference_state, any_res_masks):
        any_res_masks = any_res_masks.to(inference_state["device"], non_blocking=True)
        size = (inference_state["video_height"], inference_state["video_width"])
        video_res_masks = any_res_masks if any_res_masks.shape[-2:] == size else F.interpolate(
            any_res_masks, size=size, mode="bilinear", align_corners=False)
        if self.non_overlap_masks:
            video_res_masks = self._apply_non_overlapping_constraints(video_res_masks)
        return any_res_masks, video_res_masks

    def add_language_embd(self, inference_state, frame_idx, obj_id, language_embd, inference=False):
        """Prompt object ``obj_id`` on ``frame_idx`` with a 1 x 1 x C language embedding; its low-res logits."""
        obj_idx = _obj_id_to_idx(inference_state, obj_id)
        is_init_cond_frame = frame_idx not in inference_state["frames_already_tracked"]
        reverse = False if is_init_cond_frame else inference_state["frames_already_tracked"][frame_idx]["reverse"]
        obj_output_dict = inference_state["output_dict_per_obj"][obj_idx]
        obj_temp_output_dict = inference_state["temp_output_dict_per_obj"][obj_idx]
        is_cond = is_init_cond_frame or self.add_all_frames_to_correct_as_cond
        storage_key = "cond_frame_outputs" if is_cond else "non_cond_frame_outputs"
        prev_out = obj_temp_output_dict[storage_key].get(frame_idx)
        if prev_out is None:
            prev_out = obj_output_dict["cond_frame_outputs"].get(frame_idx)
            if prev_out is None:
                prev_out = obj_output_dict["non_cond_frame_outputs"].get(frame_idx)
        prev_sam_mask_logits = None
        if prev_out is not None and prev_out["pred_masks"] is not None:
            prev_sam_mask_logits = torch.clamp(prev_out["pred_masks"].cuda(non_blocking=True), -32.0, 32.0)
        current_out, pred_mask_gpu = self._run_single_frame_inference(
            inference_state=inference_state, output_dict=obj_output_dict, frame_idx=frame_idx, batch_size=1,
            is_init_cond_frame=is_init_cond_frame, point_inputs=None, mask_inputs=None, reverse=reverse,
            run_mem_encoder=False,  # memories are encoded once all objects are in, in propagate_in_video
            prev_sam_mask_logits=prev_sam_mask_logits, language_embd=language_embd)
        obj_temp_output_dict[storage_key][frame_idx] = current_out
        if inference:  # upstream consolidates here and discards the result
            self._consolidate_temp_output_across_obj(inference_state, frame_idx, is_cond=is_cond,
                                                     run_mem_encoder=False, consolidate_at_video_res=False)
        return frame_idx, inference_state["obj_ids"], pred_mask_gpu

    def _clear_non_cond_mem_around_input(self, inference_state, frame_idx):
        raise NotImplementedError("SAM2VideoPredictor._clear_non_cond_mem_around_input: off in upstream's SAM2")

    def _run_memory_encoder(self, inference_state, frame_idx, batch_size, high_res_masks, is_mask_from_pts):
        _, _, feats, _, sizes = self._get_image_feature(inference_state, frame_idx, batch_size)
        features, pos = self._encode_new_memory(current_vision_feats=feats, feat_sizes=sizes,
                                                pred_masks_high_res=high_res_masks,
                                                is_mask_from_pts=is_mask_from_pts)
        features = features.to(torch.bfloat16).to(inference_state["storage_device"], non_blocking=True)
        return features, _get_maskmem_pos_enc(inference_state, {"maskmem_pos_enc": pos})

    def _add_output_per_object(self, inference_state, frame_idx, current_out, storage_key):
        """Per-object views of a consolidated output."""
        features, pos = current_out["maskmem_features"], current_out["maskmem_pos_enc"]
        assert features is None or isinstance(features, torch.Tensor)
        assert pos is None or isinstance(pos, list)
        for obj_idx, obj_output_dict in inference_state["output_dict_per_obj"].items():
            sl = slice(obj_idx, obj_idx + 1)
            obj_output_dict[storage_key][frame_idx] = {
                "maskmem_features": None if features is None else features[sl],
                "maskmem_pos_enc": None if pos is None else [x[sl] for x in pos],
                "pred_masks": current_out["pred_masks"][sl], "obj_ptr": current_out["obj_ptr"][sl]}

    @torch.inference_mode()
    def propagate_in_video_preflight(self, inference_state):
        """Consolidate the prompted frames (encoding their memories) into ``output_dict``."""
        inference_state["tracking_has_started"] = True
        batch_size = _get_obj_num(inference_state)
        temp = inference_state["temp_output_dict_per_obj"]
        output_dict = inference_state["output_dict"]
        consolidated = inference_state["consolidated_frame_inds"]
        for is_cond in (False, True):
            key = "cond_frame_outputs" if is_cond else "non_cond_frame_outputs"
            frames = set()
            for obj_temp in temp.values():
                frames.update(obj_temp[key].keys())
            consolidated[key].update(frames)
            for frame_idx in frames:
                out = self._consolidate_temp_output_across_obj(inference_state, frame_idx, is_cond=is_cond,
                                                               run_mem_encoder=True)
                output_dict[key][frame_idx] = out
                self._add_output_per_object(inference_state, frame_idx, out, key)
                if self.clear_non_cond_mem_around_input and (self.clear_non_cond_mem_for_multi_obj
                                                             or batch_size <= 1):
                    self._clear_non_cond_mem_around_input(inference_state, frame_idx)
            for obj_temp in temp.values():
                obj_temp[key].clear()
        # a frame that became a conditioning frame leaves the non-conditioning outputs
        for frame_idx in output_dict["cond_frame_outputs"]:
            output_dict["non_cond_frame_outputs"].pop(frame_idx, None)
        for obj_output_dict in inference_state["output_dict_per_obj"].values():
            for frame_idx in obj_output_dict["cond_frame_outputs"]:
                obj_output_dict["non_cond_frame_outputs"].pop(frame_idx, None)
        for frame_idx in consolidated["cond_frame_outputs"]:
            assert frame_idx in output_dict["cond_frame_outputs"]
            consolidated["non_cond_frame_outputs"].discard(frame_idx)

    @torch.inference_mode()
    def propagate_in_video(self, inference_state, start_frame_idx=None, max_frame_num_to_track=None, reverse=False):
        """Yields (frame index, object ids, B_obj x 1 x video_H x video_W logits) per frame."""
        self.propagate_in_video_preflight(inference_state)
        output_dict = inference_state["output_dict"]
        consolidated = inference_state["consolidated_frame_inds"]
        obj_ids, num_frames = inference_state["obj_ids"], inference_state["num_frames"]
        batch_size = _get_obj_num(inference_state)
        if len(output_dict["cond_frame_outputs"]) == 0:
            raise RuntimeError("No points are provided; please add points first")
        clear_non_cond_mem = self.clear_non_cond_mem_around_input and (self.clear_non_cond_mem_for_multi_obj
                                                                       or batch_size <= 1)
        if start_frame_idx is None:
            start_frame_idx = min(output_dict["cond_frame_outputs"])
        if max_frame_num_to_track is None:
            max_frame_num_to_track = num_frames
        if reverse:
            end = max(start_frame_idx - max_frame_num_to_track, 0)
            order = range(start_frame_idx, end - 1, -1) if start_frame_idx > 0 else []
        else:
            order = range(start_frame_idx, min(start_frame_idx + max_frame_num_to_track, num_frames - 1) + 1)
        for frame_idx in order:
            if frame_idx in consolidated["cond_frame_outputs"]:
                key = "cond_frame_outputs"
                current_out = output_dict[key][frame_idx]
                if clear_non_cond_mem:
                    self._clear_non_cond_mem_around_input(inference_state, frame_idx)
            elif frame_idx in consolidated["non_cond_frame_outputs"]:
                key = "non_cond_frame_outputs"
                current_out = output_dict[key][frame_idx]
            else:
                key = "non_cond_frame_outputs"
                current_out, _ = self._run_single_frame_inference(
                    inference_state=inference_state, output_dict=output_dict, frame_idx=frame_idx,
                    batch_size=batch_size, is_init_cond_frame=False, point_inputs=None, mask_inputs=None,
                    reverse=reverse, run_mem_encoder=True)
                output_dict[key][frame_idx] = current_out
            self._add_output_per_object(inference_state, frame_idx, current_out, key)
            inference_state["frames_already_tracked"][frame_idx] = {"reverse": reverse}
            _, video_res_masks = self._get_orig_video_res_output(inference_state, current_out["pred_masks"])
            yield frame_idx, obj_ids, video_res_masks


# ----------------------------------------------------------------------------------------- Sa2VA's wrapper
class SAM2(nn.Module):
    """Sa2VA's ``grounding_encoder``: a SAM2 video predictor, hard-coded to Hiera-L at 1024 px upstream.

    ``size`` is the replica's only liberty (see the module docstring); ``ckpt_path`` loads a SAM2 checkpoint (a
    ``torch.load``-able dict, optionally under ``state_dict``/``model``) strictly, as upstream does.
    """

    def __init__(self, ckpt_path=None, size="hiera_l"):
        super().__init__()
        if size not in SIZES:
            raise ValueError(f"SAM2 size must be one of {sorted(SIZES)}, got {size!r}")
        self.replica_size = size
        sam2_model = SAM2VideoPredictor(
            image_encoder=self.build_image_encoder(), memory_attention=self.build_memory_attention(),
            memory_encoder=self.build_memory_encoder(), num_maskmem=7, image_size=1024,
            sigmoid_scale_for_mem_enc=20.0, sigmoid_bias_for_mem_enc=-10.0,
            use_mask_input_as_output_without_sam=True, directly_add_no_mem_embed=True,
            use_high_res_features_in_sam=True, multimask_output_in_sam=True, iou_prediction_use_sigmoid=True,
            use_obj_ptrs_in_encoder=True, add_tpos_enc_to_obj_ptrs=False, only_obj_ptrs_in_the_past_for_eval=True,
            pred_obj_scores=True, pred_obj_scores_mlp=True, fixed_no_obj_ptr=True,
            multimask_output_for_tracking=True, use_multimask_token_for_obj_ptr=True, multimask_min_pt_num=0,
            multimask_max_pt_num=1, use_mlp_for_obj_ptr_proj=True, compile_image_encoder=False,
            sam_mask_decoder_extra_args={"dynamic_multimask_via_stability": True,
                                         "dynamic_multimask_stability_delta": 0.05,
                                         "dynamic_multimask_stability_thresh": 0.98})
        if ckpt_path is not None:
            load_state_dict_to_model(sam2_model, load_checkpoint_with_prefix(ckpt_path))
        self.sam2_model = sam2_model
        self.hidden_dim = sam2_model.hidden_dim
        self.img_mean = (0.485, 0.456, 0.406)
        self.img_std = (0.229, 0.224, 0.225)

    @property
    def _dims(self):
        return SIZES[self.replica_size]

    def build_image_encoder(self):
        d = self._dims
        trunk = Hiera(embed_dim=d["embed_dim"], num_heads=d["num_heads"], head_mul=d["head_mul"], stages=list(d["stages"]),
                      global_att_blocks=list(d["global_att_blocks"]),
                      window_pos_embed_bkg_spatial_size=list(d["window_pos_embed_bkg_spatial_size"]),
                      window_spec=list(d["window_spec"]))
        neck = FpnNeck(position_encoding=PositionEmbeddingSine(num_pos_feats=d["d_model"], normalize=True,
                                                               temperature=10000),
                       d_model=d["d_model"], backbone_channel_list=[d["embed_dim"] * m for m in (8, 4, 2, 1)],
                       fpn_top_down_levels=[2, 3], fpn_interp_model="nearest")
        return ImageEncoder(scalp=1, trunk=trunk, neck=neck)

    def build_memory_attention(self):
        d = self._dims
        rope = dict(rope_theta=10000.0, feat_sizes=[32, 32], embedding_dim=d["d_model"],
                    num_heads=1, downsample_rate=1, dropout=0.1)
        layer = MemoryAttentionLayer(
            activation="relu", dim_feedforward=d["mem_attn_ffn"], dropout=0.1, pos_enc_at_attn=False,
            d_model=d["d_model"], pos_enc_at_cross_attn_queries=False, pos_enc_at_cross_attn_keys=True,
            self_attention=RoPEAttention(**rope),
            cross_attention=RoPEAttention(rope_k_repeat=True, kv_in_dim=d["mem_dim"], **rope))
        return MemoryAttention(d_model=d["d_model"], pos_enc_at_input=True, num_layers=4, layer=layer)

    def build_memory_encoder(self):
        d = self._dims
        fuser = Fuser(layer=CXBlock(dim=d["d_model"], kernel_size=7, padding=3, layer_scale_init_value=1e-6,
                                    use_dwconv=True), num_layers=2)
        return MemoryEncoder(out_dim=d["mem_dim"], in_dim=d["d_model"],
                             position_encoding=PositionEmbeddingSine(num_pos_feats=d["mem_dim"], normalize=True,
                                                                     temperature=10000),
                             mask_downsampler=MaskDownSampler(embed_dim=d["d_model"], kernel_size=3, stride=2,
                                                              padding=1),
                             fuser=fuser)

    def _prompt_frames(self, inference_state, language_embd, inference):
        """Every (frame, object) embedding as its own SAM prompt (object ids 100, 101, ...), each frame a
        conditioning frame; the low-res logits, frames x objects x h x w."""
        out = []
        for frame_idx in range(len(language_embd)):
            per_obj = [self.sam2_model.add_language_embd(inference_state, frame_idx, obj_idx + 100,
                                                         language_embd[frame_idx][obj_idx][None][None],
                                                         inference=inference)[2]
                       for obj_idx in range(len(language_embd[0]))]
            out.append(torch.cat(per_obj, dim=1))
        return torch.cat(out, dim=0)

    def inject_language_embd(self, inference_state, language_embd):
        return self._prompt_frames(inference_state, language_embd, inference=False)

    def language_embd_inference(self, inference_state, language_embd):
        """Masks at the "video" resolution (image_size), frames x objects x S x S, after memory consolidation."""
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            self._prompt_frames(inference_state, language_embd, inference=True)
            masks = [m for _, _, m in self.sam2_model.propagate_in_video(inference_state)]
            return torch.cat(masks, dim=0)

    def get_sam2_embeddings(self, images):
        return self.sam2_model.init_state(images)

    def forward(self, batch):
        raise NotImplementedError("SAM2.forward (as upstream): use get_sam2_embeddings / language_embd_inference")

    def preprocess_image(self, image, dtype=torch.bfloat16):
        """0-255 -> ImageNet-normalised; mean and std are made in ``dtype`` (bfloat16 unless given)."""
        image = image / 255.0
        image -= torch.tensor(self.img_mean, dtype=dtype, device=image.device)[:, None, None]
        image /= torch.tensor(self.img_std, dtype=dtype, device=image.device)[:, None, None]
        return image
