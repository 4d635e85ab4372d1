"""The 2D plane U-Net, its blocks, its noise-level embedding and its configurations."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from ScoreFusionLib.errors import InputError
from ScoreFusionLib.nets.configs import UNET2D_PRESETS, UNet2DConfig, unet2d_config

torch = pytest.importorskip("torch")

from ScoreFusionLib.nets.blocks2d import AttentionBlock2d, GroupNorm32, ResBlock2d  # noqa: E402
from ScoreFusionLib.nets.embedding import (  # noqa: E402
    LOGSNR_CLAMP,
    NoiseLevelEmbedding,
    noise_level_values,
    sinusoidal_features,
)
from ScoreFusionLib.nets.unet2d import UNet2D, kaiming_reinit_  # noqa: E402


def _tiny(in_channels: int = 6, **changes) -> UNet2DConfig:
    return dataclasses.replace(unet2d_config("tiny", in_channels), **changes)


def _reinit(model: UNet2D, seed: int = 0) -> UNet2D:
    return kaiming_reinit_(model, generator=torch.Generator().manual_seed(seed))


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- shapes


@pytest.fixture(scope="module")
def paper_net() -> UNet2D:
    torch.manual_seed(0)
    return UNet2D(unet2d_config("paper", in_channels=2)).eval()


def test_paper_output_and_feature_shapes_on_a_brats_slice(paper_net):
    """Coronal/sagittal slices are 152x192: the 1/8 level is 19x24 (method.md §3.3)."""
    x = torch.randn(1, 2, 152, 192, generator=_seeded(1))
    with torch.no_grad():
        eps, feats = paper_net(x, torch.tensor([0.3]), return_features=True)
    assert eps.shape == (1, 1, 152, 192)
    assert list(feats) == [8, 4, 2, 1]
    assert paper_net.feature_channels == {8: 512, 4: 256, 2: 128, 1: 64}
    expected = {8: (1, 512, 19, 24), 4: (1, 256, 38, 48), 2: (1, 128, 76, 96), 1: (1, 64, 152, 192)}
    assert {f: tuple(t.shape) for f, t in feats.items()} == expected
    # zero-initialised output conv: a fresh network predicts exactly zero, yet its features are live
    assert torch.count_nonzero(eps) == 0
    assert all(t.abs().max() > 0 for t in feats.values())
    assert paper_net.required_divisor == 8


def test_paper_architecture_matches_the_official_net(paper_net):
    cfg = paper_net.config
    assert (cfg.base_channels, cfg.channel_mult, cfg.num_res_blocks) == (64, (1, 2, 4, 8), 2)
    assert cfg.attention_levels == () and cfg.mid_attention and cfg.head_channels == 32
    assert cfg.dropout == 0.2 and cfg.norm_groups == 32
    # 2 blocks + 1 downsampler per level except the last; 3 decoder blocks per level
    assert len(paper_net.encoder) == 4 * 2 + 3
    assert len(paper_net.decoder) == 4 * 3
    attention = [m for m in paper_net.modules() if isinstance(m, AttentionBlock2d)]
    assert len(attention) == 1 and attention[0].heads == 512 // 32
    assert all(isinstance(m, GroupNorm32) and m.num_groups == 32
               for m in paper_net.modules() if isinstance(m, torch.nn.GroupNorm))
    resamplers = [m.resample for m in paper_net.modules() if isinstance(m, ResBlock2d) and m.resample]
    assert resamplers == ["down"] * 3 + ["up"] * 3


def test_tiny_output_and_feature_shapes():
    net = UNet2D(unet2d_config("tiny", 6))
    x = torch.randn(2, 6, 32, 48, generator=_seeded(2))
    eps, feats = net(x, 0.5, return_features=True)
    assert eps.shape == (2, 1, 32, 48)
    assert net.feature_channels == {4: 32, 2: 32, 1: 16}
    assert {f: tuple(t.shape) for f, t in feats.items()} == {
        4: (2, 32, 8, 12), 2: (2, 32, 16, 24), 1: (2, 16, 32, 48)
    }
    assert net.required_divisor == 4
    assert net(x, 0.5).shape == (2, 1, 32, 48)  # plain call returns a tensor only


@pytest.mark.parametrize("num_res_blocks", [1, 2])
def test_features_are_the_first_decoder_block_of_each_level(num_res_blocks):
    """Same indexing as the official feature list F[1], F[4], ... (F[0] = middle block)."""
    net = _reinit(UNet2D(_tiny(num_res_blocks=num_res_blocks))).eval()
    per_level = num_res_blocks + 1
    captured = {}
    for i in range(len(net.decoder)):
        net.decoder[i].register_forward_hook(lambda _m, _i, out, i=i: captured.__setitem__(i, out))
    with torch.no_grad():
        _, feats = net(torch.randn(1, 6, 16, 16, generator=_seeded(3)), 0.7, return_features=True)
    for n, factor in enumerate([4, 2, 1]):
        assert feats[factor] is captured[n * per_level]


# --------------------------------------------------------------------------- initialisation


def test_fresh_output_is_zero_and_kaiming_reinit_makes_it_nonzero():
    net = UNet2D(unet2d_config("tiny", 6)).eval()
    x = torch.randn(3, 6, 16, 16, generator=_seeded(4))
    with torch.no_grad():
        assert torch.count_nonzero(net(x, 0.5)) == 0
        _reinit(net)
        out = net(x, 0.5)
    assert out.abs().mean() > 1e-3 and torch.isfinite(out).all()


def test_kaiming_reinit_statistics_and_untouched_norms():
    net = _reinit(UNet2D(unet2d_config("small", 6)), seed=5)
    conv = net.decoder[0][0].in_conv  # 256 -> 128 inputs x 3x3: plenty of samples
    fan_in = conv.weight[0].numel()
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_in), rel=0.05)
    linear = net.embedding.mlp[2]
    assert linear.weight.std().item() == pytest.approx(math.sqrt(2.0 / linear.in_features), rel=0.05)
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)):
            assert torch.count_nonzero(m.bias) == 0
            assert torch.count_nonzero(m.weight) == m.weight.numel()
        if isinstance(m, torch.nn.GroupNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))


def test_blocks_start_as_identity():
    emb = torch.randn(2, 64, generator=_seeded(6))
    x = torch.randn(2, 32, 8, 8, generator=_seeded(7))
    assert torch.equal(ResBlock2d(32, 32, 64, norm_groups=8)(x, emb), x)
    assert torch.equal(AttentionBlock2d(32, 16, norm_groups=8)(x), x)
    # resampling happens on the skip path too: mean pool down, nearest repeat up
    down = ResBlock2d(32, 32, 64, norm_groups=8, resample="down")(x, emb)
    assert torch.allclose(down, torch.nn.functional.avg_pool2d(x, 2))
    up = ResBlock2d(32, 32, 64, norm_groups=8, resample="up")(x, emb)
    assert torch.equal(up, x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    widened = ResBlock2d(32, 48, 64, norm_groups=8)
    assert widened(x, emb).shape == (2, 48, 8, 8) and isinstance(widened.skip, torch.nn.Conv2d)


def test_attention_block_mixes_all_pixels_after_reinit():
    block = _reinit(AttentionBlock2d(64, 32, norm_groups=8)).eval()
    x = torch.randn(1, 64, 4, 5, generator=_seeded(8))
    y0 = block(x)
    x2 = x.clone()
    x2[..., 3, 4] += 1.0  # change one pixel: every output pixel must change through attention
    changed = (block(x2) - y0).abs().amax(dim=1)[0]
    assert (changed > 0).all()


# --------------------------------------------------------------------------- embedding


@pytest.mark.parametrize("dim", [8, 64])
def test_sinusoidal_features_match_a_hand_computation(dim):
    gammas = [1.0, 0.5, 0.05, 4.39e-5]
    got = sinusoidal_features(torch.tensor(gammas), dim)
    assert got.shape == (4, dim) and got.dtype == torch.float32
    half = dim // 2
    for row, g in enumerate(gammas):
        freqs = [10000.0 ** (-k / half) for k in range(half)]
        expected = [math.cos(g * f) for f in freqs] + [math.sin(g * f) for f in freqs]
        assert got[row].tolist() == pytest.approx(expected, abs=1e-6)
    # cos first: the first feature is cos(gamma * 1)
    assert got[1, 0].item() == pytest.approx(math.cos(0.5), abs=1e-7)
    assert got[1, half].item() == pytest.approx(math.sin(0.5), abs=1e-7)


def test_sinusoidal_features_of_integer_steps_for_the_fuser():
    t = torch.tensor([0, 999])
    got = sinusoidal_features(t, 64)
    assert got[0].tolist() == [1.0] * 32 + [0.0] * 32
    assert got[1, 0].item() == pytest.approx(math.cos(999.0), abs=1e-4)
    assert got[1, 63].item() == pytest.approx(math.sin(999.0 * 10000.0 ** (-31 / 32)), abs=1e-6)


def test_sinusoidal_features_reject_bad_arguments():
    with pytest.raises(InputError, match="even"):
        sinusoidal_features(torch.ones(2), 7)
    with pytest.raises(InputError, match="1D batch"):
        sinusoidal_features(torch.ones(2, 1), 8)


def test_embedding_module_layout():
    emb = NoiseLevelEmbedding(16)
    layers = list(emb.mlp)
    assert isinstance(layers[1], torch.nn.SiLU)
    assert (layers[0].in_features, layers[0].out_features) == (16, 64)
    assert (layers[2].in_features, layers[2].out_features) == (64, 64)
    assert emb(torch.tensor([0.1, 0.9])).shape == (2, 64) and emb.out_dim == 64
    with pytest.raises(InputError, match="unknown noise embedding"):
        NoiseLevelEmbedding(16, "linear")


def test_log_snr_values_and_why_it_exists():
    g = torch.tensor([0.5, 0.9, 1e-3, 0.0, 1.0])
    v = noise_level_values(g, "log-snr")
    assert v[:3].tolist() == pytest.approx([0.0, math.log(9.0), math.log(1e-3 / (1 - 1e-3))], abs=1e-5)
    assert v[3].item() == -LOGSNR_CLAMP and v[4].item() == LOGSNR_CLAMP
    assert torch.equal(noise_level_values(g, "gamma-sinusoidal"), g)
    # the raw-gamma sinusoid saturates at high noise (method.md §2.4); log-SNR separates those levels
    pair = torch.tensor([1e-3, 1e-4])
    raw = sinusoidal_features(noise_level_values(pair, "gamma-sinusoidal"), 64)
    snr = sinusoidal_features(noise_level_values(pair, "log-snr"), 64)
    assert (raw[0] - raw[1]).abs().max() < 1e-3
    assert (snr[0] - snr[1]).abs().max() > 0.5
    with pytest.raises(InputError, match="unknown noise embedding"):
        noise_level_values(g, "snr")


# --------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("embedding", ["gamma-sinusoidal", "log-snr"])
def test_gamma_changes_the_output(embedding):
    net = _reinit(UNet2D(_tiny(noise_embedding=embedding)), seed=9).eval()
    x = torch.randn(1, 6, 16, 16, generator=_seeded(10)).expand(3, -1, -1, -1)
    gammas = torch.tensor([0.9, 0.5, 0.1])
    with torch.no_grad():
        out = net(x, gammas)
        scale = out.abs().mean()
        for i in range(3):
            for j in range(i + 1, 3):
                assert (out[i] - out[j]).abs().mean() > 1e-3 * scale, (i, j)
        # a scalar gamma is broadcast over the batch: same as the explicit vector
        assert torch.equal(net(x, 0.5), net(x, torch.full((3,), 0.5)))
        assert torch.equal(net(x, torch.tensor(0.5)), net(x, 0.5))
        assert torch.equal(net(x, np.float32(0.5)), net(x, 0.5))


def test_eval_is_deterministic_and_train_dropout_is_not():
    net = _reinit(UNet2D(_tiny(dropout=0.3)), seed=11)
    x = torch.randn(2, 6, 16, 16, generator=_seeded(12))
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x, 0.4), net(x, 0.4))
        net.train()
        torch.manual_seed(0)
        a = net(x, 0.4)
        b = net(x, 0.4)
    assert (a - b).abs().max() > 1e-4
    # without dropout, train mode is deterministic too (GroupNorm has no running statistics)
    plain = _reinit(UNet2D(_tiny(dropout=0.0)), seed=11).train()
    with torch.no_grad():
        assert torch.equal(plain(x, 0.4), plain(x, 0.4))


def test_parameter_counts_of_the_presets():
    counts = {name: UNet2D(unet2d_config(name, 6)).num_parameters() for name in ("tiny", "small")}
    print(f"\nUNet2D parameters with 6 inputs: {counts}")
    assert 200_000 <= counts["tiny"] <= 400_000
    assert counts == {"tiny": 332_865, "small": 4_092_961}


def test_paper_parameter_count(paper_net):
    # paper_net has 2 inputs; each further input adds 64 x 3 x 3 weights
    assert paper_net.num_parameters() + 4 * 64 * 9 == 62_640_193


def test_backward_reaches_every_parameter():
    net = _reinit(UNet2D(_tiny(attention_levels=(1,))), seed=13).train()
    x = torch.randn(2, 6, 16, 16, generator=_seeded(14))
    target = torch.randn(2, 1, 16, 16, generator=_seeded(15))
    loss = torch.nn.functional.mse_loss(net(x, torch.tensor([0.2, 0.8])), target)
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def _max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


@pytest.mark.parametrize("attention_levels", [(), (1, 2)])
def test_batch_equals_items_one_by_one(attention_levels):
    """Batched slice scoring must not depend on the batch composition (method.md §3.4).

    float64 shows the structure is exactly per-item; float32 allows the rounding of
    batch-size dependent convolution kernels (relative to the tensor's scale, at least 1).
    """
    net = _reinit(UNet2D(_tiny(attention_levels=attention_levels, dropout=0.2)), seed=16).eval()
    x = torch.randn(5, 6, 16, 24, generator=_seeded(17))
    gammas = torch.tensor([0.99, 0.5, 0.1, 1e-3, 4e-5])
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        net.to(dtype)
        xd = x.to(dtype)
        with torch.no_grad():
            eps, feats = net(xd, gammas, return_features=True)
            for i in range(5):
                e_i, f_i = net(xd[i : i + 1], gammas[i : i + 1], return_features=True)
                assert _max_rel_diff(eps[i : i + 1], e_i) <= tol, (dtype, i)
                for factor in feats:
                    assert _max_rel_diff(feats[factor][i : i + 1], f_i[factor]) <= tol, (dtype, i, factor)


def test_bfloat16_autocast_runs_with_float32_norms():
    net = _reinit(UNet2D(unet2d_config("tiny", 6)), seed=18).eval()
    x = torch.randn(2, 6, 16, 16, generator=_seeded(19))
    with torch.no_grad():
        ref = net(x, 0.3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x, 0.3)
    assert torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()


# --------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def tiny_net() -> UNet2D:
    return UNet2D(unet2d_config("tiny", 6))


@pytest.mark.parametrize(
    ("x_shape", "gamma", "message"),
    [
        ((1, 5, 16, 16), 0.5, "expects 6 input channels, got 5"),
        ((6, 16, 16), 0.5, r"must be \(B, C, H, W\)"),
        ((1, 6, 18, 16), 0.5, "multiples of 4 for 3 levels, got 18x16"),
        ((1, 6, 16, 10), 0.5, "multiples of 4"),
        ((2, 6, 16, 16), "gamma-of-shape-2x1", r"gamma must have shape \(2,\) or be a scalar, got \(2, 1\)"),
        ((2, 6, 16, 16), "gamma-of-shape-3", r"gamma must have shape \(2,\)"),
        ((2, 6, 16, 16), True, "bool"),
        ((2, 6, 16, 16), "0.5", "float or a torch tensor"),
    ],
)
def test_bad_inputs_raise_input_error(tiny_net, x_shape, gamma, message):
    x = torch.zeros(x_shape)
    if gamma == "gamma-of-shape-2x1":
        gamma = torch.full((2, 1), 0.5)
    elif gamma == "gamma-of-shape-3":
        gamma = torch.full((3,), 0.5)
    with pytest.raises(InputError, match=message):
        tiny_net(x, gamma)


def test_integer_input_is_rejected(tiny_net):
    with pytest.raises(InputError, match="floating point"):
        tiny_net(torch.zeros(1, 6, 16, 16, dtype=torch.int64), 0.5)
    with pytest.raises(InputError, match="UNet2DConfig"):
        UNet2D({"in_channels": 6})


# --------------------------------------------------------------------------- configurations


@pytest.mark.parametrize("name", UNET2D_PRESETS)
def test_presets_round_trip_through_json(name):
    cfg = unet2d_config(name, in_channels=10, out_channels=1)
    again = UNet2DConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and isinstance(again.channel_mult, tuple)


def test_custom_config_round_trip_and_normalisation():
    cfg = UNet2DConfig(7, 2, base_channels=32, channel_mult=[1, 2, 3, 4], num_res_blocks=3,
                       attention_levels=[2, 1, 2], mid_attention=False, head_channels=16, dropout=0,
                       norm_groups=16, noise_embedding="log-snr")
    assert cfg.channel_mult == (1, 2, 3, 4) and cfg.attention_levels == (1, 2)
    assert cfg.required_divisor == 8 and cfg.feature_channels == {8: 128, 4: 96, 2: 64, 1: 32}
    d = cfg.to_dict()
    assert d["channel_mult"] == [1, 2, 3, 4] and d["noise_embedding"] == "log-snr"
    assert UNet2DConfig.from_dict(json.loads(json.dumps(d))) == cfg


def test_preset_values():
    paper, small, tiny = (unet2d_config(n, 6) for n in ("paper", "small", "tiny"))
    assert (paper.required_divisor, small.required_divisor, tiny.required_divisor) == (8, 4, 4)
    assert (tiny.base_channels, tiny.channel_mult, tiny.num_res_blocks) == (16, (1, 2, 2), 1)
    assert (tiny.norm_groups, tiny.dropout, small.norm_groups) == (8, 0.0, 8)
    assert (small.base_channels, small.channel_mult, small.num_res_blocks, small.dropout) == (
        32, (1, 2, 4), 2, 0.1
    )
    for c in (paper, small, tiny):
        assert c.noise_embedding == "gamma-sinusoidal" and c.attention_levels == () and c.mid_attention


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"norm_groups": 12}, "does not divide the 16 channels"),
        ({"attention_levels": (3,)}, r"level indices in 0\.\.2"),
        ({"base_channels": 15, "norm_groups": 5}, "must be even"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"noise_embedding": "linear"}, "noise_embedding must be one of"),
        ({"num_res_blocks": 0}, "num_res_blocks must be a positive integer"),
        ({"channel_mult": ()}, "at least one level"),
        ({"head_channels": 24}, "head_channels=24 does not divide 32"),
        ({"in_channels": 2.5}, "in_channels must be a positive integer"),
    ],
)
def test_invalid_configs_raise(changes, message):
    with pytest.raises(InputError, match=message):
        _tiny(**changes)


def test_from_dict_and_presets_reject_unknown_names():
    d = unet2d_config("tiny", 6).to_dict()
    with pytest.raises(InputError, match="unknown UNet2DConfig keys"):
        UNet2DConfig.from_dict({**d, "attn_res": []})
    d.pop("in_channels")
    with pytest.raises(InputError, match="lacks 'in_channels'"):
        UNet2DConfig.from_dict(d)
    with pytest.raises(InputError, match="unknown UNet2D preset 'huge'"):
        unet2d_config("huge", 6)


def test_nets_package_and_configs_import_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import ScoreFusionLib.nets as nets\n"
        "from ScoreFusionLib.nets.configs import unet2d_config\n"
        "assert nets.unet2d_config('paper', 6).feature_channels[8] == 512\n"
        "assert 'ScoreFusionLib.nets.unet2d' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
