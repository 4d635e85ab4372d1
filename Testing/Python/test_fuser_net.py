"""The 3D fuser: configuration, network, feature alignment and fusion weights (method.md §4.4, §4.5)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from ScoreFusionLib.errors import InputError
from ScoreFusionLib.nets import FUSER_PRESETS, Fuser3DConfig, fuser_config

torch = pytest.importorskip("torch")

from ScoreFusionLib.fusion.weights import fuse_estimates, fusion_weights  # noqa: E402
from ScoreFusionLib.nets.alignment import FeatureAlignment  # noqa: E402
from ScoreFusionLib.nets.blocks2d import GroupNorm32  # noqa: E402
from ScoreFusionLib.nets.blocks3d import Downsample3d, ResBlock3d, Upsample3d  # noqa: E402
from ScoreFusionLib.nets.fuser3d import FuserUNet3D  # noqa: E402

#: Decoder channels of the tiny and the paper plane nets, keyed by factor (method.md §3.3).
TINY_PLANE_CHANNELS = ((4, 32), (2, 32), (1, 16))
PAPER_PLANE_CHANNELS = ((8, 512), (4, 256), (2, 128), (1, 64))
PLANES = (("axial", 0), ("coronal", 1), ("sagittal", 2))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These volumes are tiny: thread synchronisation would cost more than the convolutions."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomise_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Re-draw every parameter (zero-initialised ones included) so outputs are non-trivial."""
    gen = _seeded(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return module


def _tiny(aligned: bool = False, **changes) -> Fuser3DConfig:
    cfg = fuser_config("tiny", 9, 3, PLANES if aligned else (), TINY_PLANE_CHANNELS if aligned else ())
    return dataclasses.replace(cfg, **changes)


def _stacks(cfg: Fuser3DConfig, batch: int, sides: tuple[int, int, int], seed: int) -> dict:
    """Random stacked plane features: full resolution along each source's axis, 1/f elsewhere."""
    gen = _seeded(seed)
    out = {}
    for source, axis in cfg.aligned_sources:
        out[source] = {}
        for factor, plane_ch in cfg.aligned_channels:
            shape = [s // factor for s in sides]
            shape[axis] = sides[axis]
            out[source][factor] = torch.randn(batch, plane_ch, *shape, generator=gen)
    return out


# --------------------------------------------------------------------------- configuration


def test_config_round_trips_through_json():
    configs = [
        fuser_config("paper", 9, 3, PLANES, PAPER_PLANE_CHANNELS),
        fuser_config("tiny", 13, 6, (("sr/axial", 0), ("mt/coronal", 1)), TINY_PLANE_CHANNELS),
        fuser_config("tiny", 9, 3),
        Fuser3DConfig(9, 3, dropout=0.1, bias_scale=0.1),
    ]
    for cfg in configs:
        d = json.loads(json.dumps(cfg.to_dict()))
        assert isinstance(d["channel_mult"], list) and isinstance(d["aligned_sources"], list)
        back = Fuser3DConfig.from_dict(d)
        assert back == cfg
        assert isinstance(back.aligned_sources, tuple)
        assert all(isinstance(pair, tuple) for pair in back.aligned_sources + back.aligned_channels)


def test_config_normalises_sequences_and_sorts_factors_coarsest_first():
    cfg = Fuser3DConfig(9, 3, channel_mult=[1, 2, 3, 4], aligned_sources=[["axial", 0]],
                        aligned_channels=[[1, 64], [8, 512], [2, 128]])
    assert cfg.channel_mult == (1, 2, 3, 4)
    assert cfg.aligned_sources == (("axial", 0),)
    assert cfg.aligned_channels == ((8, 512), (2, 128), (1, 64))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_estimates": 1}, "n_estimates must be at least 2"),
        ({"in_channels": 3}, "in_channels=3 must exceed n_estimates=3"),
        ({"base_channels": 0}, "base_channels must be a positive integer"),
        ({"num_res_blocks": 1.5}, "num_res_blocks must be a positive integer"),
        ({"time_channels": 15}, "time_channels must be even"),
        ({"channel_mult": ()}, "at least one level"),
        ({"channel_mult": (1, 0)}, "channel_mult entries must be a positive integer"),
        ({"norm_groups": 16}, "norm_groups=16 does not divide the 8 channels of level 0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"bias_scale": 0.0}, "bias_scale must be positive"),
        ({"bias_scale": float("nan")}, "bias_scale must be a finite number"),
        ({"aligned_sources": (("axial", 3),)}, "axis of 'axial' must be 0, 1 or 2"),
        ({"aligned_sources": (("", 0),)}, "non-empty strings"),
        ({"aligned_sources": (("axial", 0), ("axial", 1))}, "names must be unique"),
        ({"aligned_sources": (("axial",),)}, "entries must be pairs"),
        ({"aligned_channels": ((3, 16),)}, "factor must be a power of two, got 3"),
        ({"aligned_channels": ((8, 16),)},
         r"factor 8 is not a level of the fuser; its levels are at factors \(1, 2, 4\)"),
        ({"aligned_channels": ((4, 0),)}, "plane channels must be a positive integer"),
        ({"aligned_channels": ((4, 16), (4, 32))}, "factors must be unique"),
        ({"aligned_channels": ()}, "both be empty"),
    ],
)
def test_bad_configs_are_rejected_with_specific_messages(changes, message):
    with pytest.raises(InputError, match=message):
        _tiny(aligned=True, **changes)


def test_from_dict_and_preset_errors():
    d = fuser_config("tiny", 9, 3).to_dict()
    with pytest.raises(InputError, match=r"unknown Fuser3DConfig keys \['colour'\]"):
        Fuser3DConfig.from_dict({**d, "colour": "red"})
    del d["n_estimates"]
    with pytest.raises(InputError, match=r"lacks \['n_estimates'\]"):
        Fuser3DConfig.from_dict(d)
    with pytest.raises(InputError, match="unknown fuser preset 'huge'"):
        fuser_config("huge", 9, 3)
    assert FUSER_PRESETS == ("paper", "tiny")


def test_presets_and_injection_channels():
    paper = fuser_config("paper", 9, 3)
    assert (paper.base_channels, paper.channel_mult, paper.num_res_blocks) == (64, (1, 2, 3, 4), 2)
    assert paper.norm_groups == 32
    assert (paper.time_channels, paper.embedding_channels, paper.dropout, paper.bias_scale) == (64, 256, 0.0, 1.0)
    assert paper.level_channels == (64, 128, 192, 256) and paper.level_factors == (1, 2, 4, 8)
    assert paper.required_divisor == 8
    # method.md §4.5 table: the coarsest level gets its features before its first block
    assert {f: paper.injection_channels(f) for f in (8, 4, 2, 1)} == {8: 192, 4: 192, 2: 128, 1: 64}
    tiny = fuser_config("tiny", 9, 3)
    assert (tiny.base_channels, tiny.channel_mult, tiny.num_res_blocks, tiny.norm_groups) == (8, (1, 2, 4), 1, 8)
    assert tiny.required_divisor == 4 and tiny.embedding_channels == 64
    assert {f: tiny.injection_channels(f) for f in (4, 2, 1)} == {4: 16, 2: 16, 1: 8}
    with pytest.raises(InputError, match="factor 16 is not a level"):
        tiny.injection_channels(16)
    # a one-level fuser has no down-sampling: its only level gets features after its first block
    assert Fuser3DConfig(9, 3, base_channels=8, channel_mult=(1,), norm_groups=8).injection_channels(1) == 8


def test_configs_import_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from ScoreFusionLib.nets import fuser_config\n"
        "import ScoreFusionLib.fusion.weights\n"
        "assert fuser_config('paper', 9, 3).injection_channels(8) == 192\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- network


def _expected_parameters(cfg: Fuser3DConfig) -> int:
    """Parameter count of the architecture of method.md §4.4, counted by hand."""

    def conv(cin: int, cout: int, k: int) -> int:
        return cin * cout * k**3 + cout

    def res(cin: int, cout: int) -> int:
        emb = cfg.embedding_channels * cout + cout
        skip = conv(cin, cout, 1) if cin != cout else 0
        return 2 * cin + conv(cin, cout, 3) + emb + 2 * cout + conv(cout, cout, 3) + skip

    e = cfg.embedding_channels
    total = cfg.time_channels * e + e + e * e + e
    chs = cfg.level_channels
    total += conv(cfg.in_channels, chs[0], 3)
    skips, ch = [chs[0]], chs[0]
    for level, level_ch in enumerate(chs):
        for _ in range(cfg.num_res_blocks):
            total += res(ch, level_ch)
            ch = level_ch
            skips.append(ch)
        if level < len(chs) - 1:
            total += conv(ch, ch, 3)
            skips.append(ch)
    total += 2 * res(ch, ch)
    for level in reversed(range(len(chs))):
        for _ in range(cfg.num_res_blocks + 1):
            total += res(ch + skips.pop(), chs[level])
            ch = chs[level]
        if level:
            total += conv(ch, ch, 3)
    return total + 2 * ch + conv(ch, cfg.n_estimates, 3)


@pytest.fixture(scope="module")
def paper_fuser() -> FuserUNet3D:
    torch.manual_seed(0)
    return FuserUNet3D(fuser_config("paper", 9, 3)).eval()


def test_parameter_counts_match_a_hand_count(paper_fuser):
    n_paper = paper_fuser.num_parameters()
    assert n_paper == _expected_parameters(paper_fuser.config), f"paper fuser has {n_paper:,} parameters"
    assert n_paper == 55_530_563, f"paper fuser has {n_paper:,} parameters"
    tiny = FuserUNet3D(_tiny())
    assert tiny.num_parameters() == _expected_parameters(tiny.config) == 448_619, f"{tiny.num_parameters():,}"
    # alignment settings add no parameters to the network: the convs live in FeatureAlignment
    aligned = FuserUNet3D(_tiny(aligned=True))
    assert aligned.num_parameters() == tiny.num_parameters() == aligned.num_parameters(trainable_only=True)
    align = FeatureAlignment(aligned.config)
    assert sum(p.numel() for p in align.parameters()) == 3 * (32 * 16 * 4 + 16 + 32 * 16 * 2 + 16 + 16 * 8 + 8)


def test_paper_architecture(paper_fuser):
    net = paper_fuser
    modules = list(net.modules())
    assert not any(isinstance(m, torch.nn.MultiheadAttention) or "Attention" in type(m).__name__ for m in modules)
    assert len(net.encoder) == 4 * 2 + 3 and len(net.middle) == 2
    assert sum(isinstance(m, ResBlock3d) for m in net.decoder) == 4 * 3
    assert sum(isinstance(m, Downsample3d) for m in modules) == 3 == sum(isinstance(m, Upsample3d) for m in modules)
    assert all(isinstance(m, GroupNorm32) and m.num_groups == 32 for m in modules if isinstance(m, torch.nn.GroupNorm))
    assert net.input_conv.padding_mode == "replicate" and net.out[-1].padding_mode == "replicate"
    assert net.out[-1].kernel_size == (3, 3, 3) and net.out[-1].out_channels == 3
    assert torch.count_nonzero(net.out[-1].weight) == 0 and torch.count_nonzero(net.out[-1].bias) == 0
    mlp = net.time_mlp
    assert (mlp[0].in_features, mlp[0].out_features, mlp[2].out_features) == (64, 256, 256)


def test_resblock_starts_as_its_skip_and_resamplers_halve_and_double():
    emb = torch.randn(2, 32, generator=_seeded(1))
    x = torch.randn(2, 8, 4, 6, 8, generator=_seeded(2))
    assert torch.equal(ResBlock3d(8, 8, 32, norm_groups=4)(x, emb), x)
    widened = ResBlock3d(8, 16, 32, norm_groups=4)
    assert torch.equal(widened(x, emb), widened.skip(x))
    assert Downsample3d(8)(x).shape == (2, 8, 2, 3, 4)
    assert Upsample3d(8)(x).shape == (2, 8, 8, 12, 16)


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_fresh_fuser_gives_exactly_the_plane_average(preset, paper_fuser):
    """method.md §4.4 required test: zero head -> eps_hat == mean_k eps_k (<= 1e-6)."""
    net = paper_fuser if preset == "paper" else FuserUNet3D(_tiny()).eval()
    gen = _seeded(3)
    batch = 1 if preset == "paper" else 2
    x = torch.randn(batch, 9, 16, 16, 16, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    with torch.no_grad():
        head = net(x, t)
    assert head.shape == (batch, 3, 16, 16, 16)
    assert torch.count_nonzero(head) == 0
    estimates = torch.randn(batch, 3, 16, 16, 16, generator=gen) * 3.0
    fused = fuse_estimates(head, estimates)
    assert fused.shape == (batch, 1, 16, 16, 16)
    assert (fused - estimates.mean(dim=1, keepdim=True)).abs().max().item() <= 1e-6
    assert torch.equal(fusion_weights(head), torch.full_like(head, 1.0 / 3.0))


def test_step_forms_agree_and_the_step_matters():
    net = _randomise_(FuserUNet3D(_tiny()), seed=4).eval()
    x = torch.randn(2, 9, 8, 8, 8, generator=_seeded(5))
    with torch.no_grad():
        ref = net(x, torch.tensor([417, 417]))
        for t in (417, 417.0, torch.tensor(417), torch.tensor([417.0, 417.0])):
            assert torch.equal(net(x, t), ref)
        assert not torch.equal(net(x, 418), ref)
        both = net(x, torch.tensor([10, 900]))
        assert torch.allclose(both[:1], net(x[:1], 10), atol=1e-6)
        assert torch.allclose(both[1:], net(x[1:], 900), atol=1e-6)


# --------------------------------------------------------------------------- fusion weights


@pytest.mark.parametrize("n", [2, 3, 6])
def test_fusion_weights_sum_to_one_for_random_heads(n):
    gen = _seeded(10 + n)
    head = torch.randn(2, n, 12, 10, 8, generator=gen)
    weights = fusion_weights(head)
    assert weights.shape == head.shape and weights.dtype == torch.float32
    assert (weights.sum(dim=1) - 1.0).abs().max().item() <= 1e-6
    assert torch.allclose(weights[:, :-1], head[:, :-1] + 1.0 / n)
    # the fused noise is the weighted sum plus the scaled bias
    estimates = torch.randn(2, n, 12, 10, 8, generator=gen)
    expected = (weights * estimates).sum(dim=1, keepdim=True) + 0.1 * head[:, -1:]
    assert torch.allclose(fuse_estimates(head, estimates, bias_scale=0.1), expected, atol=1e-5)


def test_three_plane_formula_of_the_paper():
    gen = _seeded(20)
    w1, w2, b = torch.randn(3, 1, 1, 4, 4, 4, generator=gen)
    ax, co, sa = torch.randn(3, 1, 1, 4, 4, 4, generator=gen)
    expected = (1 / 3 + w1) * ax + (1 / 3 + w2) * co + (1 / 3 - w1 - w2) * sa + b
    got = fuse_estimates(torch.cat([w1, w2, b], 1), torch.cat([ax, co, sa], 1))
    assert torch.allclose(got, expected, atol=1e-6)


def test_half_inputs_are_fused_in_float32():
    head = torch.randn(1, 3, 4, 4, 4, generator=_seeded(21)).half()
    estimates = torch.randn(1, 3, 4, 4, 4, generator=_seeded(22)).half()
    assert fusion_weights(head).dtype == torch.float32
    fused = fuse_estimates(head, estimates)
    assert fused.dtype == torch.float32
    assert torch.allclose(fused, fuse_estimates(head.float(), estimates.float()))


def test_fusion_rejects_bad_shapes():
    with pytest.raises(InputError, match="N >= 2 channels"):
        fusion_weights(torch.zeros(1, 1, 4, 4, 4))
    with pytest.raises(InputError, match="must be a torch tensor"):
        fusion_weights([[0.0, 0.0]])
    with pytest.raises(InputError, match=r"must have the head's shape \(1, 3, 4, 4, 4\)"):
        fuse_estimates(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(InputError, match="bias_scale must be a finite number"):
        fuse_estimates(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4), bias_scale=float("inf"))


# --------------------------------------------------------------------------- feature alignment


def test_zero_initialised_alignment_leaves_the_fuser_unchanged():
    """method.md §4.5 required test: same weights, zero alignment -> bitwise-equal head."""
    plain = _randomise_(FuserUNet3D(_tiny()), seed=30).eval()
    aligned_net = FuserUNet3D(_tiny(aligned=True)).eval()
    aligned_net.load_state_dict(plain.state_dict())  # strict: alignment adds no network weights
    align = FeatureAlignment(aligned_net.config)
    cfg = aligned_net.config
    x = torch.randn(1, 9, 16, 8, 12, generator=_seeded(31))
    stacks = _stacks(cfg, 1, (16, 8, 12), seed=32)
    with torch.no_grad():
        aligned = align(stacks)
        assert {f: tuple(a.shape) for f, a in aligned.items()} == {
            4: (1, 16, 4, 2, 3), 2: (1, 16, 8, 4, 6), 1: (1, 8, 16, 8, 12)
        }
        reference = plain(x, 123)
        assert reference.abs().max() > 1e-3
        assert torch.equal(aligned_net(x, 123, aligned), reference)
        # the test can fail: a live alignment conv changes the output
        align.conv("coronal", 2).weight.normal_(generator=_seeded(33))
        changed = aligned_net(x, 123, align(stacks))
    assert (changed - reference).abs().max() > 1e-4


@pytest.mark.parametrize("factor", [4, 2, 1])
def test_each_factor_is_injected_where_the_official_network_adds_it(factor):
    """Adding a constant at the injection point equals adding it to that encoder activation by hook."""
    net = _randomise_(FuserUNet3D(_tiny(aligned=True)), seed=34).eval()
    cfg = net.config
    x = torch.randn(1, 9, 8, 8, 8, generator=_seeded(35))
    feature = torch.randn(1, cfg.injection_channels(factor), *(8 // factor,) * 3, generator=_seeded(36))
    # tiny (1 block per level): level 0 -> after encoder[0], level 1 -> after encoder[2], level 2 -> after the
    # last down-sampling conv encoder[3], whose channels are level 1's
    index = {1: 0, 2: 2, 4: 3}[factor]
    assert net.encoder[index].__class__ is (Downsample3d if factor == 4 else ResBlock3d)
    with torch.no_grad():
        expected_skip = []
        handle = net.encoder[index].register_forward_hook(lambda _m, _i, out: expected_skip.append(out))
        injected = net(x, 7, {factor: feature})
        handle.remove()
        # the next encoder module sees the activation plus the feature
        captured = {}
        nxt = net.encoder[index + 1]
        hook = nxt.register_forward_pre_hook(lambda _m, args: captured.__setitem__("in", args[0]))
        net(x, 7, {factor: feature})
        hook.remove()
    assert torch.equal(captured["in"], expected_skip[0] + feature)
    with torch.no_grad():
        assert not torch.equal(injected, net(x, 7))


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_chunked_alignment_equals_full_alignment(axis, preset):
    """Streaming (§4.5): slice groups starting at multiples of f, written at start / f.

    Computed in float64: chunk and full stack may pick different convolution algorithms, whose
    float32 summation orders differ by ~1e-5 over the paper's 4096-term sums; float64 shows the
    results agree up to rounding alone.
    """
    plane_channels = TINY_PLANE_CHANNELS if preset == "tiny" else PAPER_PLANE_CHANNELS
    cfg = fuser_config(preset, 9, 3, (("mt/plane", axis),), plane_channels)
    align = _randomise_(FeatureAlignment(cfg), seed=40 + axis).double()
    sides = (16, 8, 24)
    for factor, plane_ch in cfg.aligned_channels:
        shape = [s // factor for s in sides]
        shape[axis] = sides[axis]
        stacked = torch.randn(1, plane_ch, *shape, generator=_seeded(50 + factor), dtype=torch.float64)
        with torch.no_grad():
            full = align.align("mt/plane", factor, stacked)
            assert tuple(full.shape) == (1, cfg.injection_channels(factor), *(s // factor for s in sides))
            chunked = torch.full_like(full, float("nan"))
            start, sizes = 0, [factor, 2 * factor, 3 * factor]
            while start < sides[axis]:
                size = min(sizes[(start // factor) % len(sizes)], sides[axis] - start)
                chunk = stacked.narrow(2 + axis, start, size)
                chunked.narrow(2 + axis, start // factor, size // factor).copy_(align.align("mt/plane", factor, chunk))
                start += size
        assert (chunked - full).abs().max().item() <= 1e-12


def test_alignment_sums_sources_and_uses_state_dict_safe_keys():
    cfg = fuser_config("tiny", 13, 6, (("sr/axial", 0), ("mt/coronal", 1)), TINY_PLANE_CHANNELS)
    align = _randomise_(FeatureAlignment(cfg), seed=60)
    assert align.module_keys == {"sr/axial": "sr__axial", "mt/coronal": "mt__coronal"}
    assert "convs.mt__coronal_f4.weight" in align.state_dict()
    conv = align.conv("mt/coronal", 4)
    assert conv.kernel_size == (1, 4, 1) == conv.stride and (conv.in_channels, conv.out_channels) == (32, 16)
    assert align.conv("sr/axial", 1).kernel_size == (1, 1, 1)
    fresh = FeatureAlignment(cfg)
    assert all(torch.count_nonzero(p) == 0 for p in fresh.parameters())
    stacks = _stacks(cfg, 2, (8, 8, 8), seed=61)
    with torch.no_grad():
        summed = align(stacks)
        for factor in (4, 2, 1):
            expected = sum(align.align(s, factor, stacks[s][factor]) for s in ("sr/axial", "mt/coronal"))
            assert torch.allclose(summed[factor], expected, atol=1e-6)
    with pytest.raises(InputError, match="map to the same module key 'a__b'"):
        FeatureAlignment(fuser_config("tiny", 9, 3, (("a/b", 0), ("a__b", 1)), TINY_PLANE_CHANNELS))
    with pytest.raises(InputError, match="needs a Fuser3DConfig with aligned_sources"):
        FeatureAlignment(fuser_config("tiny", 9, 3))


def test_alignment_rejects_bad_stacks():
    cfg = _tiny(aligned=True)
    align = FeatureAlignment(cfg)
    stacks = _stacks(cfg, 1, (8, 8, 8), seed=70)
    with pytest.raises(InputError, match="unknown aligned source 'oblique'"):
        align.align("oblique", 4, stacks["axial"][4])
    with pytest.raises(InputError, match="factor 8 is not aligned"):
        align.align("axial", 8, stacks["axial"][4])
    with pytest.raises(InputError, match="span 6 slices along axis 0, not a multiple of the factor 4"):
        align.align("axial", 4, stacks["axial"][4][:, :, :6])
    with pytest.raises(InputError, match="must have 32 channels, got 16"):
        align.align("axial", 4, stacks["axial"][1])
    with pytest.raises(InputError, match=r"must be \(B, C, D, H, W\)"):
        align.align("axial", 4, stacks["axial"][4][0])
    with pytest.raises(InputError, match="must be given for the sources"):
        align({"axial": stacks["axial"]})
    with pytest.raises(InputError, match="must be given for the factors"):
        align({**stacks, "coronal": {4: stacks["coronal"][4]}})
    wrong = {**stacks, "sagittal": {f: s[..., :4] for f, s in stacks["sagittal"].items()}}
    with pytest.raises(InputError, match="do not describe one volume"):
        align(wrong)


# --------------------------------------------------------------------------- checkpointing and inputs


def test_gradient_checkpointing_gives_the_same_output_and_gradients():
    net = _randomise_(FuserUNet3D(_tiny(aligned=True)), seed=80).train()
    align = _randomise_(FeatureAlignment(net.config), seed=83)
    x = torch.randn(1, 9, 8, 8, 8, generator=_seeded(81))
    stacks = _stacks(net.config, 1, (8, 8, 8), seed=82)
    params = dict(net.named_parameters()) | {f"alignment.{n}": p for n, p in align.named_parameters()}
    results = []
    for use_checkpoint in (False, True):
        for p in params.values():
            p.grad = None
        head = net(x, 500, align(stacks), checkpoint=use_checkpoint)
        (head**2).mean().backward()
        results.append((head.detach(), {n: p.grad.clone() for n, p in params.items()}))
    (h0, g0), (h1, g1) = results
    assert torch.equal(h0, h1)
    assert g0.keys() == g1.keys()
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-7, rtol=1e-6), name
    assert g0["alignment.convs.axial_f4.weight"].abs().max() > 0


def test_bad_inputs_are_rejected_with_specific_messages():
    net = FuserUNet3D(_tiny(aligned=True))
    x = torch.zeros(1, 9, 8, 8, 8)
    with pytest.raises(InputError, match=r"must be \(B, C, D, H, W\), got shape \(9, 8, 8, 8\)"):
        net(x[0], 0)
    with pytest.raises(InputError, match="expects 9 input channels, got 8"):
        net(x[:, :8], 0)
    with pytest.raises(InputError, match="sides must be multiples of 4 for 3 levels, got 8x8x6"):
        net(x[..., :6], 0)
    with pytest.raises(InputError, match=r"t must have shape \(1,\)"):
        net(x, torch.zeros(2))
    with pytest.raises(InputError, match="got a bool"):
        net(x, True)
    with pytest.raises(InputError, match=r"factor 4 must have shape \(1, 16, 2, 2, 2\), got \(1, 32, 2, 2, 2\)"):
        net(x, 0, {4: torch.zeros(1, 32, 2, 2, 2)})
    with pytest.raises(InputError, match="factor 8 are not configured; this fuser aligns"):
        net(x, 0, {8: torch.zeros(1, 16, 1, 1, 1)})
    with pytest.raises(InputError, match="factor 1 are not configured; this fuser aligns none"):
        FuserUNet3D(_tiny())(x, 0, {1: torch.zeros(1, 8, 8, 8, 8)})
    with pytest.raises(InputError, match="needs a Fuser3DConfig"):
        FuserUNet3D({"in_channels": 9})
