"""Feature layouts (featkd.layouts): the channels-first view against explicit permutes and loops, what a shape
allows, and how a layout is resolved: given > stated by the model > the one reading of the shape > refused."""

import pytest
import torch

from featkd.layouts import (CapturedFeature, Layout, canonical_shape, parse_layout, plausible_grid, readings,
                            resolve_layout, to_channels_first)


def tokens_to_map_by_loops(tokens, prefix, h, w):
    """(B, prefix + h*w, C) -> (B, C, h, w), one position at a time (row-major patch order, as ViTs flatten)."""
    b, _, c = tokens.shape
    out = torch.empty(b, c, h, w, dtype=tokens.dtype)
    for i in range(h):
        for j in range(w):
            out[:, :, i, j] = tokens[:, prefix + i * w + j, :]
    return out


def test_channels_last_view_is_the_permuted_map():
    f = torch.randn(2, 4, 5, 7)  # (B, H, W, C)
    view = to_channels_first(f, "NHWC")
    assert view.shape == (2, 7, 4, 5)
    for c in range(7):
        torch.testing.assert_close(view[:, c], f[..., c])
    assert to_channels_first(f, "NCHW") is f


def test_tokens_drop_prefix_and_land_on_their_grid():
    tokens = torch.randn(2, 2 + 3 * 4, 6)
    layout = Layout("NLC", prefix_tokens=2, grid=(3, 4))
    torch.testing.assert_close(to_channels_first(tokens, layout), tokens_to_map_by_loops(tokens, 2, 3, 4))
    prefix = to_channels_first(tokens, Layout("NLC", 2, (3, 4), tokens="prefix"))
    torch.testing.assert_close(prefix, tokens[:, :2].permute(0, 2, 1))
    every = to_channels_first(tokens, Layout("NLC", 2, (3, 4), tokens="all"))
    torch.testing.assert_close(every, tokens.permute(0, 2, 1))
    flat = to_channels_first(tokens, Layout("NLC", prefix_tokens=2))  # no grid: (B, C, N)
    torch.testing.assert_close(flat, tokens[:, 2:].permute(0, 2, 1))


@pytest.mark.parametrize("shape, layout", [
    ((2, 3, 4, 5), Layout("NCHW")), ((2, 4, 5, 3), Layout("NHWC")), ((2, 13, 8), Layout("NLC", 1, (3, 4))),
    ((2, 13, 8), Layout("NLC", 1, (3, 4), "prefix")), ((2, 8, 12), Layout("NCL", grid=(3, 4))),
    ((2, 8, 12), Layout("NCL"))])
def test_canonical_shape_is_the_views_shape(shape, layout):
    assert canonical_shape(shape, layout) == tuple(to_channels_first(torch.zeros(shape), layout).shape)


def test_a_grid_that_does_not_hold_the_tokens_is_refused():
    with pytest.raises(ValueError, match="a 3x3 grid holds 9 tokens, the feature has 12"):
        canonical_shape((2, 13, 8), Layout("NLC", 1, (3, 3)))


@pytest.mark.parametrize("grid, size, plausible", [
    ((7, 7), (224, 224), True), ((14, 14), (224, 224), True), ((33, 33), (65, 65), True),
    ((2, 3), (64, 96), True), ((1, 1), (64, 96), True),  # a global pool fits any input
    ((7, 768), (224, 224), False),  # a channels-last Swin map read channels-first
    ((56, 96), (224, 224), False), ((13, 15), (224, 224), False), ((1, 2), (32, 32), False)])
def test_plausible_grids(grid, size, plausible):
    assert plausible_grid(grid, size) is plausible


def test_readings_of_shapes():
    assert [r.kind for r in readings((2, 4, 4, 384), (64, 64))] == ["NHWC"]  # the Swin map
    assert [r.kind for r in readings((2, 384, 4, 4), (64, 64))] == ["NCHW"]
    assert [r.kind for r in readings((2, 8, 8, 8), (64, 64))] == ["NCHW", "NHWC"]
    (vit,) = readings((2, 197, 768), (224, 224))
    assert (vit.kind, vit.prefix_tokens, vit.grid) == ("NLC", 1, (14, 14))
    (registers,) = readings((2, 201, 384), (224, 224))  # class token + 4 registers
    assert (registers.prefix_tokens, registers.grid) == (5, (14, 14))


def test_parse_layout_names_aliases_and_mappings():
    assert parse_layout("nhwc") == Layout("NHWC") and parse_layout("tokens") == Layout("NLC")
    assert parse_layout("channels_first", rank=4) == Layout("NCHW")
    assert parse_layout("channels_first", rank=3) == Layout("NCL")
    assert parse_layout({"kind": "tokens", "prefix_tokens": 2, "tokens": "prefix"}) == Layout("NLC", 2, None, "prefix")
    assert parse_layout({"kind": "NLC", "grid": [3, 4]}).grid == (3, 4)
    with pytest.raises(ValueError, match="unknown layout 'NWHC'; choose one of 'NCHW'.*'NHWC'.*'NLC'.*'NCL'"):
        parse_layout("NWHC")
    with pytest.raises(ValueError, match="unknown token selection 'cls'; choose one of patch, prefix, all"):
        parse_layout({"kind": "NLC", "tokens": "cls"})
    with pytest.raises(ValueError, match=r"unknown layout key\(s\) \['prefix'\]"):
        parse_layout({"kind": "NLC", "prefix": 1})
    with pytest.raises(ValueError, match="apply to tokens"):
        Layout("NHWC", prefix_tokens=1)


def feature(shape, known=None, size=(64, 64)):
    return CapturedFeature(tuple(shape), known, size)


def test_the_model_beats_the_shape_and_a_given_layout_completes_what_the_model_states():
    stated = Layout("NHWC", source="model")
    assert resolve_layout(None, feature((2, 4, 4, 384), stated), "x") is stated
    assert resolve_layout("NHWC", feature((2, 4, 4, 384), stated), "x") == Layout("NHWC")
    assert resolve_layout(None, feature((2, 4, 4, 384)), "x").source == "shape"
    # a shape that reads both ways: the given layout settles it
    assert resolve_layout("NHWC", feature((2, 8, 8, 8)), "x") == Layout("NHWC")


# Issue #19: a given layout that contradicted the model (or the input size) was the user's word, and a loss
# compared 28 channels on a 16x28 grid (the WRN map read channels-last).
def test_a_given_layout_that_contradicts_the_model_is_refused_with_both_readings():
    wrn_map = feature((2, 16, 28, 28), Layout("NCHW", source="model"), size=(28, 28))
    with pytest.raises(ValueError) as error:
        resolve_layout("NHWC", wrn_map, "student layer 'group1'", "student_layout")
    assert str(error.value) == (
        "student layer 'group1': student_layout NHWC given, which reads the shape (2, 16, 28, 28) as 28 channels on a "
        "16x28 grid, but the model states NCHW (16 channels on a 28x28 grid); leave student_layout (and layout, "
        "which sets both sides) unset to use the model's layout")
    with pytest.raises(ValueError, match=r"^x: layout NCHW given, which reads the shape \(2, 4, 4, 384\) as 4 channels "
                                         r"on a 4x384 grid, but the model states NHWC \(384 channels on a 4x4 grid\); "
                                         r"leave layout unset"):
        resolve_layout("NCHW", feature((2, 4, 4, 384), Layout("NHWC", source="model")), "x")


def test_a_given_layout_that_no_reading_of_the_shape_allows_is_refused():
    with pytest.raises(ValueError, match=r"student_layout NHWC given, which reads the shape \(2, 16, 28, 28\) as 28 "
                                         r"channels on a 16x28 grid, but with a 28x28 input the shape reads only as "
                                         r"NCHW \(16 channels on a 28x28 grid\); set student_layout to that"):
        resolve_layout("NHWC", feature((2, 16, 28, 28), size=(28, 28)), "x", "student_layout")
    # not an image: nothing to check a layout against
    assert resolve_layout("NHWC", CapturedFeature((2, 16, 28, 28), None, None), "x") == Layout("NHWC")


@pytest.mark.parametrize("given, reads", [
    ({"kind": "NLC", "prefix_tokens": 1, "grid": [2, 8]}, "{kind: NLC, prefix_tokens: 1, grid: [2, 8]} given, which "
                                                          "reads the shape (2, 17, 32) as 32 channels on a 2x8 grid"),
    ({"kind": "NLC", "prefix_tokens": 0}, "{kind: NLC, prefix_tokens: 0} given, which reads the shape (2, 17, 32) as "
                                          "32 channels at 17 positions"),
    ({"kind": "NLC", "prefix_tokens": 2}, "as 32 channels at 15 positions, 2 prefix token(s)"),
])
def test_a_given_token_grid_or_prefix_count_that_contradicts_the_model_is_refused(given, reads):
    vit_tokens = feature((2, 17, 32), Layout("NLC", 1, (4, 4), source="model"), size=(64, 64))
    with pytest.raises(ValueError) as error:
        resolve_layout(given, vit_tokens, "teacher layer 'encoder'", "teacher_layout")
    assert reads in str(error.value)
    assert ("but the model states {kind: NLC, prefix_tokens: 1} (32 channels on a 4x4 grid, 1 prefix token(s)); "
            "leave teacher_layout") in str(error.value)
    # what the model states, given in full or in part, is no contradiction
    for agreeing in ({"kind": "NLC", "prefix_tokens": 1, "grid": [4, 4]}, {"kind": "NLC", "tokens": "prefix"}):
        assert resolve_layout(agreeing, vit_tokens, "x").grid == (4, 4)


def test_an_ambiguous_shape_is_refused_with_the_readings():
    with pytest.raises(ValueError, match=r"student layer 'blk' gives a feature of shape \(2, 8, 8, 8\) whose layout "
                                         r"the model does not state.*64x64 input: NCHW \(8 channels on a 8x8 grid\) "
                                         r"or NHWC \(8 channels on a 8x8 grid\); set student_layout"):
        resolve_layout(None, feature((2, 8, 8, 8)), "student layer 'blk'", "student_layout")
    with pytest.raises(ValueError, match=r"prefix_tokens: 1\}.*2x2 grid.*or \{kind: NLC, prefix_tokens: 4\}"):
        resolve_layout(None, feature((2, 5, 768), size=(32, 32)), "teacher layer 'enc'", "teacher_layout")
    # naming the prefix count settles it
    settled = resolve_layout({"kind": "NLC", "prefix_tokens": 1}, feature((2, 5, 768), size=(32, 32)), "x")
    assert settled.grid == (2, 2)


def test_given_tokens_take_prefix_and_grid_from_the_model_or_shape():
    stated = Layout("NLC", 1, (4, 4), source="model")
    resolved = resolve_layout({"kind": "NLC", "tokens": "prefix"}, feature((2, 17, 32), stated), "x")
    assert (resolved.prefix_tokens, resolved.grid, resolved.tokens) == (1, (4, 4), "prefix")
    resolved = resolve_layout("tokens", feature((2, 197, 768), size=(224, 224)), "x")
    assert (resolved.prefix_tokens, resolved.grid) == (1, (14, 14))


def test_a_layout_of_the_wrong_rank_says_what_the_tensor_could_be():
    with pytest.raises(ValueError, match=r"student layer 'layer3': layout 'NLC' expects \(B, N, C\), got a feature of "
                                         r"shape \(2, 256, 14, 14\); a 4-d feature is one of NCHW, NHWC"):
        resolve_layout("tokens", feature((2, 256, 14, 14), size=(224, 224)), "student layer 'layer3'",
                       "student_layout")
    assert resolve_layout(None, feature((2, 10)), "x") is None  # a vector has no layout


def test_tokens_whose_prefix_nothing_tells_are_refused_unless_all_are_kept():
    not_an_image = CapturedFeature((2, 10, 8), None, None)
    with pytest.raises(ValueError, match=r"tokens of shape \(2, 10, 8\) whose prefix tokens .* neither the model nor "
                                         r"the shape tells; set layout to \{kind: NLC, prefix_tokens: k\}"):
        resolve_layout("tokens", not_an_image, "x")
    assert canonical_shape((2, 10, 8), resolve_layout({"kind": "NLC", "prefix_tokens": 0}, not_an_image, "x")) == (
        2, 8, 10)
    assert resolve_layout({"kind": "NLC", "tokens": "all"}, not_an_image, "x").tokens == "all"
