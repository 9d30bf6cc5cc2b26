"""A tiny SAM2 for the replica's ``grounding_encoder``, with the public SAM2 / Sa2VA attribute names and call flow.

Outline (facts from the public SAM2 code and Sa2VA's SAM2 wrapper; the code is written here):

- ``SAM2`` (Sa2VA's wrapper) holds ``sam2_model`` and ``hidden_dim``; ``preprocess_image`` scales a 0-255 image to
  [0, 1] and normalises with ImageNet mean/std; images arrive already resized to ``image_size`` x ``image_size``
  (Sa2VA: 1024, ignoring aspect ratio; here 256).
- ``sam2_model.forward_image`` runs ``image_encoder`` (trunk + FPN neck, the lowest level dropped) and projects the
  two high-resolution levels with the mask decoder's ``conv_s0`` / ``conv_s1``; ``_prepare_backbone_features``
  flattens them to (HW) x B x C.
- The image embedding is ``image_size / backbone_stride`` (64 in Sa2VA, 16 here); the mask decoder upsamples it
  4x, so low-resolution logits are 256 x 256 in Sa2VA and 64 x 64 here.
- ``_forward_sam_heads`` pads an empty point (label -1) when no points are given, embeds it with
  ``sam_prompt_encoder``, appends Sa2VA's language embedding to the sparse prompt tokens, runs ``sam_mask_decoder``
  (multimask output on an initial frame without points, best mask by predicted IoU) and, when the object score
  is not positive, replaces every logit with -1024 (SAM2's "no object" score).
- The mask decoder's ``transformer`` is a two-way transformer whose attention layers have ``q_proj``, ``k_proj``,
  ``v_proj`` and ``out_proj``; ``memory_attention`` (used for video tracking) has ``self_attn.q_proj`` and
  ``cross_attn_image.q_proj`` ... as well. These names collide with language-model attention names, which is
  the LoRA-target hazard rl-seg's adapter guards against.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

NO_OBJ_SCORE = -1024.0


class LayerNorm2d(nn.Module):
    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        x = (x - mu) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MLP(nn.Module):
    def __init__(self, dim_in, dim_hidden, dim_out, depth, sigmoid_output=False):
        super().__init__()
        dims = [dim_in] + [dim_hidden] * (depth - 1) + [dim_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.sigmoid_output = sigmoid_output

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x


def sine_position_encoding(x, dim):
    """2-D sine/cosine positions for a B x C x H x W map (normalised coordinates), B x dim x H x W."""
    b, _, h, w = x.shape
    quarter = dim // 4
    freq = 10000.0 ** (-torch.arange(quarter, device=x.device, dtype=torch.float32) / max(quarter, 1))
    ys = (torch.arange(h, device=x.device, dtype=torch.float32) + 0.5) / h * 2 * math.pi
    xs = (torch.arange(w, device=x.device, dtype=torch.float32) + 0.5) / w * 2 * math.pi
    py, px = ys[:, None] * freq, xs[:, None] * freq
    pe = torch.cat([py.sin()[:, None].expand(h, w, quarter), py.cos()[:, None].expand(h, w, quarter),
                    px.sin()[None].expand(h, w, quarter), px.cos()[None].expand(h, w, quarter)], dim=-1)
    pe = F.pad(pe, (0, dim - 4 * quarter)).permute(2, 0, 1)
    return pe[None].expand(b, -1, -1, -1).to(x.dtype)


# ----------------------------------------------------------------------------------------------- image encoder
class Trunk(nn.Module):
    """Four downsampling stages (strides 4, 8, 16, 32) standing in for Hiera."""

    def __init__(self, channels):
        super().__init__()
        stages, cin = [], 3
        for i, c in enumerate(channels):
            k = 4 if i == 0 else 2
            stages.append(nn.Sequential(nn.Conv2d(cin, c, k, stride=k), LayerNorm2d(c), nn.GELU(),
                                        nn.Conv2d(c, c, 3, padding=1)))
            cin = c
        self.stages = nn.ModuleList(stages)
        self.channel_list = list(reversed(channels))

    def forward(self, x):
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


class FpnNeck(nn.Module):
    def __init__(self, d_model, backbone_channel_list, fpn_top_down_levels=(2, 3)):
        super().__init__()
        self.d_model = d_model
        self.backbone_channel_list = backbone_channel_list
        self.convs = nn.ModuleList(nn.Conv2d(c, d_model, 1) for c in backbone_channel_list)
        self.fpn_top_down_levels = list(fpn_top_down_levels)

    def forward(self, xs):
        n = len(self.convs) - 1
        out, pos, prev = [None] * len(xs), [None] * len(xs), None
        for i in range(n, -1, -1):
            lateral = self.convs[n - i](xs[i])
            if i in self.fpn_top_down_levels and prev is not None:
                lateral = lateral + F.interpolate(prev, scale_factor=2.0, mode="nearest")
            prev = lateral
            out[i] = lateral
            pos[i] = sine_position_encoding(lateral, self.d_model)
        return out, pos


class ImageEncoder(nn.Module):
    def __init__(self, trunk, neck, scalp=1):
        super().__init__()
        self.trunk, self.neck, self.scalp = trunk, neck, scalp

    def forward(self, sample):
        features, pos = self.neck(self.trunk(sample))
        if self.scalp > 0:
            features, pos = features[:-self.scalp], pos[:-self.scalp]
        return {"vision_features": features[-1], "vision_pos_enc": pos, "backbone_fpn": features}


# ------------------------------------------------------------------------------------------------ prompt encoder
class PositionEmbeddingRandom(nn.Module):
    def __init__(self, num_pos_feats, scale=1.0):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats))

    def _encode(self, coords):
        # no dtype reconciliation, as in SAM2: with a bfloat16 model this needs an autocast region (Sa2VA runs its
        # SAM2 calls under torch.autocast)
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([coords.sin(), coords.cos()], dim=-1)

    def forward(self, size):
        h, w = size
        g = self.positional_encoding_gaussian_matrix
        ys = (torch.arange(h, device=g.device, dtype=g.dtype) + 0.5) / h
        xs = (torch.arange(w, device=g.device, dtype=g.dtype) + 0.5) / w
        grid = torch.stack([xs[None].expand(h, w), ys[:, None].expand(h, w)], dim=-1)
        return self._encode(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords, image_size):
        coords = coords.clone()
        coords[..., 0] = coords[..., 0] / image_size[1]
        coords[..., 1] = coords[..., 1] / image_size[0]
        return self._encode(coords.to(torch.float))


class PromptEncoder(nn.Module):
    def __init__(self, embed_dim, image_embedding_size, input_image_size, mask_in_chans=4):
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = image_embedding_size
        self.input_image_size = input_image_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, 2, stride=2), LayerNorm2d(mask_in_chans // 4), nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, 2, stride=2), LayerNorm2d(mask_in_chans), nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, 1))
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self):
        return self.pe_layer(self.image_embedding_size)[None]

    def _embed_points(self, points, labels, pad):
        points = points + 0.5  # pixel centres
        if pad:
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, -labels.new_ones(labels.shape[0], 1)], dim=1)
        pe = self.pe_layer.forward_with_coords(points, self.input_image_size)
        lab = labels[..., None]
        pe = torch.where(lab == -1, self.not_a_point_embed.weight.to(pe.dtype).expand_as(pe), pe)
        for value in range(4):
            pe = pe + (lab == value).to(pe.dtype) * self.point_embeddings[value].weight.to(pe.dtype)
        return pe

    def forward(self, points, boxes, masks):
        if boxes is not None:
            raise NotImplementedError("the replica embeds points and masks only")
        coords, labels = points
        bs = coords.shape[0]
        sparse = self._embed_points(coords, labels, pad=boxes is None)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(bs, -1, *self.image_embedding_size)
        return sparse, dense


# -------------------------------------------------------------------------------------------------- mask decoder
class Attention(nn.Module):
    """Multi-head attention with separate projections (optionally to a narrower internal width)."""

    def __init__(self, embedding_dim, num_heads, downsample_rate=1, kv_in_dim=None):
        super().__init__()
        kv_in_dim = kv_in_dim or embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(kv_in_dim, self.internal_dim)
        self.v_proj = nn.Linear(kv_in_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x):
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q, k, v):
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        out = F.scaled_dot_product_attention(q, k, v)
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


class TwoWayAttentionBlock(nn.Module):
    def __init__(self, dim, heads, mlp_dim, skip_first_layer_pe=False):
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, heads, downsample_rate=2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim, dim, 2)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, heads, downsample_rate=2)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, keys + key_pe, keys))
        queries = self.norm3(queries + self.mlp(queries))
        keys = self.norm4(keys + self.cross_attn_image_to_token(keys + key_pe, queries + query_pe, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth, embedding_dim, num_heads, mlp_dim):
        super().__init__()
        self.layers = nn.ModuleList(TwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim, i == 0)
                                    for i in range(depth))
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate=2)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding, image_pe, point_embedding):
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        attn = self.final_attn_token_to_image(queries + point_embedding, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys


class MaskDecoder(nn.Module):
    def __init__(self, transformer_dim, transformer, num_multimask_outputs=3, iou_head_depth=3,
                 iou_head_hidden_dim=32):
        super().__init__()
        d = transformer_dim
        self.transformer_dim = d
        self.transformer = transformer
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, d)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, d)
        self.obj_score_token = nn.Embedding(1, d)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(d, d // 4, 2, stride=2), LayerNorm2d(d // 4), nn.GELU(),
            nn.ConvTranspose2d(d // 4, d // 8, 2, stride=2), nn.GELU())
        self.conv_s0 = nn.Conv2d(d, d // 8, 1)
        self.conv_s1 = nn.Conv2d(d, d // 4, 1)
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(d, d, d // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(d, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth,
                                       sigmoid_output=True)
        self.pred_obj_score_head = MLP(d, d, 1, 3)

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                multimask_output, repeat_image=False, high_res_features=None):
        b = sparse_prompt_embeddings.shape[0]
        fixed = torch.cat([self.obj_score_token.weight, self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([fixed[None].expand(b, -1, -1).to(sparse_prompt_embeddings.dtype),
                            sparse_prompt_embeddings], dim=1)
        src = image_embeddings + dense_prompt_embeddings
        pos = image_pe.expand(b, -1, -1, -1).to(src.dtype)
        _, c, h, w = src.shape
        hs, src = self.transformer(src, pos, tokens)
        iou_out = hs[:, 1]
        mask_out = hs[:, 2:2 + self.num_mask_tokens]
        src = src.transpose(1, 2).reshape(b, c, h, w)
        dc1, ln1, act1, dc2, act2 = self.output_upscaling
        feat_s0, feat_s1 = high_res_features
        up = act1(ln1(dc1(src) + feat_s1))
        up = act2(dc2(up) + feat_s0)
        hyper = torch.stack([mlp(mask_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        bu, cu, hu, wu = up.shape
        masks = (hyper @ up.flatten(2)).view(bu, -1, hu, wu)
        iou_pred = self.iou_prediction_head(iou_out)
        object_score_logits = self.pred_obj_score_head(hs[:, 0])
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sl], iou_pred[:, sl], mask_out[:, sl], object_score_logits


# --------------------------------------------------------------------------------------------- memory attention
class MemoryAttentionLayer(nn.Module):
    def __init__(self, d_model, mem_dim, heads, dim_feedforward):
        super().__init__()
        self.self_attn = Attention(d_model, heads)
        self.cross_attn_image = Attention(d_model, heads, kv_in_dim=mem_dim)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)

    def forward(self, tgt, memory):
        t = self.norm1(tgt)
        tgt = tgt + self.self_attn(t, t, t)
        tgt = tgt + self.cross_attn_image(self.norm2(tgt), memory, memory)
        return tgt + self.linear2(F.relu(self.linear1(self.norm3(tgt))))


class MemoryAttention(nn.Module):
    """Video-tracking memory attention (not used on single images, present for its module names)."""

    def __init__(self, d_model, mem_dim, heads, dim_feedforward, num_layers=1):
        super().__init__()
        self.layers = nn.ModuleList(MemoryAttentionLayer(d_model, mem_dim, heads, dim_feedforward)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)


# ------------------------------------------------------------------------------------------------------- model
class SAM2Base(nn.Module):
    def __init__(self, image_size, backbone_stride, hidden_dim, trunk_channels, decoder_heads, decoder_mlp_dim,
                 decoder_depth, mem_dim):
        super().__init__()
        trunk = Trunk(trunk_channels)
        self.image_encoder = ImageEncoder(trunk, FpnNeck(hidden_dim, trunk.channel_list), scalp=1)
        self.hidden_dim = hidden_dim
        self.mem_dim = mem_dim
        self.image_size = image_size
        self.backbone_stride = backbone_stride
        self.num_feature_levels = 3
        self.use_high_res_features_in_sam = True
        self.directly_add_no_mem_embed = True
        self.multimask_output_in_sam = True
        self.multimask_output_for_tracking = True
        self.multimask_min_pt_num = 0
        self.multimask_max_pt_num = 1
        self.pred_obj_scores = True
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.memory_attention = MemoryAttention(hidden_dim, mem_dim, decoder_heads, decoder_mlp_dim)
        self.sam_prompt_embed_dim = hidden_dim
        self.sam_image_embedding_size = image_size // backbone_stride
        self.sam_prompt_encoder = PromptEncoder(hidden_dim, (self.sam_image_embedding_size,) * 2,
                                                (image_size, image_size))
        self.sam_mask_decoder = MaskDecoder(
            hidden_dim, TwoWayTransformer(decoder_depth, hidden_dim, decoder_heads, decoder_mlp_dim),
            iou_head_hidden_dim=hidden_dim)

    def forward_image(self, img_batch):
        out = self.image_encoder(img_batch)
        fpn = list(out["backbone_fpn"])
        fpn[0] = self.sam_mask_decoder.conv_s0(fpn[0])
        fpn[1] = self.sam_mask_decoder.conv_s1(fpn[1])
        out["backbone_fpn"] = fpn
        return out

    def _prepare_backbone_features(self, backbone_out):
        maps = backbone_out["backbone_fpn"][-self.num_feature_levels:]
        pos = backbone_out["vision_pos_enc"][-self.num_feature_levels:]
        feat_sizes = [(x.shape[-2], x.shape[-1]) for x in pos]
        vision_feats = [x.flatten(2).permute(2, 0, 1) for x in maps]
        vision_pos = [x.flatten(2).permute(2, 0, 1) for x in pos]
        return backbone_out, vision_feats, vision_pos, feat_sizes

    def _use_multimask(self, is_init_cond_frame, point_inputs):
        num_pts = 0 if point_inputs is None else point_inputs["point_labels"].size(1)
        return (self.multimask_output_in_sam and (is_init_cond_frame or self.multimask_output_for_tracking)
                and self.multimask_min_pt_num <= num_pts <= self.multimask_max_pt_num)

    def _forward_sam_heads(self, backbone_features, point_inputs=None, mask_inputs=None, high_res_features=None,
                           multimask_output=False, language_embd=None):
        b = backbone_features.size(0)
        device = backbone_features.device
        if point_inputs is not None:
            coords, labels = point_inputs["point_coords"], point_inputs["point_labels"]
        else:
            coords = torch.zeros(b, 1, 2, device=device)
            labels = -torch.ones(b, 1, dtype=torch.int32, device=device)
        sparse, dense = self.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=mask_inputs)
        if language_embd is not None:
            sparse = torch.cat([sparse.to(language_embd.dtype), language_embd], dim=1)
        low_res_multimasks, ious, tokens, object_score_logits = self.sam_mask_decoder(
            image_embeddings=backbone_features, image_pe=self.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense.to(backbone_features.dtype),
            multimask_output=multimask_output, repeat_image=False, high_res_features=high_res_features)
        if self.pred_obj_scores:
            low_res_multimasks = torch.where(object_score_logits[:, None, None] > 0, low_res_multimasks,
                                             torch.full_like(low_res_multimasks, NO_OBJ_SCORE))
        low_res_multimasks = low_res_multimasks.float()
        high_res_multimasks = F.interpolate(low_res_multimasks, size=(self.image_size, self.image_size),
                                            mode="bilinear", align_corners=False)
        if multimask_output:
            best = torch.argmax(ious, dim=-1)
            rows = torch.arange(b, device=device)
            low_res_masks = low_res_multimasks[rows, best].unsqueeze(1)
            high_res_masks = high_res_multimasks[rows, best].unsqueeze(1)
        else:
            low_res_masks, high_res_masks = low_res_multimasks, high_res_multimasks
        obj_ptr = tokens[:, 0]
        return (low_res_multimasks, high_res_multimasks, ious, low_res_masks, high_res_masks, obj_ptr,
                object_score_logits)


class SAM2(nn.Module):
    """Sa2VA's wrapper around SAM2 (``model.grounding_encoder``)."""

    def __init__(self, image_size=256, backbone_stride=16, hidden_dim=32, trunk_channels=(8, 16, 24, 32),
                 decoder_heads=2, decoder_mlp_dim=64, decoder_depth=2, mem_dim=16):
        super().__init__()
        self.sam2_model = SAM2Base(image_size, backbone_stride, hidden_dim, list(trunk_channels), decoder_heads,
                                   decoder_mlp_dim, decoder_depth, mem_dim)
        self.hidden_dim = hidden_dim
        self.img_mean = (0.485, 0.456, 0.406)
        self.img_std = (0.229, 0.224, 0.225)

    def preprocess_image(self, image, dtype=torch.float32):
        image = image.to(dtype) / 255.0
        mean = torch.tensor(self.img_mean, dtype=dtype, device=image.device)[:, None, None]
        std = torch.tensor(self.img_std, dtype=dtype, device=image.device)[:, None, None]
        return (image - mean) / std

    def _autocast(self, device):
        # Sa2VA wraps these calls in torch.autocast("cuda", dtype=torch.bfloat16); the replica does so on any
        # device, and only for a low-precision model (so that float32 runs stay exact).
        dtype = self.sam2_model.no_mem_embed.dtype
        return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)

    def get_sam2_embeddings(self, images):
        with self._autocast(images.device):
            feats = self.sam2_model.forward_image(images)
        _, vision_feats, vision_pos, feat_sizes = self.sam2_model._prepare_backbone_features(feats)
        return {"current_vision_feats": vision_feats, "current_vision_pos_embeds": vision_pos,
                "feat_sizes": feat_sizes}

    def inject_language_embd(self, sam_states, language_embd):
        """Sa2VA's training path: language embeddings (B x N x C) as SAM prompts, with gradients."""
        feats, sizes = sam_states["current_vision_feats"], sam_states["feat_sizes"]
        high_res = [x.permute(1, 2, 0).reshape(x.size(1), x.size(2), *s) for x, s in zip(feats[:-1], sizes[:-1])]
        b, c = feats[-1].size(1), self.hidden_dim
        h, w = sizes[-1]
        pix = (feats[-1] + self.sam2_model.no_mem_embed).permute(1, 2, 0).reshape(b, c, h, w)
        with self._autocast(pix.device):
            out = self.sam2_model._forward_sam_heads(
                backbone_features=pix, point_inputs=None, mask_inputs=None, high_res_features=high_res,
                multimask_output=self.sam2_model._use_multimask(is_init_cond_frame=True, point_inputs=None),
                language_embd=language_embd)
        return out[3]  # low_res_masks: B x 1 x h x w

    def language_embd_inference(self, sam_states, language_embd):
        """Inference: mask logits upsampled to the (square) input resolution, as SAM2's video predictor returns
        them at the video's resolution."""
        low = self.inject_language_embd(sam_states, language_embd)
        size = self.sam2_model.image_size
        return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
