import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lipdet.boxes import PriorSpec, decode, encode, feature_sizes_for, flatten_head_outputs, make_priors


def test_prior_count_at_74():
    spec = PriorSpec(feature_sizes=feature_sizes_for(74))
    assert spec.feature_sizes == (18, 9, 4, 2)
    assert spec.num_priors == 1700
    priors = make_priors(spec)
    assert priors.shape == (1700, 4)
    assert priors.min() >= 0 and priors.max() <= 1


def test_prior_order_matches_flatten():
    """The head output at (map m, y, x, anchor a) must land on the prior built for that cell."""
    spec = PriorSpec(feature_sizes=(3, 2), scales=(0.2, 0.5), aspect_ratios=(1.0, 0.5))
    priors = make_priors(spec)
    a = spec.anchors_per_location
    loc_maps, cls_maps = [], []
    for s in spec.feature_sizes:
        # Encode each cell's centre in the loc channels so the flattened order can be read back.
        ys, xs = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
        cx, cy = (xs + 0.5) / s, (ys + 0.5) / s
        m = torch.stack([cx, cy, torch.zeros_like(cx), torch.zeros_like(cx)], 0).repeat(a, 1, 1)
        loc_maps.append(m[None])
        cls_maps.append(torch.zeros(1, a * 3, s, s))
    loc, cls = flatten_head_outputs(loc_maps, cls_maps, num_classes=3)
    assert loc.shape == (1, spec.num_priors, 4) and cls.shape == (1, spec.num_priors, 3)
    torch.testing.assert_close(loc[0, :, :2], priors[:, :2])


@settings(max_examples=30, deadline=None)
@given(
    x1=st.floats(0.0, 0.8), y1=st.floats(0.0, 0.8), w=st.floats(0.02, 0.2), h=st.floats(0.02, 0.2)
)
def test_encode_decode_round_trip(x1, y1, w, h):
    priors = make_priors(PriorSpec())
    box = torch.tensor([[x1, y1, x1 + w, y1 + h]]).expand(priors.shape[0], 4)
    torch.testing.assert_close(decode(encode(box, priors), priors), box, atol=1e-5, rtol=1e-5)
