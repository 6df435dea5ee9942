"""The CPU sampler of the hf rollout backend draws from the right distribution."""

import pytest
import torch

from evostar.rollout.hf import InverseCDFSampler


def draw(logits: list[float], n: int, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    scores = torch.tensor(logits).repeat(n, 1)
    out = InverseCDFSampler(temperature, top_p)(torch.zeros(n, 1, dtype=torch.long), scores)
    assert torch.isfinite(out).sum(dim=1).eq(1).all(), "exactly one token left per row"
    return out.argmax(dim=1)


def test_frequencies_match_the_tempered_softmax():
    torch.manual_seed(0)
    logits = [2.0, 1.0, 0.0, -1.0, -3.0]
    n = 200_000
    counts = torch.bincount(draw(logits, n, temperature=0.7), minlength=5).double()
    expected = torch.softmax(torch.tensor(logits, dtype=torch.float64) / 0.7, dim=0)
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((counts / n - expected).abs() < 5 * sigma + 1e-9).all(), (counts / n, expected)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    torch.manual_seed(1)
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    n = 100_000
    tokens = draw(probs.log().tolist(), n, temperature=1.0, top_p=0.7)
    counts = torch.bincount(tokens, minlength=4).double() / n
    assert counts[0] == 0 and counts[2] == 0  # 0.5 + 0.3 >= 0.7: the rest is cut
    assert abs(counts[1] - 0.625) < 0.01 and abs(counts[3] - 0.375) < 0.01


def test_never_draws_masked_tokens_and_is_seeded():
    logits = [0.0, float("-inf"), 0.0, float("-inf")]
    torch.manual_seed(2)
    a = draw(logits, 10_000, temperature=1.3)
    torch.manual_seed(2)
    b = draw(logits, 10_000, temperature=1.3)
    assert torch.equal(a, b)
    assert set(a.unique().tolist()) == {0, 2}


@pytest.mark.parametrize("bad", [dict(temperature=0.0), dict(temperature=1.0, top_p=0.0)])
def test_refuses_values_that_are_not_sampling(bad):
    with pytest.raises(ValueError):
        InverseCDFSampler(**bad)


def test_prompt_cache_tells_apart_samples_that_share_an_id(tmp_path):
    """Two data files may both hold an id "1": each must be encoded from its own image."""
    from PIL import Image

    from evostar.models.hub import load_processor
    from evostar.models.inputs import VLMInputs
    from evostar.models.tiny import build_tiny_qwen2_vl
    from evostar.records import Sample

    model_dir = build_tiny_qwen2_vl(["How many? The answer is 3."], tmp_path / "model")
    io = VLMInputs(load_processor(model_dir))
    paths = []
    for name, shade in (("black", 0), ("white", 255)):
        paths.append(tmp_path / f"{name}.png")
        Image.new("RGB", (84, 28), (shade, shade, shade)).save(paths[-1])
    a, b = (Sample(id="1", question="How many?", image=str(p)) for p in paths)
    pixels_a = io.encode_prompt(a)["pixel_values"]
    pixels_b = io.encode_prompt(b)["pixel_values"]
    assert not torch.equal(pixels_a, pixels_b)
    assert torch.equal(io.encode_prompt(a)["pixel_values"], pixels_a)
