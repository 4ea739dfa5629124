"""Text conditioning: encoders from folders (tiny random BERT, CLIP and T5 the tests save), key padding masks,
MM-DiT's joint attention by hand, classifier-free guidance on prompts, and a text-to-image run end to end."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from sdeflow import Denoiser, EDMProcess
from sdeflow.cli import main
from sdeflow.core.condition import TextCondition, cat_conditions, null_condition
from sdeflow.models import MMDiT, UNet
from sdeflow.models.cross_attention import GEGLU, SpatialTransformer
from sdeflow.models.dit import sincos_pos_embed_2d
from sdeflow.models.layers import attention, attention_reference
from sdeflow.models.mmdit import MMDiTBlock
from sdeflow.models.text_encoder import CaptionTable, TextEncoder, resolve_text_encoder
from sdeflow.sampling import sample
from sdeflow.sampling.guidance import ClassifierFreeGuidance
from sdeflow.sampling.prompts import sample_prompts

transformers = pytest.importorskip("transformers")
WORDS = ("a an one two three small large red green blue yellow purple cyan circle square triangle cross circles "
         "squares triangles crosses at the in on top bottom left right center corner of to above below and , picture "
         "image drawing").split()  # fmt: skip


def _tokenizer(folder):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizer(str(folder / "vocab.txt"), model_max_length=64)
    tok.save_pretrained(folder)
    return tok


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """Folders of tiny random text encoders saved with save_pretrained (BERT-style, CLIP text, T5 encoder)."""
    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    out = {}
    tok = _tokenizer(root / "bert")
    bert = transformers.BertConfig(vocab_size=len(tok), hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=64)  # fmt: skip
    transformers.BertModel(bert).save_pretrained(root / "bert")
    out["bert"] = root / "bert"
    _tokenizer(root / "clip")
    clip = transformers.CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, max_position_embeddings=64,
                                       eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id,
                                       pad_token_id=tok.pad_token_id)  # fmt: skip
    transformers.CLIPTextModel(clip).save_pretrained(root / "clip")
    out["clip"] = root / "clip"
    _tokenizer(root / "t5")
    t5 = transformers.T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                               decoder_start_token_id=0)  # fmt: skip
    transformers.T5EncoderModel(t5).save_pretrained(root / "t5")
    out["t5"] = root / "t5"
    return out


@pytest.fixture(scope="module")
def bert(encoders):
    return TextEncoder.from_folder(str(encoders["bert"]), max_length=16)


def test_bert_style_encoder_pools_the_masked_mean(bert):
    prompts = ["a red circle above a blue square", "two green crosses", ""]
    c = bert.encode(prompts)
    batch = bert.tokenizer(prompts, padding=True, return_tensors="pt")
    assert torch.equal(c.mask, batch["attention_mask"].bool())
    with torch.no_grad():
        states = bert.model(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    assert torch.allclose(c.pooled, (states * m).sum(1) / m.sum(1), atol=1e-6)
    assert torch.allclose(c.tokens[c.mask], states[c.mask], atol=1e-6)
    assert (c.tokens[~c.mask] == 0).all()
    assert bert.pooling == "mean" and bert.width == 24 and c.tokens.shape == (3, c.mask.sum(1).max(), 24)


def test_encodings_are_cached_per_prompt(bert, monkeypatch):
    bert.encode(["a red circle"])
    calls = []
    original = bert._encode_new
    monkeypatch.setattr(bert, "_encode_new", lambda ps: (calls.append(list(ps)), original(ps)))
    a = bert.encode(["a red circle", "a blue square", "a blue square"])
    assert calls == [["a blue square"]]  # the cached prompt and the repeat are not encoded again
    b = bert.encode(["a blue square"])
    assert torch.equal(a.tokens[1:2, : b.tokens.shape[1]], b.tokens) and torch.equal(a.pooled[2], b.pooled[0])


def test_over_long_prompts_are_cut_with_a_warning(bert):
    long = " ".join(["a red circle"] * 20)
    with pytest.warns(UserWarning, match="longer than the text encoder's 16 tokens"):
        c = bert.encode([long + " and a blue square"])
    assert c.tokens.shape[1] == 16 and c.mask.all()


def test_clip_pools_the_end_token_and_t5_the_mean(encoders):
    clip = TextEncoder.from_folder(str(encoders["clip"]))
    assert clip.pooling == "eos" and clip.width == 16
    prompts = ["a red circle", "two small blue squares at the top"]
    c = clip.encode(prompts)
    ids = clip.tokenizer(prompts, padding=True, return_tensors="pt")["input_ids"]
    eos = (ids == clip.tokenizer.sep_token_id).int().argmax(1)
    with torch.no_grad():
        out = clip.model(input_ids=ids, attention_mask=(ids != 0).long())
    assert torch.allclose(c.pooled, out.pooler_output, atol=1e-6)
    assert torch.allclose(c.pooled, out.last_hidden_state[torch.arange(2), eos], atol=1e-6)  # the final-LN EOS state
    t5 = TextEncoder.from_folder(str(encoders["t5"]))
    assert t5.pooling == "mean" and t5.width == 16
    d = t5.encode(prompts)
    assert torch.allclose(d.pooled, (d.tokens * d.mask[..., None]).sum(1) / d.mask.sum(1, keepdim=True), atol=1e-6)


def test_bundled_minilm_loads_offline_with_sentence_transformers_pooling():
    enc = TextEncoder.from_folder("minilm")
    assert enc.width == 384 and enc.pooling == "mean_normalized"
    c = enc.encode(["a red circle above a blue square"])
    assert torch.allclose(c.pooled.norm(dim=-1), torch.ones(1), atol=1e-5)
    mean = (c.tokens * c.mask[..., None]).sum(1) / c.mask.sum(1, keepdim=True)
    assert torch.allclose(c.pooled, F.normalize(mean, dim=-1), atol=1e-5)


def test_missing_encoder_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_text_encoder(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_text_encoder(str(tmp_path))


def test_caption_table_reads_ids_and_drops_to_the_empty_prompt(bert):
    captions = ["a red circle", "two blue squares at the top", "a green cross"]
    table = CaptionTable(bert, captions)
    got = table(torch.tensor([2, -1, 0]), 3)
    want = bert.encode([captions[2], "", captions[0]])
    n = want.tokens.shape[1]
    assert torch.equal(got.tokens[:, :n], want.tokens) and not got.mask[:, n:].any()
    assert torch.equal(got.mask[:, :n], want.mask) and torch.equal(got.pooled, want.pooled)
    assert torch.equal(table(None, 2).pooled, bert.encode(["", ""]).pooled)


# ---------------------------------------------------------------------------------------------------------------
def test_text_condition_batching():
    a = TextCondition(torch.randn(2, 3, 4), torch.tensor([[1, 1, 0], [1, 0, 0]]).bool(), torch.randn(2, 5))
    b = TextCondition(torch.randn(1, 5, 4), torch.ones(1, 5, dtype=torch.bool), torch.randn(1, 5))
    c = cat_conditions(a, b)
    assert c.tokens.shape == (3, 5, 4) and torch.equal(c.tokens[:2, :3], a.tokens) and (c.tokens[:2, 3:] == 0).all()
    assert torch.equal(c.mask[:2, 3:], torch.zeros(2, 2, dtype=torch.bool)) and torch.equal(c[2].pooled, b.pooled)
    assert len(b.expand(4)) == 4 and torch.equal(null_condition(a, b, 4).pooled[3], b.pooled[0])
    assert torch.equal(null_condition(torch.tensor([3, 1]), None, 2), torch.tensor([-1, -1]))
    with pytest.raises(ValueError, match="null prompt"):
        null_condition(a, None, 2)
    with pytest.raises(TypeError, match="cannot batch"):
        cat_conditions(a, torch.tensor([1]))
    with pytest.raises(ValueError, match="cannot expand"):
        a.expand(4)
    with pytest.raises(ValueError, match="needs tokens"):
        TextCondition(torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.bool), torch.randn(2, 5))


def test_masked_attention_matches_the_formula_and_ignores_masked_keys(gen):
    q, k, v = (torch.randn(2, 3, 5, 8, generator=gen) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0]]).bool()
    out = attention(q, k, v, mask)
    w = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(8) + torch.where(mask, 0.0, -torch.inf)[:, None, None], -1)
    assert torch.allclose(out, w @ v, atol=1e-5) and torch.allclose(out, attention_reference(q, k, v, mask), atol=1e-5)
    k2, v2 = k.clone(), v.clone()
    k2[~mask[:, None, :, None].expand_as(k)] = 50.0  # garbage at masked keys changes nothing
    v2[~mask[:, None, :, None].expand_as(v)] = -7.0
    assert torch.allclose(attention(q, k2, v2, mask), out, atol=1e-5)
    assert not torch.allclose(attention(q, k2, v2), out, atol=1e-3)


def test_geglu_and_the_spatial_transformer_start(gen):
    ff = _randomize(GEGLU(6, mult=2))
    x = torch.randn(3, 6, generator=gen)
    a, g = ff.proj(x).chunk(2, -1)
    assert torch.allclose(ff(x), ff.out(a * F.gelu(g)), atol=1e-6)
    st = SpatialTransformer(8, 2, context_dim=5, groups=2, positions=4)
    x = torch.randn(2, 8, 4, 4, generator=gen)
    ctx, mask = torch.randn(2, 3, 5, generator=gen), torch.ones(2, 3, dtype=torch.bool)
    assert torch.equal(st(x, ctx, mask), x)  # zero-initialised output projection: the identity
    _randomize(st)
    plain = SpatialTransformer(8, 2, context_dim=5, groups=2)
    plain.load_state_dict(st.state_dict())
    assert not torch.allclose(st(x, ctx, mask), plain(x, ctx, mask), atol=1e-4)  # positions tell places apart
    assert torch.equal(st.pos[0], sincos_pos_embed_2d(8, 4))
    with pytest.raises(ValueError, match="built for 4"):
        st(torch.randn(1, 8, 2, 2), ctx[:1], mask[:1])


def _text_nets():
    unet = UNet(img_resolution=8, in_channels=3, model_channels=8, channel_mult=(1, 2), num_blocks=1,
                attn_resolutions=(4,), dropout=0.0, channels_per_head=4, context_dim=6, pooled_dim=5,
                token_positions=True)  # fmt: skip
    mmdit = MMDiT(input_size=8, patch_size=2, in_channels=3, hidden_size=16, depth=2, num_heads=2, context_dim=6,
                  pooled_dim=5)  # fmt: skip
    return {"unet": _randomize(unet, 1), "mmdit": _randomize(mmdit, 2)}


@pytest.mark.parametrize("kind", ["unet", "mmdit"])
def test_padding_changes_nothing(kind, gen):
    net = _text_nets()[kind].eval()
    x, c = torch.randn(2, 3, 8, 8, generator=gen), torch.randn(2, generator=gen)
    tokens, pooled = torch.randn(2, 4, 6, generator=gen), torch.randn(2, 5, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]).bool()
    short = TextCondition(tokens, mask, pooled)
    padded = TextCondition(torch.cat([tokens, 9 * torch.randn(2, 6, 6, generator=gen)], 1),
                           torch.cat([mask, torch.zeros(2, 6, dtype=torch.bool)], 1), pooled)  # fmt: skip
    with torch.no_grad():
        out = net(x, c, short)
        assert torch.allclose(net(x, c, padded), out, atol=1e-5)
        unmasked = TextCondition(padded.tokens, torch.ones(2, 10, dtype=torch.bool), pooled)
        assert not torch.allclose(net(x, c, unmasked), out, atol=1e-3)  # the mask is what makes them equal
        other = TextCondition(tokens.flip(0), mask.flip(0), pooled)
        assert not torch.allclose(net(x, c, other)[0], out[0], atol=1e-3)  # and the text does matter
        pooled_only = TextCondition(tokens, mask, pooled.flip(0))
        assert not torch.allclose(net(x, c, pooled_only)[0], out[0], atol=1e-3)  # the pooled vector too


@pytest.mark.parametrize("kind", ["unet", "mmdit"])
def test_text_networks_refuse_labels_and_wrong_widths(kind):
    net = _text_nets()[kind]
    x, c = torch.randn(2, 3, 8, 8), torch.randn(2)
    with pytest.raises(ValueError, match="text-conditioned"):
        net(x, c, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="width 7"):
        net(x, c, TextCondition(torch.randn(2, 3, 7), torch.ones(2, 3, dtype=torch.bool), torch.randn(2, 5)))
    with pytest.raises(ValueError, match="not text-conditioned"):
        UNet.preset("small", img_resolution=8, in_channels=3)(x, c, TextCondition(torch.randn(2, 1, 6),
                                                                                 torch.ones(2, 1, dtype=torch.bool),
                                                                                 torch.randn(2, 6)))  # fmt: skip


def test_mmdit_joint_attention_is_attention_over_the_concatenation(gen):
    """Each stream's queries attend to the image keys and the (unpadded) text keys under one softmax: written
    here as two score blocks, one normaliser, and the two value sums."""
    blk = _randomize(MMDiTBlock(8, 2), 3).eval()
    x, ctx, c = (
        torch.randn(2, 6, 8, generator=gen),
        torch.randn(2, 4, 8, generator=gen),
        torch.randn(2, 8, generator=gen),
    )
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).bool()
    qx, kx, vx, px = blk.x.qkv_heads(x, c)
    qc, kc, vc, pc = blk.ctx.qkv_heads(ctx, c)

    def attend(q):
        sx = torch.einsum("bhnd,bhmd->bhnm", q, kx) / math.sqrt(4)
        sc = torch.einsum("bhnd,bhld->bhnl", q, kc) / math.sqrt(4)
        sc = sc.masked_fill(~mask[:, None, None], -torch.inf)
        z = sx.exp().sum(-1, keepdim=True) + sc.exp().sum(-1, keepdim=True)
        a = (sx.exp() @ vx + sc.exp() @ vc) / z
        return a.transpose(1, 2).flatten(2)

    with torch.no_grad():
        want_x = blk.x.finish(x, attend(qx), px)
        want_c = blk.ctx.finish(ctx, attend(qc), pc)
        got_x, got_c = blk(x, ctx, c, mask)
    assert torch.allclose(got_x, want_x, atol=1e-5)
    assert torch.allclose(got_c[mask], want_c[mask], atol=1e-5)
    last = _randomize(MMDiTBlock(8, 2, pre_only=True), 4)
    _, out_c = last(x, ctx, c, mask)
    assert out_c is ctx and not hasattr(last.ctx, "mlp")  # the last block only feeds the text into attention


def test_mmdit_starts_at_zero_and_presets():
    net = MMDiT(input_size=8, patch_size=2, in_channels=3, hidden_size=16, depth=2, num_heads=2, context_dim=6)
    cond = TextCondition(torch.randn(2, 3, 6), torch.ones(2, 3, dtype=torch.bool), torch.randn(2, 6))
    assert torch.equal(net(torch.randn(2, 3, 8, 8), torch.randn(2), cond), torch.zeros(2, 3, 8, 8))
    big = MMDiT.preset("MMDiT-S/4", input_size=32, in_channels=4, context_dim=8)
    assert (big.patch, len(big.blocks), big.blocks[0].heads) == (4, 12, 6)
    with pytest.raises(ValueError, match="unknown MMDiT preset"):
        MMDiT.preset("MMDiT-Q/2")


# ---------------------------------------------------------------------------------------------------------------
def test_guidance_on_prompts_is_exact(bert, gen):
    net = _randomize(UNet(img_resolution=8, in_channels=3, model_channels=8, channel_mult=(1,), num_blocks=1,
                          attn_resolutions=(8,), dropout=0.0, channels_per_head=4, context_dim=24), 5)  # fmt: skip
    den = Denoiser(net, EDMProcess(), "edm").eval()
    prompts = ["a small red circle at the top left", "two blue squares"]
    cond, empty, neg = bert.encode(prompts), bert.encode([""]), bert.encode(["a green cross"])
    x, sigma = torch.randn(2, 3, 8, 8, generator=gen), torch.tensor([0.7, 3.0])
    w = 3.5
    with torch.no_grad():
        d_c, d_0, d_n = den(x, sigma, cond), den(x, sigma, empty.expand(2)), den(x, sigma, neg.expand(2))
        assert torch.allclose(
            ClassifierFreeGuidance(den, w, null=empty)(x, sigma, cond), d_0 + w * (d_c - d_0), atol=1e-5
        )
        assert torch.allclose(ClassifierFreeGuidance(den, 1.0, null=empty)(x, sigma, cond), d_c, atol=1e-5)
        assert torch.allclose(
            ClassifierFreeGuidance(den, w, null=neg)(x, sigma, cond), d_n + w * (d_c - d_n), atol=1e-5
        )
    with pytest.raises(ValueError, match="null prompt"):
        ClassifierFreeGuidance(den, w)(x, sigma, cond)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = sample_prompts(den, bert, prompts, (3, 8, 8), EDMProcess(), guidance=w, negative_prompt="a green cross",
                           sampler="euler", steps=3, seed=4)  # fmt: skip
    b = sample(ClassifierFreeGuidance(den, w, null=neg), (2, 3, 8, 8), EDMProcess(), "euler", 3, cond=cond, seed=4)
    assert torch.equal(a.samples, b.samples) and a.nfe == 3
    with pytest.warns(UserWarning, match="empty prompt"):
        sample_prompts(den, bert, [""], (3, 8, 8), EDMProcess(), sampler="euler", steps=1, seed=0)


# ---------------------------------------------------------------------------------------------------------------
TINY_TEXT = ["--set", "data.num_samples=40", "--set", "train.steps=2", "--set", "train.batch_size=4",
             "--set", "train.precision=fp32", "--set", "train.channels_last=false", "--set", "train.ckpt_every=0",
             "--set", "train.tensorboard=false", "--set", "sample.n=2", "--set", "sample.steps=2",
             "--set", "model.kwargs={model_channels: 8, channel_mult: [1, 2], num_blocks: 1, attn_resolutions: [16],"
             " channels_per_head: 4, token_positions: true, dropout: 0.0}"]  # fmt: skip


@pytest.fixture(scope="module")
def text_run(encoders, tmp_path_factory):
    from pathlib import Path

    tmp = tmp_path_factory.mktemp("t2i")
    cfg = Path(__file__).resolve().parents[1] / "configs" / "shapes_unet_text.yaml"
    argv = ["train", str(cfg), "--out", str(tmp / "run"), "--quiet", "--set", f"text.encoder={encoders['bert']}",
            *TINY_TEXT]  # fmt: skip
    assert main(argv) == 0
    return tmp, next((tmp / "run" / "checkpoints").iterdir())


def test_text_run_records_its_encoder_and_samples_from_prompts(text_run, encoders, bert):
    import json

    from sdeflow.builders import load
    from sdeflow.training.objectives import build_objective

    tmp, ck = text_run
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["text_width"] == 24 and meta["text_fingerprint"] == bert.fingerprint()
    m = load(ck)
    assert m.text_encoder is not None and m.text_encoder.width == 24
    out = tmp / "s"
    argv = ["sample", str(ck), "--out", str(out), "--steps", "2", "--n", "4", "--cfg", "3",
            "--prompt", "a red circle above a blue square", "--prompt", "two green crosses"]  # fmt: skip
    assert main(argv) == 0
    assert (out / "prompts.txt").read_text().splitlines() == ["a red circle above a blue square",
                                                              "two green crosses"] * 2  # fmt: skip
    from PIL import Image

    grid = Image.open(out / "samples.png")  # one row per prompt (two rows of 2 × 32 px upscaled by 2, 2 px gaps)
    assert grid.height == 2 * (64 + 2) + 2 and grid.width > 2 * 66
    # the objective's condition of caption indices is the encoding of those captions
    from sdeflow.config import load_config
    from sdeflow.data import ShapesDataset

    cfg = load_config(None, [f"text.encoder={encoders['bert']}", "data.name=shapes", "data.num_samples=12"])
    ds = ShapesDataset(12, 32)
    obj = build_objective(cfg, (3, 32, 32), captions=ds.captions)
    cond = obj.condition(torch.tensor([3, -1, 0]), 3)
    want = bert.encode([ds.captions[3], "", ds.captions[0]])
    assert torch.equal(cond.mask[:, : want.mask.shape[1]], want.mask) and not cond.mask[:, want.mask.shape[1] :].any()
    assert torch.allclose(cond.pooled, want.pooled, atol=1e-5)  # encoded in other batches: rounding differs
    assert torch.allclose(cond.tokens[cond.mask], want.tokens[want.mask], atol=1e-5)


def test_text_run_refuses_bad_prompts_and_encoders(text_run, encoders, tmp_path, capsys):
    _, ck = text_run
    base = ["sample", str(ck), "--out", str(tmp_path / "s"), "--steps", "1", "--n", "1"]
    assert main(base) == 2
    assert "give --prompt" in capsys.readouterr().err
    assert main([*base, "--prompts", str(tmp_path / "none.txt")]) == 2
    assert "file not found" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n\n")
    assert main([*base, "--prompts", str(tmp_path / "empty.txt")]) == 2
    assert "holds no prompts" in capsys.readouterr().err
    assert main([*base, "--prompt", "x", "--text-encoder", str(encoders["clip"])]) == 2  # width 16, trained on 24
    assert "width 16" in capsys.readouterr().err
    assert main([*base, "--prompt", "x", "--text-encoder", str(tmp_path / "gone")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "--text-encoder DIR" in err  # a moved encoder: where to say it is now
    assert main(["eval", str(ck), "--out", str(tmp_path / "e"), "--n", "2", "--nfe", "1"]) == 2
    assert "prompt adherence" in capsys.readouterr().err
    assert main(["nll", str(ck), "--n", "2"]) == 2
    assert "prompt adherence" in capsys.readouterr().err
