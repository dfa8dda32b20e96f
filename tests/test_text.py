"""Text conditioning (chapter 12): attention written out, the tiny text encoder, the U-Net with
cross-attention, training on captions, saving and loading, guidance with the empty caption."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from ddpm_lib import NoiseSchedule
from ddpm_lib import train as train_module
from ddpm_lib.captions import PAD_ID, VOCABULARY, captioned_dataset, tokenize
from ddpm_lib.guidance import guided_model, guided_text_model
from ddpm_lib.layers import CrossAttentionBlock, MultiHeadAttention, attention
from ddpm_lib.objectives import diffusion_loss
from ddpm_lib.pretrained import load_weights, save_weights
from ddpm_lib.text import TextConditionedUNet, TextEncoder, attention_maps
from ddpm_lib.train import train
from ddpm_lib.unet import UNet

SMALL = dict(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(14,),
             dropout=0.0, text_dim=32, num_heads=2)


def text_unet(seed=0, **overrides):
    torch.manual_seed(seed)
    return TextConditionedUNet(**{**SMALL, **overrides}).eval()


def reference_attention(q, k, v, mask):
    """softmax(Q K^T / sqrt(d)) V in float64, one query at a time."""
    q, k, v = q.double(), k.double(), v.double()
    mask = mask.expand(*q.shape[:-1], k.shape[-2])
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
    for index in itertools.product(*map(range, q.shape[:-1])):     # (batch..., query)
        scores = k[index[:-1]] @ q[index] / math.sqrt(q.shape[-1])
        keep = mask[index]
        weights = torch.exp(scores - scores[keep].max()) * keep
        out[index] = (weights / weights.sum()) @ v[index[:-1]]
    return out


def test_attention_is_softmax_of_scaled_scores():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 16, generator=g) * 2 for _ in range(3))
    mask = torch.rand(2, 1, 1, 5, generator=g) > 0.4
    mask[..., 0] = True                             # every query has a key to look at
    out, weights = attention(q, k, v, mask)
    assert torch.allclose(out.double(), reference_attention(q, k, v, mask), atol=1e-5)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-5)
    assert torch.equal(weights * ~mask, torch.zeros_like(weights))      # padding: weight 0
    assert torch.allclose(weights.sum(-1), torch.ones(2, 3, 5))
    assert torch.allclose(attention(q, k, v)[0], F.scaled_dot_product_attention(q, k, v), atol=1e-5)


def test_multi_head_attention_splits_the_channels_into_heads():
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 6, num_heads=2)
    x, context = torch.randn(3, 4, 8), torch.randn(3, 5, 6)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 1, 0, 1]], dtype=torch.bool)
    out, weights = mha(x, context, mask)
    heads = []
    for h in range(2):
        part = slice(4 * h, 4 * h + 4)
        q = x @ mha.to_q.weight[part].T
        k, v = context @ mha.to_k.weight[part].T, context @ mha.to_v.weight[part].T
        heads.append(reference_attention(q, k, v, mask[:, None, :]))
    expected = mha.to_out(torch.cat(heads, -1).float())
    assert torch.allclose(out, expected, atol=1e-5)
    assert weights.shape == (3, 2, 4, 5)
    with pytest.raises(ValueError, match=r"dim \(8\) must be divisible by num_heads \(3\)"):
        MultiHeadAttention(8, 6, num_heads=3)


def test_cross_attention_ignores_padding_and_survives_the_empty_caption():
    torch.manual_seed(0)
    block = CrossAttentionBlock(8, context_dim=6, num_heads=2)
    x, context = torch.randn(2, 8, 7, 7), torch.randn(2, 4, 6)
    is_word = torch.tensor([[True, True, False, False], [False] * 4])    # second: empty caption
    block.record = True
    out = block(x, context, is_word)
    weights = block.weights                                  # (B, heads, HW, 1 + L)
    assert weights.shape == (2, 2, 49, 5) and torch.isfinite(out).all()
    assert (weights[0, :, :, 3:] == 0).all() and (weights[1, :, :, 1:] == 0).all()
    assert torch.equal(weights[1, :, :, 0], torch.ones(2, 49))          # all on the null token
    # what the padding holds cannot matter, and the empty caption is the same as no caption
    noisy = torch.where(is_word[..., None], context, torch.randn(2, 4, 6) * 1e3)
    assert torch.allclose(block(x, noisy, is_word), out, atol=1e-6)
    none = block(x[1:], context[1:, :0], is_word[1:, :0])
    assert torch.allclose(none, out[1:], atol=1e-6)


def test_the_text_encoder_reads_words_not_padding():
    torch.manual_seed(0)
    encoder = TextEncoder(29, max_len=8, dim=16, num_layers=2, num_heads=2).eval()
    long = tokenize(["a small dark coat", ""], max_len=8)
    features, is_word = encoder(long)
    assert features.shape == (2, 8, 16) and is_word[0].tolist() == [True] * 4 + [False] * 4
    assert torch.isfinite(features).all()                      # even for the all-padding row
    short, _ = encoder(long[:1, :5])                            # less padding: the same words
    assert torch.allclose(short[0, :4], features[0, :4], atol=1e-5)
    # order matters: without positions, swapping two words would only swap their features
    swapped, _ = encoder(tokenize(["a dark small coat"], max_len=8))
    assert (swapped[0, [0, 2, 1, 3]] - features[0, :4]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="more than this encoder's max_len=8"):
        encoder(torch.zeros(1, 9, dtype=torch.long))


def test_the_text_unet_is_the_unet_plus_cross_attention():
    model = text_unet()
    torch.manual_seed(0)
    plain = UNet(**{k: v for k, v in SMALL.items() if k != "text_dim"})
    ours = model.state_dict()
    for key, value in plain.state_dict().items():         # the same names, built the same way
        assert torch.equal(ours[key], value), key
    blocks = model.cross_attention_blocks()
    assert len(blocks) == 4 and blocks[1] is model.mid_cross      # 1 down, the middle, 2 up
    assert all(isinstance(b, CrossAttentionBlock) for b in blocks)


def test_the_caption_steers_the_text_unet():
    model = text_unet()
    for p in model.parameters():            # move away from the initial weights a little
        p.data.add_(torch.randn_like(p) * 0.05)
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([5, 500, 900])
    tokens = model.tokenize(["a dark bag", "a light bag", ""])
    eps = model(x, t, tokens)
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    assert (eps[0] - model(x[:1], t[:1], tokens[1:2])[0]).abs().mean() > 1e-4
    assert torch.allclose(model(x, t), model(x, t, tokenize(["", "", ""])), atol=1e-5)
    maps = attention_maps(model, x, t, tokens)
    assert [m.shape for m in maps] == [(3, 9, 14, 14)] * 4
    assert torch.allclose(maps[2].sum(1), torch.ones(3, 14, 14), atol=1e-5)
    assert (maps[0][0, 4:] == 0).all() and (maps[0][2, 1:] == 0).all()
    assert all(not b.record and b.weights is None for b in model.cross_attention_blocks())


def test_bad_tokens_and_configurations_are_refused():
    model = text_unet()
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"tokens must be a tensor of shape \(2, L\)"):
        model(x, t, tokenize(["a bag"]))
    with pytest.raises(ValueError, match="tokens must be integers"):
        model(x, t, tokenize(["a bag", "a coat"]).float())
    with pytest.raises(ValueError, match=r"ids in 0\.\.28"):
        model(x, t, torch.full((2, 3), 40))
    with pytest.raises(ValueError, match="not class labels"):
        TextConditionedUNet(**SMALL, num_classes=10)
    with pytest.raises(ValueError, match="must start with the padding"):
        TextConditionedUNet(vocabulary=("a", "bag"), **SMALL)


@pytest.fixture(scope="module")
def captioned(fashion):
    return captioned_dataset(fashion.train[:256], fashion.train_labels[:256], seed=0)


def test_the_text_model_trains_with_caption_dropout(captioned, monkeypatch):
    seen = []

    def recording_loss(model, schedule, x0, t, eps, y=None, **kw):
        seen.append(y.clone())
        return diffusion_loss(model, schedule, x0, t, eps, y=y, **kw)

    monkeypatch.setattr(train_module, "diffusion_loss", recording_loss)
    result = train(text_unet(), NoiseSchedule.linear(), captioned.images, labels=captioned.tokens,
                   steps=30, batch_size=32, lr=2e-3, log_every=10, label_dropout=0.3,
                   progress=False)
    losses = result.history["loss"]
    assert len(losses) == 3 and losses[-1] < 0.6 * losses[0], losses
    rows = torch.cat(seen)
    empty = (rows == PAD_ID).all(1)
    assert 0.15 < empty.float().mean() < 0.45            # whole rows dropped to the empty caption
    known = {tuple(r) for r in captioned.tokens.tolist()}
    assert all(tuple(r) in known for r in rows[~empty].tolist())    # the others intact


def test_a_text_run_resumes_exactly(captioned, tmp_path):
    """Caption dropout draws from the run's generators: a resumed run is the uninterrupted one."""
    kw = dict(batch_size=8, lr=1e-3, log_every=2, label_dropout=0.5, progress=False)
    schedule = NoiseSchedule.linear(T=100)
    straight = train(text_unet(), schedule, captioned.images, labels=captioned.tokens, steps=4, **kw)
    ckpt = tmp_path / "text_run.pt"
    train(text_unet(), schedule, captioned.images, labels=captioned.tokens, steps=2, checkpoint=ckpt, **kw)
    resumed = train(text_unet(seed=5), schedule, captioned.images, labels=captioned.tokens, steps=4,
                    checkpoint=ckpt, **kw)
    assert resumed.resumed_from == 2 and resumed.history["loss"] == straight.history["loss"]
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_text_training_data_is_checked(captioned):
    model = text_unet()
    with pytest.raises(ValueError, match=r"caption tokens \(labels\) must be a tensor of shape"):
        train(model, NoiseSchedule.linear(T=10), captioned.images, labels=captioned.tokens[:10],
              steps=1, progress=False)
    with pytest.raises(ValueError, match=r"caption tokens \(labels\) must be ids in 0\.\.28"):
        train(model, NoiseSchedule.linear(T=10), captioned.images,
              labels=captioned.tokens + 100, steps=1, progress=False)


def test_weights_save_and_load_to_the_same_outputs(captioned, tmp_path):
    schedule = NoiseSchedule.linear(T=100)
    result = train(text_unet(), schedule, captioned.images, labels=captioned.tokens, steps=3,
                   batch_size=8, progress=False)
    save_weights(result.ema_model, schedule, tmp_path / "text.pt", {"note": "test"})
    loaded, loaded_schedule, meta = load_weights(tmp_path / "text.pt")
    assert isinstance(loaded, TextConditionedUNet) and meta == {"note": "test"}
    assert loaded.config == result.ema_model.config and loaded.vocabulary == VOCABULARY
    assert torch.equal(loaded_schedule.betas, schedule.betas)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 70])
    tokens = tokenize(["a small dark coat", ""])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, tokens), result.ema_model.eval()(x, t, tokens))


def test_guidance_with_the_empty_caption():
    model = text_unet()
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([100, 100])
    tokens = model.tokenize(["a dark coat", "bags, small"])
    with torch.no_grad():
        cond, empty = model(x, t, tokens), model(x, t, tokenize(["", ""]))
        assert torch.equal(guided_text_model(model, tokens, 1.0)(x, t), cond)
        assert torch.equal(guided_text_model(model, tokens, 0.0)(x, t), empty)
        assert torch.equal(guided_text_model(model, ["a dark coat", "bags, small"], 1.0)(x, t), cond)
        w = 3.0
        assert torch.allclose(guided_text_model(model, tokens, w)(x, t),
                              empty + w * (cond - empty), atol=1e-5)
        # one caption for the whole batch, as a string or as tokens (L,)
        one = guided_text_model(model, "a dark coat", 2.0)(x, 100)
        assert torch.allclose(one, guided_text_model(model, tokens[0], 2.0)(x, t))
    calls = []
    counted = lambda x_t, t, y: calls.append(x_t.shape[0]) or model(x_t, t, y)   # noqa: E731
    guided_text_model(counted, tokens, 3.0)(x, t)
    assert calls == [4]                                      # one batched call of 2B
    with pytest.raises(ValueError, match="3 captions for a batch of 2"):
        guided_text_model(model, tokenize(["a", "a", "a"]), 2.0)(x, t)
    with pytest.raises(ValueError, match="w must be finite and >= 0"):
        guided_text_model(model, tokens, -1.0)


def test_guidance_towards_a_word():
    """null= another caption: (1 - w) eps(null) + w eps(caption), in one call of 2B."""
    model = text_unet()
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([300, 300])
    with torch.no_grad():
        cond = model(x, t, model.tokenize(["a dark coat"] * 2))
        base = model(x, t, model.tokenize(["a coat"] * 2))
        empty = model(x, t, model.tokenize(["", ""]))
        towards = guided_text_model(model, "a dark coat", 4.0, null="a coat")
        assert torch.allclose(towards(x, t), base + 4.0 * (cond - base), atol=1e-5)
        assert not torch.allclose(towards(x, t), empty + 4.0 * (cond - empty), atol=1e-3)
        assert torch.equal(guided_text_model(model, "a dark coat", 0.0, null="a coat")(x, t), base)
        # the default null is the empty caption, as text or as padding ids
        assert torch.allclose(guided_text_model(model, "a dark coat", 2.0, null=tokenize(""))(x, t),
                              guided_text_model(model, "a dark coat", 2.0)(x, t))
    with pytest.raises(ValueError, match="same max_len"):
        guided_text_model(model, "a dark coat", 2.0, null=tokenize("a coat", max_len=4))
    with pytest.raises(ValueError, match="2 null captions for a batch of 3"):
        guided_text_model(model, "a coat", 2.0, null=["a coat", "a bag"])(torch.randn(3, 1, 28, 28), 100)


def test_class_guidance_is_unchanged():
    """guided_model (chapter 9) still makes one call of 2B and the same combination."""
    torch.manual_seed(0)
    model = UNet(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(),
                 num_classes=10).eval()
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([5, 5]), torch.tensor([3, 7])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, torch.tensor([10, 10]))
        assert torch.equal(guided_model(model, y, 1.0)(x, t), cond)
        assert torch.equal(guided_model(model, y, 0.0)(x, t), uncond)
        assert torch.allclose(guided_model(model, y, 2.5)(x, t), uncond + 2.5 * (cond - uncond),
                              atol=1e-5)
